//! The spool layout, the contract between the receiver (which writes the
//! spool) and the uploader (which reads it and deletes what was indexed).
//!
//! An instance is spooled at `<spool>/<study>/<series>/<sop>.dcm`, each of
//! `<study>`, `<series>` and `<sop>` exactly a DICOM UID ([`Uid::parse_exact`]:
//! no padding, no `..`, no `/`). When a different data set arrives under a SOP
//! Instance UID already spooled, it is kept beside the first one as
//! `<sop>.dcm.conflict-<first 16 hex digits of its data set SHA-256>`.
//!
//! [`SpoolPath`] is the one place that formats and parses these names. Every
//! other entry (the receiver's `.tmp/` and `.journal/` at the root, torn files
//! kept aside as `<name>.torn-<seq>` by its crash recovery, stray files) does
//! not parse and is therefore never taken for an instance.

use std::fmt;
use std::path::{Component, Path, PathBuf};

use crate::uid::{Uid, UidError};

/// Extension of a spooled instance's file name.
const EXTENSION: &str = ".dcm";
/// What follows `<sop>.dcm` in a conflict file's name, before the hash.
const CONFLICT_INFIX: &str = ".conflict-";
/// What follows a file name, before the journal sequence number, in the name of a torn file kept aside.
const TORN_INFIX: &str = ".torn-";
/// Hex digits of the data set SHA-256 in a conflict file's name.
pub const CONFLICT_HASH_LEN: usize = 16;

/// Why a path is not a spool path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpoolPathError {
    /// Not three components `<study>/<series>/<file>` (or not under the spool root).
    #[error("spool path is not <study>/<series>/<sop>.dcm")]
    Layout,
    /// A directory or file name is not exactly a UID.
    #[error("spool path: {0}")]
    Uid(#[from] UidError),
    /// The file name is neither `<sop>.dcm` nor its conflict name.
    #[error("spool file name is not <SOPInstanceUID>.dcm or <SOPInstanceUID>.dcm.conflict-<16 hex digits>")]
    FileName,
    /// A conflict needs at least 16 hex digits of the data set's SHA-256.
    #[error("a conflict file name needs at least 16 hex digits of the data set SHA-256")]
    ConflictHash,
}

/// Where one instance is in the spool, relative to the spool root.
///
/// Formats as `<study>/<series>/<sop>.dcm` (or its conflict name) with
/// [`fmt::Display`]; that text is also the instance's path in the study
/// archive and its manifest, and `InstanceStored.spool_path`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpoolPath {
    /// StudyInstanceUID: the study directory.
    study: Uid,
    /// SeriesInstanceUID: the series directory.
    series: Uid,
    /// SOPInstanceUID: the file name, without its extension.
    sop: Uid,
    /// For a conflict file: the 16 hex digits after `.conflict-`, as written.
    conflict: Option<String>,
}

impl SpoolPath {
    /// The plain path `<study>/<series>/<sop>.dcm` of an instance.
    pub fn new(study: Uid, series: Uid, sop: Uid) -> Self {
        Self { study, series, sop, conflict: None }
    }

    /// The conflict file of this instance for a data set with SHA-256
    /// `dataset_sha256` (hex): `<sop>.dcm.conflict-<its first 16 digits>`.
    pub fn conflict(&self, dataset_sha256: &str) -> Result<Self, SpoolPathError> {
        let hash = dataset_sha256.get(..CONFLICT_HASH_LEN).ok_or(SpoolPathError::ConflictHash)?;
        if !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(SpoolPathError::ConflictHash);
        }
        Ok(Self { conflict: Some(hash.to_owned()), ..self.plain() })
    }

    /// Parses a path relative to the spool root, `/`-separated.
    pub fn parse(relative: &str) -> Result<Self, SpoolPathError> {
        let mut parts = relative.split('/');
        let (Some(study), Some(series), Some(file), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(SpoolPathError::Layout);
        };
        Self::from_names(study, series, file)
    }

    /// Parses a path under the spool root `root` (both as the file system
    /// gives them: `root` joined with a relative spool path).
    pub fn parse_under(root: &Path, path: &Path) -> Result<Self, SpoolPathError> {
        let relative = path.strip_prefix(root).map_err(|_| SpoolPathError::Layout)?;
        let mut names = relative.components().map(|c| match c {
            Component::Normal(name) => name.to_str().ok_or(SpoolPathError::Layout),
            _ => Err(SpoolPathError::Layout),
        });
        let (Some(study), Some(series), Some(file), None) = (names.next(), names.next(), names.next(), names.next())
        else {
            return Err(SpoolPathError::Layout);
        };
        Self::from_names(study?, series?, file?)
    }

    /// Parses the three names of a spool path: the study directory, the series
    /// directory and the file name (for code that walks the directories).
    pub fn from_names(study: &str, series: &str, file: &str) -> Result<Self, SpoolPathError> {
        let study = Uid::parse_exact("StudyInstanceUID", study)?;
        let series = Uid::parse_exact("SeriesInstanceUID", series)?;
        // A UID holds no letters, so the first `.dcm` ends it.
        let (sop, rest) = file.split_once(EXTENSION).ok_or(SpoolPathError::FileName)?;
        let sop = Uid::parse_exact("SOPInstanceUID", sop)?;
        let conflict = if rest.is_empty() {
            None
        } else {
            let hash = rest.strip_prefix(CONFLICT_INFIX).ok_or(SpoolPathError::FileName)?;
            if hash.len() != CONFLICT_HASH_LEN || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(SpoolPathError::FileName);
            }
            Some(hash.to_owned())
        };
        Ok(Self { study, series, sop, conflict })
    }

    /// StudyInstanceUID.
    pub fn study(&self) -> &Uid {
        &self.study
    }

    /// SeriesInstanceUID.
    pub fn series(&self) -> &Uid {
        &self.series
    }

    /// SOPInstanceUID.
    pub fn sop(&self) -> &Uid {
        &self.sop
    }

    /// Whether this is a conflict file (a second data set under the same SOP Instance UID).
    pub fn is_conflict(&self) -> bool {
        self.conflict.is_some()
    }

    /// The plain path of the instance (itself, unless a conflict file).
    pub fn plain(&self) -> Self {
        Self { conflict: None, ..self.clone() }
    }

    /// The file name: `<sop>.dcm` or `<sop>.dcm.conflict-<hash>`.
    pub fn file_name(&self) -> String {
        match &self.conflict {
            None => format!("{}{EXTENSION}", self.sop),
            Some(hash) => format!("{}{EXTENSION}{CONFLICT_INFIX}{hash}", self.sop),
        }
    }

    /// The name a file found torn at this path is kept aside under by the
    /// receiver's crash recovery: `<file name>.torn-<seq>`, or
    /// `<file name>.torn-<seq>-<n>` for `n > 0`. Never a spool path.
    pub fn torn_file_name(&self, seq: u64, n: u32) -> String {
        match n {
            0 => format!("{}{TORN_INFIX}{seq}", self.file_name()),
            n => format!("{}{TORN_INFIX}{seq}-{n}", self.file_name()),
        }
    }

    /// The study directory `<root>/<study>`.
    pub fn study_dir(root: &Path, study: &Uid) -> PathBuf {
        root.join(study.as_str())
    }

    /// The series directory `<root>/<study>/<series>` of this file.
    pub fn series_dir(&self, root: &Path) -> PathBuf {
        Self::study_dir(root, &self.study).join(self.series.as_str())
    }

    /// The file under the spool root `root`.
    pub fn to_path(&self, root: &Path) -> PathBuf {
        self.series_dir(root).join(self.file_name())
    }
}

impl fmt::Display for SpoolPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.study, self.series, self.file_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uid(v: &str) -> Uid {
        Uid::parse("x", v).unwrap()
    }

    const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn formats_and_parses_round_trip() {
        let p = SpoolPath::new(uid("1.2.3"), uid("1.2.3.4"), uid("1.2.3.4.5"));
        assert_eq!(p.to_string(), "1.2.3/1.2.3.4/1.2.3.4.5.dcm");
        assert_eq!(p.file_name(), "1.2.3.4.5.dcm");
        assert!(!p.is_conflict());
        assert_eq!(SpoolPath::parse(&p.to_string()).unwrap(), p);
        let root = Path::new("/spool");
        assert_eq!(p.to_path(root), Path::new("/spool/1.2.3/1.2.3.4/1.2.3.4.5.dcm"));
        assert_eq!(p.series_dir(root), Path::new("/spool/1.2.3/1.2.3.4"));
        assert_eq!(SpoolPath::study_dir(root, p.study()), Path::new("/spool/1.2.3"));
        assert_eq!(SpoolPath::parse_under(root, &p.to_path(root)).unwrap(), p);
        assert_eq!((p.study().as_str(), p.series().as_str(), p.sop().as_str()), ("1.2.3", "1.2.3.4", "1.2.3.4.5"));
    }

    #[test]
    fn conflict_names_round_trip() {
        let p = SpoolPath::new(uid("1.2.3"), uid("1.2.3.4"), uid("1.2.3.4.5"));
        let c = p.conflict(SHA).unwrap();
        assert_eq!(c.to_string(), "1.2.3/1.2.3.4/1.2.3.4.5.dcm.conflict-0123456789abcdef");
        assert!(c.is_conflict());
        assert_eq!(c.plain(), p);
        assert_eq!(SpoolPath::parse(&c.to_string()).unwrap(), c);
        assert_eq!(SpoolPath::parse_under(Path::new("r"), &c.to_path(Path::new("r"))).unwrap(), c);
        assert_eq!(c.conflict(SHA).unwrap(), c, "the conflict name of a conflict file is the same name");
        assert_eq!(c.torn_file_name(7, 0), "1.2.3.4.5.dcm.conflict-0123456789abcdef.torn-7");
        assert_eq!(p.torn_file_name(7, 2), "1.2.3.4.5.dcm.torn-7-2");
        assert!(
            SpoolPath::from_names("1.2.3", "1.2.3.4", &p.torn_file_name(7, 0)).is_err(),
            "torn files are not instances"
        );
        assert_eq!(p.conflict("0123456789abcde"), Err(SpoolPathError::ConflictHash), "too short");
        assert_eq!(p.conflict("0123456789abcdeg00"), Err(SpoolPathError::ConflictHash), "not hex");
    }

    #[test]
    fn refuses_what_is_not_the_layout() {
        for bad in [
            "../1.2/1.2.3.dcm",
            "1.2.3/../1.2.3.dcm",
            "1.2.3/1.2.3.4/../x.dcm",
            "1.2.3/1.2.3.4/1.2.3.4.5.dcm/x",
            "/1.2.3/1.2.3.4/1.2.3.4.5.dcm",
            "1.2.3/1.2.3.4/1.2.3.4.5.dcm.conflict-../../x",
            "1.2.3/1.2.3.4/1.2.3.4.5.dcm.conflict-0123",
            "1.2.3/1.2.3.4/1.2.3.4.5.dcm.torn-7",
            "1.2.3/1.2.3.4/evil.dcm",
            "1.2.3/1.2.3.4/1.2.3.4.5.txt",
            "1.2.3/1.2.3.4/1.2.3.4.5",
            "1.2.3/1.2.3.4/1.2.3.4.5.DCM",
            "1.2.3/1.2.3.4/1.2.3.4.5 .dcm",
            "1.2.3 /1.2.3.4/1.2.3.4.5.dcm",
            "1.2.3/.tmp/1.2.3.4.5.dcm",
            "1.2.3/1.2.3.4",
            "1.2.3/1.2.3.4/",
            "1.2.3//1.2.3.4.5.dcm",
            "",
        ] {
            assert!(SpoolPath::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(matches!(SpoolPath::parse("a/1.2/1.2.3.dcm"), Err(SpoolPathError::Uid(UidError::Invalid { .. }))));
        let root = Path::new("/spool");
        for bad in ["/elsewhere/1.2/1.2.3/1.2.3.4.dcm", "/spool/1.2/../1.2/1.2.3.dcm", "/spool/1.2/1.2.3"] {
            assert!(SpoolPath::parse_under(root, Path::new(bad)).is_err(), "{bad:?} accepted");
        }
    }
}
