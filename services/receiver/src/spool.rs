//! The spool: where received instances become durable files.
//!
//! Layout (shared with the uploader, defined by [`SpoolPath`]):
//! `<root>/<study>/<series>/<sop>.dcm`, DICOM Part 10 files whose data set is
//! the received bytes, unchanged.
//!
//! An instance is gathered in memory (a [`PartFile`]; past [`IN_MEMORY_LIMIT`]
//! it spills to `<root>/.tmp/<random>.part`, so memory stays bounded whatever
//! the instance size). Then, while the instance's lock ([`Spool::lock`]) is held
//! so that no other store of the same SOP instance interleaves:
//!
//! - **An instance held in memory** (nearly all of them) goes through the
//!   [`journal`]: [`Spool::decide`] picks its name (new, identical file already
//!   there, or conflict), the record (event + file bytes) is appended to the
//!   journal and flushed — one `fdatasync`, shared by every store waiting at that
//!   moment — and only then is the instance's temp file renamed to that name.
//!   The files are flushed in bulk by the journal's checkpoints; after a crash,
//!   [`Spool::open`] rewrites from the journal every file written since the last
//!   checkpoint (a file it finds different is kept beside it as `.torn-<seq>`).
//! - **A larger instance** (spilled to its temp file) is flushed with a group
//!   commit ([`Spool::sync`], see [`GroupCommit`]: one `syncfs` for all the stores
//!   waiting at that moment), twice: after writing its temp file (the data is
//!   durable *before* any name points at it), and after hard-linking it to its
//!   final name (atomic, never overwriting).
//!
//! Either way a name never replaces an existing file, and Success is answered only
//! once the instance can be recovered after a crash. Temp files are removed on
//! every failure path (their guard removes them on drop) and at start.

mod commit;
pub mod journal;
pub mod pool;

use std::fs;
use std::io::{self, Read as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use bidsflux_proto::v1 as pb;
use bidsflux_session::SpoolPath;
use bytes::Bytes;
use dicom_object::FileMetaTableBuilder;
use prost::Message as _;
use sha2::{Digest as _, Sha256};

pub use commit::GroupCommit;
use journal::{CreateFile, Journal, JournalOptions, Recovered};
use pool::TempPool;

/// Implementation Class UID written in the file meta of spooled files (a `2.25` UUID UID, fixed for bidsflux).
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.199122094469766935734398429342961536314";
/// Implementation Version Name written in the file meta of spooled files.
pub const IMPLEMENTATION_VERSION_NAME: &str = "BIDSFLUX_0_1";

/// Name of the temp directory under the spool root.
const TMP_DIR: &str = ".tmp";
/// Name of the journal directory under the spool root.
pub const JOURNAL_DIR: &str = ".journal";
/// Stores of SOP instances whose UIDs hash alike wait for each other.
const LOCK_STRIPES: usize = 256;
/// An instance is kept in memory up to this size (most single-frame images fit), then written to
/// its temp file in chunks of about this size: each open association holds at most this much.
pub const IN_MEMORY_LIMIT: usize = 256 * 1024;

/// The spool directory.
#[derive(Debug, Clone)]
pub struct Spool {
    root: PathBuf,
    tmp: PathBuf,
    /// Durability of large instances (one sync thread).
    commit: Arc<GroupCommit>,
    /// Durability of the others (a writer and a checkpoint thread).
    journal: Arc<Journal>,
    /// One store at a time per SOP instance (striped), from choosing its name to writing it.
    locks: Arc<[tokio::sync::Mutex<()>]>,
    /// Instances rewritten from the journal at start, to announce again.
    recovered: Arc<Mutex<Vec<RecoveredInstance>>>,
    /// Temp files created ahead of need.
    pool: Arc<TempPool>,
}

/// An instance the journal restored at start: its event (and, for a conflict file, the file
/// spooled first), to publish again — JetStream de-duplicates what was already published.
#[derive(Debug, Clone)]
pub struct RecoveredInstance {
    /// The event, as it was journaled.
    pub event: pb::InstanceStored,
    /// For a conflict file: the file that has the plain name.
    pub existing: Option<Existing>,
}

impl Spool {
    /// Creates the spool root and its temp directory, removes temp files
    /// left by an earlier run (they were never acknowledged to anyone), and
    /// starts the group commit thread.
    pub async fn open(root: &Path) -> io::Result<Self> {
        Self::open_with(root, JournalOptions::default()).await
    }

    /// [`Spool::open`] with other journal options.
    pub async fn open_with(root: &Path, options: JournalOptions) -> io::Result<Self> {
        let tmp = root.join(TMP_DIR);
        tokio::fs::create_dir_all(&tmp).await?;
        let mut entries = tokio::fs::read_dir(&tmp).await?;
        let mut removed = 0_u32;
        while let Some(entry) = entries.next_entry().await? {
            // Gone meanwhile (a previous process still exiting) is as good as removed.
            let gone = |e: &io::Error| e.kind() == io::ErrorKind::NotFound;
            match entry.file_type().await {
                Ok(t) if t.is_file() => match tokio::fs::remove_file(entry.path()).await {
                    Ok(()) => removed += 1,
                    Err(e) if gone(&e) => {}
                    Err(e) => return Err(e),
                },
                Ok(_) => {}
                Err(e) if gone(&e) => {}
                Err(e) => return Err(e),
            }
        }
        if removed > 0 {
            tracing::info!(removed, "removed stale temp files from the spool");
        }
        let commit = Arc::new(GroupCommit::start(root)?);
        let (root_dir, tmp_dir) = (root.to_path_buf(), tmp.clone());
        let (journal, recovered) = tokio::task::spawn_blocking(move || -> io::Result<_> {
            let root = root_dir;
            let (opened, records) = Journal::open(&root.join(JOURNAL_DIR), options)?;
            let mut recovered = Vec::with_capacity(records.len());
            for position in &records {
                // One record in memory at a time.
                let record = opened.read(position)?;
                if let Some(r) = restore(&root, &tmp_dir, &record)? {
                    recovered.push(r);
                }
            }
            if !records.is_empty() {
                // The restored files are durable before the checkpoint says so.
                rustix::fs::syncfs(fs::File::open(&root)?)?;
                tracing::info!(
                    records = records.len(),
                    instances = recovered.len(),
                    "restored spool files written since the last journal checkpoint"
                );
            }
            Ok((opened.start(&root)?, recovered))
        })
        .await
        .map_err(io::Error::other)??;
        let tmp_dir_for_pool = tmp.clone();
        let locks = (0..LOCK_STRIPES).map(|_| tokio::sync::Mutex::new(())).collect();
        Ok(Self {
            root: root.to_path_buf(),
            tmp,
            commit,
            journal: Arc::new(journal),
            locks,
            recovered: Arc::new(Mutex::new(recovered)),
            pool: Arc::new(TempPool::start(&tmp_dir_for_pool)?),
        })
    }

    /// The instances restored from the journal at start (once; empty afterwards).
    pub fn take_recovered(&self) -> Vec<RecoveredInstance> {
        std::mem::take(&mut *self.recovered.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Waits for the lock of a SOP instance: held from [`Spool::decide`] (or [`Spool::place`])
    /// until the instance's file is written, so that two stores of the same instance on two
    /// associations do not both take the same name.
    pub async fn lock(&self, sop_instance_uid: &str) -> tokio::sync::MutexGuard<'_, ()> {
        // FNV-1a: cheap and well spread over UIDs that differ in their last digits.
        let hash = sop_instance_uid
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
        self.locks[(hash % self.locks.len() as u64) as usize].lock().await
    }

    /// Whether an instance with this event and file goes through the journal.
    pub fn journaled(&self, event_len: usize, file_len: usize) -> bool {
        self.journal.fits(event_len, file_len)
    }

    /// Writes an instance's bytes to a temp file (blocking: call from a blocking task); the
    /// file is removed when dropped unless [`Spool::journal`] renamed it.
    pub fn write_temp(&self, bytes: &[u8]) -> io::Result<TempFile> {
        let (path, mut file) = self.pool.take()?;
        let guard = TempGuard { path };
        file.write_all(bytes)?;
        Ok(TempFile { guard })
    }

    /// Appends an instance to the journal and, once it is durable, renames its temp file
    /// ([`Spool::write_temp`]) to `path` (from [`Spool::decide`], under the instance's
    /// [`Spool::lock`]).
    pub async fn journal(
        &self,
        event: &pb::InstanceStored,
        file: Bytes,
        tmp: &TempFile,
        path: PathBuf,
    ) -> io::Result<()> {
        let create = CreateFile { tmp: tmp.guard.path.clone(), path };
        self.journal.append(event.encode_to_vec(), file, create).await
    }

    /// Picks the name of an instance's spool file (blocking: call from a blocking task, under
    /// the instance's [`Spool::lock`]):
    /// - no such file yet: [`Decision::Create`] `<study>/<series>/<sop>.dcm`;
    /// - a file with the same data set is there: [`Decision::Exists`], it is kept ([`Placement::Duplicate`]);
    /// - a different one is there: the new one goes alongside as
    ///   `<sop>.dcm.conflict-<first 16 hex digits of its data set SHA-256>` ([`Placement::Conflict`]).
    pub fn decide(&self, dataset_sha256: &str, file_size: u64, instance: &SpoolPath) -> io::Result<Decision> {
        ensure_series_dir(&self.root, instance)?;
        let mut placement = Placement::New;
        let mut existing = None;
        let mut file = instance.plain();
        loop {
            let target = file.to_path(&self.root);
            let meta = match fs::metadata(&target) {
                Ok(meta) => meta,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let placed = Placed { relative_path: file.to_string(), file_size, placement, existing };
                    return Ok(Decision::Create { path: target, placed });
                }
                Err(e) => return Err(e),
            };
            let sha256 = dataset_sha256_of_file(&target)?;
            if sha256 == dataset_sha256 {
                let placement = if placement == Placement::New { Placement::Duplicate } else { Placement::Conflict };
                let placed = Placed { relative_path: file.to_string(), file_size: meta.len(), placement, existing };
                return Ok(Decision::Exists(placed));
            }
            if placement == Placement::Conflict {
                // Two different data sets whose hashes share 64 bits: do not guess.
                return Err(io::Error::new(io::ErrorKind::AlreadyExists, "conflict file name already taken"));
            }
            placement = Placement::Conflict;
            existing = Some(Existing { relative_path: file.to_string(), dataset_sha256: sha256 });
            file = instance.conflict(dataset_sha256).map_err(invalid_input)?;
        }
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
    pub fn place(&self, part: &FinishedPart, instance: &SpoolPath) -> io::Result<Placed> {
        ensure_series_dir(&self.root, instance)?;
        let mut placement = Placement::New;
        let mut existing = None;
        let mut file = instance.plain();
        loop {
            let target = file.to_path(&self.root);
            let source = part.path().ok_or_else(|| io::Error::other("instance not in a temp file"))?;
            match fs::hard_link(source, &target) {
                Ok(()) => {
                    return Ok(Placed {
                        relative_path: file.to_string(),
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
                        return Ok(Placed { relative_path: file.to_string(), file_size, placement, existing });
                    }
                    if placement == Placement::Conflict {
                        // Two different data sets whose hashes share 64 bits: do not guess.
                        return Err(io::Error::new(io::ErrorKind::AlreadyExists, "conflict file name already taken"));
                    }
                    placement = Placement::Conflict;
                    existing = Some(Existing { relative_path: file.to_string(), dataset_sha256: sha256 });
                    file = instance.conflict(&part.dataset_sha256).map_err(invalid_input)?;
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

/// A temp file holding an instance's bytes, removed when dropped unless it was renamed.
#[derive(Debug)]
pub struct TempFile {
    guard: TempGuard,
}

/// Removes its file when dropped (if it is still there).
#[derive(Debug)]
struct TempGuard {
    path: PathBuf,
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        match fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(error = %format!("{e:#}"), path = %self.path.display(), "cannot remove temp file"),
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

    /// The instance is complete: an instance held in memory stays there; a spilled one gets
    /// what is left written to its temp file (not synced: see [`Spool::sync`]).
    pub async fn finish(mut self) -> io::Result<FinishedPart> {
        if self.spilled.is_some() {
            self.write_pending().await?;
        }
        let Self { tmp, pending, spilled, hasher, header_len, dataset_len } = self;
        let (guard, memory) = match spilled {
            Some(s) => (Some(s.guard), None),
            None => (None, Some(Bytes::from(pending))),
        };
        Ok(FinishedPart {
            tmp,
            guard,
            memory,
            dataset_sha256: hex::encode(hasher.finalize()),
            file_size: header_len + dataset_len,
            dataset_len,
        })
    }
}

/// A complete instance: in memory, or in a temp file (removed when dropped).
#[derive(Debug)]
pub struct FinishedPart {
    tmp: PathBuf,
    /// The temp file, if the instance is in one.
    guard: Option<TempGuard>,
    /// The whole file's bytes while the instance is held in memory.
    memory: Option<Bytes>,
    /// SHA-256 (lowercase hex) of the data set bytes.
    pub dataset_sha256: String,
    /// Size of the whole Part 10 file.
    pub file_size: u64,
    /// Size of the data set.
    pub dataset_len: u64,
}

impl FinishedPart {
    /// Where the temp file is, if the instance is in one.
    pub fn path(&self) -> Option<&Path> {
        self.guard.as_ref().map(|g| g.path.as_path())
    }

    /// The file's bytes, while the instance is held in memory.
    pub fn bytes(&self) -> Option<&Bytes> {
        self.memory.as_ref()
    }

    /// Writes an instance held in memory to a temp file and frees the memory (blocking: call
    /// from a blocking task). Not synced: see [`Spool::sync`].
    pub fn spill(&mut self) -> io::Result<()> {
        let Some(bytes) = self.memory.take() else { return Ok(()) };
        let guard = TempGuard { path: self.tmp.join(format!("{}.part", uuid::Uuid::new_v4().simple())) };
        let mut file = fs::OpenOptions::new().write(true).create_new(true).open(&guard.path)?;
        file.write_all(&bytes)?;
        self.guard = Some(guard);
        Ok(())
    }
}

/// Where an instance's spool file goes ([`Spool::decide`]).
#[derive(Debug)]
pub enum Decision {
    /// Create the file at `path` (absolute); it will be where `placed` says.
    Create {
        /// Absolute path of the file to create.
        path: PathBuf,
        /// The placement once created.
        placed: Placed,
    },
    /// The same data set is already spooled there: nothing to write.
    Exists(Placed),
}

/// A spool path that cannot be formed (a data set hash too short for a conflict name).
fn invalid_input(e: bidsflux_session::SpoolPathError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e)
}

/// Makes sure the spool file of a journal record holds the record's bytes (blocking). A file
/// found there with other bytes (torn by a crash before the checkpoint) is kept beside it as
/// `<name>.torn-<seq>`: nothing is deleted.
fn restore(root: &Path, tmp: &Path, record: &Recovered) -> io::Result<Option<RecoveredInstance>> {
    let Ok(event) = pb::InstanceStored::decode(record.meta.as_slice()) else {
        tracing::error!(seq = record.seq, "journal record with an undecodable event skipped");
        return Ok(None);
    };
    // Checked before use, so that a damaged journal cannot write outside the spool.
    let Ok(path) = SpoolPath::parse(&event.spool_path) else {
        tracing::error!(seq = record.seq, spool_path = %event.spool_path, "journal record with an invalid path skipped");
        return Ok(None);
    };
    let series_dir = ensure_series_dir(root, &path)?;
    let target = path.to_path(root);
    match fs::read(&target) {
        Ok(bytes) if bytes == record.data => {}
        Ok(_) => {
            let aside = keep_aside(&series_dir, &path, record.seq, &target)?;
            tracing::warn!(
                spool_path = %event.spool_path,
                kept_as = %aside.display(),
                "a spool file differs from its journal record: rewritten, the other kept aside"
            );
            write_new(tmp, &target, &record.data)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => write_new(tmp, &target, &record.data)?,
        Err(e) => return Err(e),
    }
    let existing = if path.is_conflict() {
        // The file that had the plain name may be gone since (indexed and removed): the conflict
        // event then goes without it; a restart must never fail for that.
        let plain = path.plain();
        match dataset_sha256_of_file(&plain.to_path(root)) {
            Ok(dataset_sha256) => Some(Existing { relative_path: plain.to_string(), dataset_sha256 }),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), spool_path = %plain, "the original of a restored conflict file is unreadable");
                None
            }
        }
    } else {
        None
    };
    Ok(Some(RecoveredInstance { event, existing }))
}

/// Renames `target` (the file of `path`) to `<file>.torn-<seq>` (or `.torn-<seq>-<n>` if that
/// exists: an interrupted restore run again), never replacing anything.
fn keep_aside(dir: &Path, path: &SpoolPath, seq: u64, target: &Path) -> io::Result<PathBuf> {
    for n in 0..1000 {
        let aside = dir.join(path.torn_file_name(seq, n));
        let renamed = rustix::fs::renameat_with(
            rustix::fs::CWD,
            target,
            rustix::fs::CWD,
            &aside,
            rustix::fs::RenameFlags::NOREPLACE,
        );
        match renamed {
            Ok(()) => return Ok(aside),
            Err(rustix::io::Errno::EXIST) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(io::Error::new(io::ErrorKind::AlreadyExists, "too many files kept aside"))
}

/// Writes `bytes` to a temp file and renames it to `target` (blocking).
fn write_new(tmp: &Path, target: &Path, bytes: &[u8]) -> io::Result<()> {
    let guard = TempGuard { path: tmp.join(format!("{}.part", uuid::Uuid::new_v4().simple())) };
    let mut file = fs::OpenOptions::new().write(true).create_new(true).open(&guard.path)?;
    file.write_all(bytes)?;
    drop(file);
    fs::rename(&guard.path, target)
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

/// The study and series directories of `path`, created if missing (made durable by the next
/// [`Spool::sync`]); returns the series directory.
fn ensure_series_dir(root: &Path, path: &SpoolPath) -> io::Result<PathBuf> {
    ensure_dir(&SpoolPath::study_dir(root, path.study()))?;
    let dir = path.series_dir(root);
    ensure_dir(&dir)?;
    Ok(dir)
}

/// Creates `dir` if missing (its parent must exist).
fn ensure_dir(dir: &Path) -> io::Result<()> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
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
    use bidsflux_session::Uid;

    use super::*;

    /// Files in the temp directory, the pool's ready ones excluded.
    fn temp_files(root: &Path) -> usize {
        fs::read_dir(root.join(TMP_DIR))
            .unwrap()
            .filter(|e| !e.as_ref().unwrap().file_name().to_string_lossy().starts_with(pool::PREFIX))
            .count()
    }

    fn ids(study: &str) -> SpoolPath {
        SpoolPath::new(
            Uid::parse("StudyInstanceUID", study).unwrap(),
            Uid::parse("SeriesInstanceUID", "1.2.3.4").unwrap(),
            Uid::parse("SOPInstanceUID", "1.2.3.4.5").unwrap(),
        )
    }

    const META: PartMeta<'static> = PartMeta {
        sop_class_uid: "1.2.840.10008.5.1.4.1.1.4",
        sop_instance_uid: "1.2.3.4.5",
        transfer_syntax_uid: "1.2.840.10008.1.2.1",
        calling_ae_title: "SCANNER",
    };

    async fn in_memory(spool: &Spool, body: &[u8]) -> FinishedPart {
        let mut p = spool.create_part(&META).unwrap();
        for chunk in body.chunks(3) {
            p.append(chunk).await.unwrap();
        }
        p.finish().await.unwrap()
    }

    /// An instance in a temp file, as a large one would be.
    async fn part(spool: &Spool, body: &[u8]) -> FinishedPart {
        let mut p = in_memory(spool, body).await;
        p.spill().unwrap();
        p
    }

    #[tokio::test]
    async fn header_is_part10_and_hash_covers_the_data_set_only() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).await.unwrap();
        let body = b"\x08\x00\x16\x00some data set bytes!";
        let mut p = in_memory(&spool, body).await;
        assert!(p.path().is_none(), "a small instance stays in memory");
        let bytes = p.bytes().unwrap().to_vec();
        let head: [u8; 144] = bytes[..144].try_into().unwrap();
        let offset = dataset_offset(&head).unwrap() as usize;
        assert_eq!(&bytes[offset..], body);
        assert_eq!(bytes.len() as u64, p.file_size);
        assert_eq!(p.dataset_sha256, hex::encode(Sha256::digest(body)));
        p.spill().unwrap();
        assert!(p.bytes().is_none(), "spilling frees the memory");
        assert_eq!(fs::read(p.path().unwrap()).unwrap(), bytes);
        assert_eq!(dataset_sha256_of_file(p.path().unwrap()).unwrap(), p.dataset_sha256);
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
        assert_eq!(temp_files(dir.path()), 1);
        let done = p.finish().await.unwrap();
        assert!(done.bytes().is_none());
        let bytes = fs::read(done.path().unwrap()).unwrap();
        assert_eq!(bytes.len() as u64, done.file_size);
        assert_eq!(&bytes[bytes.len() - body.len()..], &body[..]);
        assert_eq!(dataset_sha256_of_file(done.path().unwrap()).unwrap(), done.dataset_sha256);
        drop(done);
        assert_eq!(temp_files(dir.path()), 0);
    }

    #[tokio::test]
    async fn temp_files_are_removed_on_drop_and_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).await.unwrap();
        let p = spool.create_part(&META).unwrap();
        drop(p);
        assert_eq!(temp_files(dir.path()), 0);
        fs::write(dir.path().join(TMP_DIR).join("stale.part"), b"x").unwrap();
        Spool::open(dir.path()).await.unwrap();
        assert_eq!(temp_files(dir.path()), 0);
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
        assert_eq!(temp_files(dir.path()), 0);

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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn journaled_instances_are_written_and_restored_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        // No checkpoint during the test: what the journal holds is what a crash would leave.
        let options =
            JournalOptions { checkpoint_interval: std::time::Duration::from_secs(3600), ..Default::default() };
        let spool = Spool::open_with(dir.path(), options).await.unwrap();
        let ids = ids("1.2.3");
        let event = |placed: &Placed| pb::InstanceStored {
            sop_instance_uid: "1.2.3.4.5".into(),
            spool_path: placed.relative_path.clone(),
            ..Default::default()
        };

        let first = in_memory(&spool, b"first data set").await;
        let Decision::Create { path, placed } = spool.decide(&first.dataset_sha256, first.file_size, &ids).unwrap()
        else {
            panic!("expected a new file")
        };
        assert_eq!((placed.placement, placed.relative_path.as_str()), (Placement::New, "1.2.3/1.2.3.4/1.2.3.4.5.dcm"));
        let tmp = spool.write_temp(first.bytes().unwrap()).unwrap();
        spool.journal(&event(&placed), first.bytes().unwrap().clone(), &tmp, path.clone()).await.unwrap();
        assert_eq!(fs::read(&path).unwrap(), first.bytes().unwrap().as_ref());

        // The same bytes again: nothing to write.
        match spool.decide(&first.dataset_sha256, first.file_size, &ids).unwrap() {
            Decision::Exists(p) => assert_eq!(p.placement, Placement::Duplicate),
            d => panic!("expected the existing file, got {d:?}"),
        }
        // Other bytes: a conflict file beside it.
        let other = in_memory(&spool, b"other data set").await;
        let Decision::Create { path: conflict_path, placed: conflict } =
            spool.decide(&other.dataset_sha256, other.file_size, &ids).unwrap()
        else {
            panic!("expected a conflict file")
        };
        assert_eq!(conflict.placement, Placement::Conflict);
        assert_eq!(conflict.existing.as_ref().unwrap().dataset_sha256, first.dataset_sha256);
        let tmp = spool.write_temp(other.bytes().unwrap()).unwrap();
        spool.journal(&event(&conflict), other.bytes().unwrap().clone(), &tmp, conflict_path.clone()).await.unwrap();

        // Power loss before any checkpoint: the first file comes back torn, the conflict file lost.
        std::mem::forget(spool);
        fs::write(&path, b"torn").unwrap();
        fs::remove_file(&conflict_path).unwrap();

        let spool = Spool::open(dir.path()).await.unwrap();
        assert_eq!(fs::read(&path).unwrap(), first.bytes().unwrap().as_ref(), "rewritten from the journal");
        assert_eq!(fs::read(&conflict_path).unwrap(), other.bytes().unwrap().as_ref(), "restored from the journal");
        let torn: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.contains(".torn-"))
            .collect();
        assert_eq!(torn.len(), 1, "the torn file is kept aside, not deleted");
        assert_eq!(fs::read(path.with_file_name(&torn[0])).unwrap(), b"torn");
        let recovered = spool.take_recovered();
        let paths: Vec<_> = recovered.iter().map(|r| r.event.spool_path.as_str()).collect();
        assert_eq!(paths, [placed.relative_path.as_str(), conflict.relative_path.as_str()]);
        assert_eq!(recovered[1].existing.as_ref().unwrap().relative_path, placed.relative_path);
        assert!(spool.take_recovered().is_empty(), "handed out once");
        drop(spool);

        // Restored and checkpointed: a third start finds nothing to do.
        let spool = Spool::open(dir.path()).await.unwrap();
        assert!(spool.take_recovered().is_empty());
    }

    #[test]
    fn journaled_paths_are_checked_before_use() {
        assert!(SpoolPath::parse("1.2.3/1.2.3.4/1.2.3.4.5.dcm").is_ok());
        assert!(SpoolPath::parse("1.2.3/1.2.3.4/1.2.3.4.5.dcm.conflict-0123456789abcdef").is_ok());
        for bad in [
            "../1.2/1.2.3.dcm",
            "1.2.3/../1.2.3.dcm",
            "1.2.3/1.2.3.4/1.2.3.4.5.dcm/x",
            "/1.2.3/1.2.3.4/1.2.3.4.5.dcm",
            "1.2.3/1.2.3.4/1.2.3.4.5.dcm.conflict-../../x",
            "1.2.3/1.2.3.4/evil.dcm",
            "1.2.3/1.2.3.4",
        ] {
            assert!(SpoolPath::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
