//! The spool: where received instances become durable files.
//!
//! Layout (shared with the uploader): `<root>/<study>/<series>/<sop>.dcm`,
//! DICOM Part 10 files whose data set is the received bytes, unchanged.
//!
//! An instance is gathered in memory (a [`PartFile`]; past [`IN_MEMORY_LIMIT`]
//! it spills to `<root>/.tmp/<random>.part`, so memory stays bounded whatever
//! the instance size), then written to that temp file. Durability is a group
//! commit ([`Spool::sync`], see [`commit`]): one `syncfs` for all the stores
//! waiting at that moment. A store syncs twice:
//! 1. after writing its temp file: the data is durable *before* any name points at it;
//! 2. after hard-linking it to its final name (atomic, never overwriting: two
//!    associations storing the same SOP instance cannot clobber each other):
//!    the name and its directories are durable.
//!
//! So after a crash a spool name always points at a complete file, and nothing
//! half-written is ever visible outside `.tmp`; temp files are removed on every
//! failure path (their guard removes them on drop) and at start.

mod commit;

use std::fs;
use std::io::{self, Read as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bidsflux_session::Uid;
use dicom_object::FileMetaTableBuilder;
use sha2::{Digest as _, Sha256};

pub use commit::GroupCommit;

/// Implementation Class UID written in the file meta of spooled files (a `2.25` UUID UID, fixed for bidsflux).
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.199122094469766935734398429342961536314";
/// Implementation Version Name written in the file meta of spooled files.
pub const IMPLEMENTATION_VERSION_NAME: &str = "BIDSFLUX_0_1";

/// Name of the temp directory under the spool root.
const TMP_DIR: &str = ".tmp";
/// An instance is kept in memory up to this size (most single-frame images fit), then written to
/// its temp file in chunks of about this size: each open association holds at most this much.
pub const IN_MEMORY_LIMIT: usize = 256 * 1024;

/// The spool directory.
#[derive(Debug, Clone)]
pub struct Spool {
    root: PathBuf,
    tmp: PathBuf,
    /// Durability for every store of the service (one sync thread).
    commit: Arc<GroupCommit>,
}

impl Spool {
    /// Creates the spool root and its temp directory, removes temp files
    /// left by an earlier run (they were never acknowledged to anyone), and
    /// starts the group commit thread.
    pub async fn open(root: &Path) -> io::Result<Self> {
        let tmp = root.join(TMP_DIR);
        tokio::fs::create_dir_all(&tmp).await?;
        let mut entries = tokio::fs::read_dir(&tmp).await?;
        let mut removed = 0_u32;
        while let Some(entry) = entries.next_entry().await? {
            if entry.file_type().await?.is_file() {
                tokio::fs::remove_file(entry.path()).await?;
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::info!(removed, "removed stale temp files from the spool");
        }
        let commit = Arc::new(GroupCommit::start(root)?);
        Ok(Self { root: root.to_path_buf(), tmp, commit })
    }

    /// The spool root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Waits until everything written to the spool before this call is durable (group commit).
    pub async fn sync(&self) -> io::Result<()> {
        self.commit.sync().await
    }

    /// Starts an instance: the Part 10 header (preamble, `DICM`, file meta), in memory.
    pub fn create_part(&self, meta: &PartMeta<'_>) -> io::Result<PartFile> {
        let mut pending = Vec::with_capacity(64 * 1024);
        pending.extend_from_slice(&part10_header(meta)?);
        Ok(PartFile {
            tmp: self.tmp.clone(),
            header_len: pending.len() as u64,
            pending,
            spilled: None,
            hasher: Sha256::new(),
            dataset_len: 0,
        })
    }

    /// Links a finished temp file to `<study>/<series>/<sop>.dcm` (blocking: call from a blocking task).
    ///
    /// The temp file must be durable ([`Spool::sync`] after [`PartFile::finish`]) so that the
    /// name never points at a partial file after a crash; the new name is durable after the
    /// next [`Spool::sync`].
    ///
    /// - no such file yet: the temp file takes that name;
    /// - a file with the same data set is there: it is kept ([`Placement::Duplicate`]);
    /// - a different one is there: the new one goes alongside as
    ///   `<sop>.dcm.conflict-<first 16 hex digits of its data set SHA-256>` ([`Placement::Conflict`]).
    pub fn place(&self, part: &FinishedPart, ids: &InstanceIds) -> io::Result<Placed> {
        let study_dir = ensure_dir(&self.root, ids.study.as_str())?;
        let series_dir = ensure_dir(&study_dir, ids.series.as_str())?;
        let name = format!("{}.dcm", ids.sop.as_str());
        let relative = |file: &str| format!("{}/{}/{}", ids.study, ids.series, file);
        let mut placement = Placement::New;
        let mut existing = None;
        let mut file_name = name.clone();
        loop {
            let target = series_dir.join(&file_name);
            match fs::hard_link(part.path(), &target) {
                Ok(()) => {
                    return Ok(Placed {
                        relative_path: relative(&file_name),
                        file_size: part.file_size,
                        placement,
                        existing,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let sha256 = dataset_sha256_of_file(&target)?;
                    if sha256 == part.dataset_sha256 {
                        let file_size = fs::metadata(&target)?.len();
                        let placement =
                            if placement == Placement::New { Placement::Duplicate } else { Placement::Conflict };
                        return Ok(Placed { relative_path: relative(&file_name), file_size, placement, existing });
                    }
                    if placement == Placement::Conflict {
                        // Two different data sets whose hashes share 64 bits: do not guess.
                        return Err(io::Error::new(io::ErrorKind::AlreadyExists, "conflict file name already taken"));
                    }
                    placement = Placement::Conflict;
                    existing = Some(Existing { relative_path: relative(&file_name), dataset_sha256: sha256 });
                    file_name = format!("{name}.conflict-{}", &part.dataset_sha256[..16]);
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// What goes into the file meta of a spooled instance.
#[derive(Debug, Clone, Copy)]
pub struct PartMeta<'a> {
    /// MediaStorageSOPClassUID: the command's AffectedSOPClassUID.
    pub sop_class_uid: &'a str,
    /// MediaStorageSOPInstanceUID: the command's AffectedSOPInstanceUID.
    pub sop_instance_uid: &'a str,
    /// TransferSyntaxUID: the presentation context's.
    pub transfer_syntax_uid: &'a str,
    /// SourceApplicationEntityTitle: the calling AE title.
    pub calling_ae_title: &'a str,
}

/// Preamble, `DICM` and the file meta group (explicit VR LE, with its group length).
pub fn part10_header(meta: &PartMeta<'_>) -> io::Result<Vec<u8>> {
    let mut builder = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(meta.sop_class_uid)
        .media_storage_sop_instance_uid(meta.sop_instance_uid)
        .transfer_syntax(meta.transfer_syntax_uid)
        .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
        .implementation_version_name(IMPLEMENTATION_VERSION_NAME);
    if !meta.calling_ae_title.is_empty() {
        builder = builder.source_application_entity_title(meta.calling_ae_title);
    }
    let table = builder.build().map_err(io::Error::other)?;
    let mut out = vec![0_u8; 128];
    out.extend_from_slice(b"DICM");
    table.write(&mut out).map_err(io::Error::other)?;
    Ok(out)
}

/// Removes its file when dropped, unless [`TempGuard::remove`] already did.
#[derive(Debug)]
struct TempGuard {
    path: PathBuf,
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        match fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(error = %e, path = %self.path.display(), "cannot remove temp file"),
        }
    }
}

/// An instance being received: the Part 10 header, then the data set fragments as they arrive,
/// in memory up to [`IN_MEMORY_LIMIT`], in a temp file beyond.
#[derive(Debug)]
pub struct PartFile {
    tmp: PathBuf,
    /// Bytes not written to the temp file yet (all of them while the instance fits in memory).
    pending: Vec<u8>,
    /// The temp file, once the instance outgrew memory.
    spilled: Option<Spilled>,
    hasher: Sha256,
    header_len: u64,
    dataset_len: u64,
}

/// A temp file and its open handle (`None` while a blocking write holds it).
#[derive(Debug)]
struct Spilled {
    guard: TempGuard,
    file: Option<fs::File>,
}

impl PartFile {
    /// Appends a data set fragment.
    pub async fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.hasher.update(bytes);
        self.dataset_len += bytes.len() as u64;
        self.pending.extend_from_slice(bytes);
        if self.pending.len() >= IN_MEMORY_LIMIT {
            let mut written = self.write_pending().await?;
            written.clear();
            self.pending = written;
        }
        Ok(())
    }

    /// Bytes of data set received so far.
    pub fn dataset_len(&self) -> u64 {
        self.dataset_len
    }

    /// Writes the pending bytes to the temp file (created on first use) in a blocking task;
    /// returns the buffer, still holding them.
    async fn write_pending(&mut self) -> io::Result<Vec<u8>> {
        let tmp = &self.tmp;
        let spilled = self.spilled.get_or_insert_with(|| Spilled {
            guard: TempGuard { path: tmp.join(format!("{}.part", uuid::Uuid::new_v4().simple())) },
            file: None,
        });
        let file = spilled.file.take();
        let path = spilled.guard.path.clone();
        let buf = std::mem::take(&mut self.pending);
        let (file, buf) = tokio::task::spawn_blocking(move || -> io::Result<(fs::File, Vec<u8>)> {
            let mut file = match file {
                Some(f) => f,
                None => fs::OpenOptions::new().write(true).create_new(true).open(&path)?,
            };
            file.write_all(&buf)?;
            Ok((file, buf))
        })
        .await
        .map_err(io::Error::other)??;
        spilled.file = Some(file);
        Ok(buf)
    }

    /// Writes what is left to the temp file (not synced: see [`Spool::sync`]).
    pub async fn finish(mut self) -> io::Result<FinishedPart> {
        let fitted = self.spilled.is_none();
        let written = self.write_pending().await?;
        let Self { spilled, hasher, header_len, dataset_len, .. } = self;
        let guard = spilled.map(|s| s.guard).ok_or_else(|| io::Error::other("temp file missing after write"))?;
        Ok(FinishedPart {
            guard,
            memory: fitted.then_some(written),
            dataset_sha256: hex::encode(hasher.finalize()),
            file_size: header_len + dataset_len,
            dataset_len,
        })
    }
}

/// A complete temp file (removed when dropped).
#[derive(Debug)]
pub struct FinishedPart {
    guard: TempGuard,
    /// The whole file's bytes when the instance fitted in memory.
    memory: Option<Vec<u8>>,
    /// SHA-256 (lowercase hex) of the data set bytes.
    pub dataset_sha256: String,
    /// Size of the whole Part 10 file.
    pub file_size: u64,
    /// Size of the data set.
    pub dataset_len: u64,
}

impl FinishedPart {
    /// Where the temp file is.
    pub fn path(&self) -> &Path {
        &self.guard.path
    }

    /// The file's bytes, when the instance fitted in memory (to read its header without I/O).
    pub fn bytes(&self) -> Option<&[u8]> {
        self.memory.as_deref()
    }

    /// Frees the in-memory copy.
    pub fn release_memory(&mut self) {
        self.memory = None;
    }
}

/// The validated UIDs that name a spool file.
#[derive(Debug, Clone)]
pub struct InstanceIds {
    /// StudyInstanceUID.
    pub study: Uid,
    /// SeriesInstanceUID.
    pub series: Uid,
    /// SOPInstanceUID.
    pub sop: Uid,
}

/// How an instance was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// A new file.
    New,
    /// The same data set was already there; the existing file is kept.
    Duplicate,
    /// Another data set had the name; this one is stored alongside as a conflict file.
    Conflict,
}

/// Where an instance is now.
#[derive(Debug, Clone)]
pub struct Placed {
    /// Path relative to the spool root.
    pub relative_path: String,
    /// Size of the file at that path.
    pub file_size: u64,
    /// How it got there.
    pub placement: Placement,
    /// For a [`Placement::Conflict`]: the file that had the name first.
    pub existing: Option<Existing>,
}

/// The file spooled first under a conflicting SOP Instance UID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Existing {
    /// Path relative to the spool root.
    pub relative_path: String,
    /// SHA-256 (lowercase hex) of its data set.
    pub dataset_sha256: String,
}

/// `parent/name`, created if missing (made durable by the next [`Spool::sync`]).
fn ensure_dir(parent: &Path, name: &str) -> io::Result<PathBuf> {
    let dir = parent.join(name);
    match fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    Ok(dir)
}

/// SHA-256 of the data set of a Part 10 file (everything after the file meta group), streamed.
pub fn dataset_sha256_of_file(path: &Path) -> io::Result<String> {
    let mut file = fs::File::open(path)?;
    let mut head = [0_u8; 144];
    file.read_exact(&mut head)?;
    let offset = dataset_offset(&head)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not a Part 10 file with a meta group length"))?;
    file.seek(io::SeekFrom::Start(offset))?;
    let mut hasher = Sha256::new();
    io::copy(&mut io::BufReader::with_capacity(IN_MEMORY_LIMIT, file), &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

/// Offset of the data set, from the first 144 bytes of a Part 10 file.
fn dataset_offset(head: &[u8; 144]) -> Option<u64> {
    if &head[128..132] != b"DICM" || head[132..136] != [0x02, 0x00, 0x00, 0x00] || &head[136..138] != b"UL" {
        return None;
    }
    let len = u32::from_le_bytes([head[140], head[141], head[142], head[143]]);
    Some(144 + u64::from(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(study: &str) -> InstanceIds {
        InstanceIds {
            study: Uid::parse("StudyInstanceUID", study).unwrap(),
            series: Uid::parse("SeriesInstanceUID", "1.2.3.4").unwrap(),
            sop: Uid::parse("SOPInstanceUID", "1.2.3.4.5").unwrap(),
        }
    }

    const META: PartMeta<'static> = PartMeta {
        sop_class_uid: "1.2.840.10008.5.1.4.1.1.4",
        sop_instance_uid: "1.2.3.4.5",
        transfer_syntax_uid: "1.2.840.10008.1.2.1",
        calling_ae_title: "SCANNER",
    };

    async fn part(spool: &Spool, body: &[u8]) -> FinishedPart {
        let mut p = spool.create_part(&META).unwrap();
        for chunk in body.chunks(3) {
            p.append(chunk).await.unwrap();
        }
        p.finish().await.unwrap()
    }

    #[tokio::test]
    async fn header_is_part10_and_hash_covers_the_data_set_only() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).await.unwrap();
        let body = b"\x08\x00\x16\x00some data set bytes!";
        let p = part(&spool, body).await;
        let bytes = fs::read(p.path()).unwrap();
        let head: [u8; 144] = bytes[..144].try_into().unwrap();
        let offset = dataset_offset(&head).unwrap() as usize;
        assert_eq!(&bytes[offset..], body);
        assert_eq!(bytes.len() as u64, p.file_size);
        assert_eq!(p.dataset_sha256, hex::encode(Sha256::digest(body)));
        assert_eq!(dataset_sha256_of_file(p.path()).unwrap(), p.dataset_sha256);
        assert_eq!(p.bytes(), Some(&bytes[..]), "a small instance keeps its bytes in memory");
        let meta = dicom_object::FileMetaTable::from_reader(&bytes[128..]).unwrap();
        assert_eq!(meta.media_storage_sop_instance_uid().trim_end_matches('\0'), "1.2.3.4.5");
        assert_eq!(meta.transfer_syntax().trim_end_matches('\0'), "1.2.840.10008.1.2.1");
        assert_eq!(meta.source_application_entity_title().map(str::trim), Some("SCANNER"));
        assert_eq!(meta.implementation_class_uid().trim_end_matches('\0'), IMPLEMENTATION_CLASS_UID);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_large_instance_spills_to_its_temp_file_in_bounded_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).await.unwrap();
        let body: Vec<u8> = (0..3 * IN_MEMORY_LIMIT + 12_345).map(|i| (i % 251) as u8).collect();
        let mut p = spool.create_part(&META).unwrap();
        for chunk in body.chunks(16 * 1024) {
            p.append(chunk).await.unwrap();
            assert!(p.pending.len() < IN_MEMORY_LIMIT, "pending bytes are bounded");
        }
        assert_eq!(fs::read_dir(dir.path().join(TMP_DIR)).unwrap().count(), 1);
        let done = p.finish().await.unwrap();
        assert!(done.bytes().is_none());
        let bytes = fs::read(done.path()).unwrap();
        assert_eq!(bytes.len() as u64, done.file_size);
        assert_eq!(&bytes[bytes.len() - body.len()..], &body[..]);
        assert_eq!(dataset_sha256_of_file(done.path()).unwrap(), done.dataset_sha256);
        drop(done);
        assert_eq!(fs::read_dir(dir.path().join(TMP_DIR)).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn temp_files_are_removed_on_drop_and_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).await.unwrap();
        let p = spool.create_part(&META).unwrap();
        drop(p);
        assert_eq!(fs::read_dir(dir.path().join(TMP_DIR)).unwrap().count(), 0);
        fs::write(dir.path().join(TMP_DIR).join("stale.part"), b"x").unwrap();
        Spool::open(dir.path()).await.unwrap();
        assert_eq!(fs::read_dir(dir.path().join(TMP_DIR)).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn places_new_duplicate_and_conflicting_instances() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).await.unwrap();
        let ids = ids("1.2.3");

        let first = part(&spool, b"first data set").await;
        let placed = spool.place(&first, &ids).unwrap();
        assert_eq!(placed.placement, Placement::New);
        assert_eq!(placed.relative_path, "1.2.3/1.2.3.4/1.2.3.4.5.dcm");
        drop(first);
        assert!(dir.path().join(&placed.relative_path).is_file());
        assert_eq!(fs::read_dir(dir.path().join(TMP_DIR)).unwrap().count(), 0);

        let again = part(&spool, b"first data set").await;
        let placed = spool.place(&again, &ids).unwrap();
        assert_eq!(placed.placement, Placement::Duplicate);
        assert_eq!(placed.relative_path, "1.2.3/1.2.3.4/1.2.3.4.5.dcm");

        let other = part(&spool, b"other data set").await;
        let placed = spool.place(&other, &ids).unwrap();
        assert_eq!(placed.placement, Placement::Conflict);
        let expected = format!("1.2.3/1.2.3.4/1.2.3.4.5.dcm.conflict-{}", &other.dataset_sha256[..16]);
        assert_eq!(placed.relative_path, expected);
        let first = Existing {
            relative_path: "1.2.3/1.2.3.4/1.2.3.4.5.dcm".into(),
            dataset_sha256: hex::encode(Sha256::digest(b"first data set")),
        };
        assert_eq!(placed.existing.as_ref(), Some(&first));
        // The original is untouched.
        let original = dataset_sha256_of_file(&dir.path().join("1.2.3/1.2.3.4/1.2.3.4.5.dcm")).unwrap();
        assert_eq!(original, hex::encode(Sha256::digest(b"first data set")));
        // The same conflicting data set again lands on the same conflict file.
        let other_again = part(&spool, b"other data set").await;
        let placed = spool.place(&other_again, &ids).unwrap();
        assert_eq!(placed.placement, Placement::Conflict);
        assert_eq!(placed.relative_path, expected);
        assert_eq!(placed.existing, Some(first));
    }
}
