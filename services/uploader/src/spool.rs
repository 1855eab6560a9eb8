//! Reading a study from the receiver's spool (never writing to it).
//!
//! Layout: `<spool>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`,
//! defined by [`SpoolPath`]. Only entries that follow it are part of the
//! study; anything else (temp files, conflict and torn files, stray names) is
//! counted and left out.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use bidsflux_messaging::{Classify, ErrorClass};
use bidsflux_proto::v1::FailureKind;
use bidsflux_session::{SessionMetas, SpoolPath, Uid};
use dicom_dictionary_std::tags;
use md5::{Digest as _, Md5};
use sha2::Sha256;

/// One DICOM file of the study.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolFile {
    /// Path relative to the spool root (`<study>/<series>/<sop>.dcm`), also
    /// the path inside the archive.
    pub rel_path: String,
    /// SeriesInstanceUID (its directory name).
    pub series_instance_uid: Uid,
    /// SOPInstanceUID (its file name).
    pub sop_instance_uid: Uid,
}

/// The files of a study, sorted by path.
#[derive(Debug, Clone)]
pub struct StudyFiles {
    /// `<spool>/<study>`.
    pub dir: PathBuf,
    /// Files in sorted order (the archive order).
    pub files: Vec<SpoolFile>,
    /// Entries that do not follow the layout and were left out.
    pub ignored: usize,
    /// Instances of other generations, left for their own archive.
    pub other_generations: usize,
}

/// Why a study cannot be read from the spool.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// `<spool>/<study>` does not exist.
    #[error("spool directory {dir} of the study does not exist")]
    NoStudyDir {
        /// The directory.
        dir: PathBuf,
    },
    /// Fewer files than the completion announced.
    #[error("spool directory {dir} holds {found} DICOM files but the completion announced {expected}")]
    TooFew {
        /// The directory.
        dir: PathBuf,
        /// Files found.
        found: usize,
        /// `instance_count` of the completion.
        expected: u64,
    },
    /// The study directory holds no DICOM file at all.
    #[error("spool directory {dir} of the study holds no DICOM file")]
    Empty {
        /// The directory.
        dir: PathBuf,
    },
    /// A file is not DICOM Part 10 (or is unreadable as such).
    #[error("{path} is not a readable DICOM Part 10 file: {reason}")]
    NotDicom {
        /// The file (UIDs only).
        path: String,
        /// Cause.
        reason: String,
    },
    /// The first file's StudyInstanceUID differs from the spool directory's.
    #[error("{path} has a StudyInstanceUID different from its spool directory")]
    WrongStudy {
        /// The file.
        path: String,
    },
    /// The first file's StudyInstanceUID is not a UID.
    #[error("{path}: {source}")]
    BadUid {
        /// The file.
        path: String,
        /// Cause.
        source: bidsflux_session::UidError,
    },
    /// The file system failed (worth retrying).
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
}

impl SpoolError {
    /// Whether retrying may help (I/O trouble rather than bad data).
    pub fn is_transient(&self) -> bool {
        self.class() == ErrorClass::Transient
    }
}

impl Classify for SpoolError {
    /// I/O trouble is retried; a study the spool does not hold (any more) cannot heal by
    /// retrying; a file that is not what the layout promises is invalid input.
    fn class(&self) -> ErrorClass {
        match self {
            Self::Io { .. } => ErrorClass::Transient,
            Self::NoStudyDir { .. } | Self::TooFew { .. } | Self::Empty { .. } => {
                ErrorClass::Permanent(FailureKind::Permanent)
            }
            _ => ErrorClass::Permanent(FailureKind::InvalidInput),
        }
    }
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SpoolError {
    let path = path.to_path_buf();
    move |source| SpoolError::Io { what, path, source }
}

/// The studies with a directory in the spool (names that are StudyInstanceUIDs; the receiver's
/// `.tmp/` and `.journal/` and anything else are skipped).
pub fn study_dirs(spool: &Path) -> io::Result<Vec<Uid>> {
    let mut studies = Vec::new();
    for entry in std::fs::read_dir(spool)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(uid) = name.to_str().and_then(|n| Uid::parse_exact("StudyInstanceUID", n).ok()) else { continue };
        if entry.file_type()?.is_dir() {
            studies.push(uid);
        }
    }
    studies.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    Ok(studies)
}

/// Lists the files of `study` in `spool` whose SOP Instance UID `belongs` (to the generation
/// being archived), checking that at least `expected` are there.
pub fn list_study(
    spool: &Path,
    study: &Uid,
    expected: u64,
    belongs: &dyn Fn(&Uid) -> bool,
) -> Result<StudyFiles, SpoolError> {
    let dir = SpoolPath::study_dir(spool, study);
    if !dir.is_dir() {
        return Err(SpoolError::NoStudyDir { dir });
    }
    let mut files = Vec::new();
    let (mut ignored, mut other_generations) = (0, 0);
    for series in std::fs::read_dir(&dir).map_err(io_err("read directory", &dir))? {
        let series = series.map_err(io_err("read directory", &dir))?;
        let series_path = series.path();
        let series_name = series.file_name();
        let series_name = series_name.to_str().filter(|n| Uid::parse_exact("SeriesInstanceUID", n).is_ok());
        let Some(series_name) = series_name.filter(|_| series_path.is_dir()) else {
            ignored += 1;
            continue;
        };
        for entry in std::fs::read_dir(&series_path).map_err(io_err("read directory", &series_path))? {
            let entry = entry.map_err(io_err("read directory", &series_path))?;
            let name = entry.file_name();
            let path = name.to_str().and_then(|n| SpoolPath::from_names(study.as_str(), series_name, n).ok());
            match path {
                Some(path) if !path.is_conflict() && !belongs(path.sop()) => other_generations += 1,
                Some(path) if !path.is_conflict() && entry.path().is_file() => files.push(SpoolFile {
                    rel_path: path.to_string(),
                    series_instance_uid: path.series().clone(),
                    sop_instance_uid: path.sop().clone(),
                }),
                _ => ignored += 1,
            }
        }
    }
    files.sort_by(|a, b| a.rel_path.cmp(&b.rel_path));
    if (files.len() as u64) < expected {
        return Err(SpoolError::TooFew { dir, found: files.len(), expected });
    }
    Ok(StudyFiles { dir, files, ignored, other_generations })
}

/// Reads the session metas from `file` (the first of the study), checking
/// that it belongs to `study`.
pub fn read_metas(spool: &Path, file: &SpoolFile, study: &Uid) -> Result<SessionMetas, SpoolError> {
    let path = spool.join(&file.rel_path);
    let not_dicom = |reason: String| SpoolError::NotDicom { path: file.rel_path.clone(), reason };
    let obj = dicom_object::OpenFileOptions::new()
        .read_until(tags::PIXEL_DATA)
        .open_file(&path)
        .map_err(|e| not_dicom(e.to_string()))?;
    let text = |tag| -> String {
        obj.element_opt(tag).ok().flatten().and_then(|e| e.to_str().ok()).map(|s| s.into_owned()).unwrap_or_default()
    };
    let study_uid = text(tags::STUDY_INSTANCE_UID);
    let metas = SessionMetas::from_raw(
        &study_uid,
        &text(tags::PATIENT_ID),
        &text(tags::PATIENT_NAME),
        &text(tags::REFERRING_PHYSICIAN_NAME),
        &text(tags::STUDY_DATE),
        &text(tags::STUDY_DESCRIPTION),
    )
    .map_err(|source| SpoolError::BadUid { path: file.rel_path.clone(), source })?;
    if &metas.study_instance_uid != study {
        return Err(SpoolError::WrongStudy { path: file.rel_path.clone() });
    }
    Ok(metas)
}

/// Size and digests of a byte stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digests {
    /// Bytes.
    pub size: u64,
    /// MD5, lowercase hex.
    pub md5: String,
    /// SHA-256, lowercase hex.
    pub sha256: String,
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    md5: Md5,
    sha256: Sha256,
    size: u64,
}

impl<R: Read> Hashing<R> {
    fn new(inner: R) -> Self {
        Self { inner, md5: Md5::new(), sha256: Sha256::new(), size: 0 }
    }

    /// Reads the rest and returns the digests of everything read.
    fn finish(mut self) -> io::Result<Digests> {
        io::copy(&mut self, &mut io::sink())?;
        Ok(Digests {
            size: self.size,
            md5: hex::encode(self.md5.finalize()),
            sha256: hex::encode(self.sha256.finalize()),
        })
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.md5.update(&buf[..n]);
        self.sha256.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
}

/// Hashes a file, streaming it from disk.
pub fn hash_file(path: &Path) -> Result<Digests, SpoolError> {
    let file = File::open(path).map_err(io_err("open", path))?;
    Hashing::new(BufReader::with_capacity(1 << 20, file)).finish().map_err(io_err("read", path))
}

/// A spool file with its digests and SOP Class UID (from its file meta group).
#[derive(Debug, Clone)]
pub struct HashedFile {
    /// The file.
    pub file: SpoolFile,
    /// Its digests.
    pub digests: Digests,
    /// MediaStorageSOPClassUID.
    pub sop_class_uid: String,
}

/// Hashes a spool file and reads its file meta group in the same pass.
pub fn hash_dicom(spool: &Path, file: &SpoolFile) -> Result<HashedFile, SpoolError> {
    let path = spool.join(&file.rel_path);
    let f = File::open(&path).map_err(io_err("open", &path))?;
    let mut reader = Hashing::new(BufReader::with_capacity(1 << 20, f));
    let not_dicom = |reason: String| SpoolError::NotDicom { path: file.rel_path.clone(), reason };
    let mut preamble = [0u8; 128];
    reader.read_exact(&mut preamble).map_err(|e| not_dicom(format!("no preamble: {e}")))?;
    let meta = dicom_object::FileMetaTable::from_reader(&mut reader).map_err(|e| not_dicom(e.to_string()))?;
    let sop_class_uid = meta.media_storage_sop_class_uid().trim_end_matches(['\0', ' ']).to_owned();
    let digests = reader.finish().map_err(io_err("read", &path))?;
    Ok(HashedFile { file: file.clone(), digests, sop_class_uid })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_known_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        let d = hash_file(&p).unwrap();
        assert_eq!(d.size, 3);
        assert_eq!(d.md5, "900150983cd24fb0d6963f7d28e17f72");
        assert_eq!(d.sha256, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn listing_follows_the_layout_and_counts() {
        let spool = tempfile::tempdir().unwrap();
        let study = Uid::parse("StudyInstanceUID", "1.2.3").unwrap();
        let s = spool.path().join("1.2.3");
        std::fs::create_dir_all(s.join("1.2.3.5")).unwrap();
        std::fs::create_dir_all(s.join("1.2.3.4")).unwrap();
        std::fs::create_dir_all(s.join(".tmp")).unwrap();
        std::fs::write(s.join("1.2.3.5/9.dcm"), b"x").unwrap();
        std::fs::write(s.join("1.2.3.4/10.dcm"), b"x").unwrap();
        std::fs::write(s.join("1.2.3.4/2.dcm"), b"x").unwrap();
        std::fs::write(s.join("1.2.3.4/notes.txt"), b"x").unwrap();
        let all = |_: &Uid| true;
        let l = list_study(spool.path(), &study, 3, &all).unwrap();
        let paths: Vec<_> = l.files.iter().map(|f| f.rel_path.as_str()).collect();
        assert_eq!(paths, ["1.2.3/1.2.3.4/10.dcm", "1.2.3/1.2.3.4/2.dcm", "1.2.3/1.2.3.5/9.dcm"]);
        assert_eq!(l.ignored, 2);
        let e = list_study(spool.path(), &study, 4, &all).unwrap_err().to_string();
        assert!(e.contains("holds 3") && e.contains("announced 4"), "{e}");
        let other = Uid::parse("StudyInstanceUID", "1.2.4").unwrap();
        assert!(matches!(list_study(spool.path(), &other, 1, &all), Err(SpoolError::NoStudyDir { .. })));
        // Another generation's instances are left out, and not counted.
        let l = list_study(spool.path(), &study, 2, &|sop| sop.as_str() != "9").unwrap();
        let paths: Vec<_> = l.files.iter().map(|f| f.rel_path.as_str()).collect();
        assert_eq!(paths, ["1.2.3/1.2.3.4/10.dcm", "1.2.3/1.2.3.4/2.dcm"]);
        assert_eq!((l.ignored, l.other_generations), (2, 1));
        let e = list_study(spool.path(), &study, 3, &|sop| sop.as_str() != "9").unwrap_err().to_string();
        assert!(e.contains("holds 2") && e.contains("announced 3"), "{e}");
    }
}
