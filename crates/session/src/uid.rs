//! DICOM unique identifiers (PS3.5 §9): digits and dots, at most 64 characters.
//!
//! Every UID is validated with [`Uid::parse`] before it is used in a file
//! name, an object key or a project path, so `..`, `/` and other hostile
//! values never reach the file system.

use std::fmt;

/// A validated DICOM UID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Uid(String);

/// Why a UID was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UidError {
    /// No value.
    #[error("{what} is missing or empty")]
    Empty {
        /// Which UID (e.g. "StudyInstanceUID").
        what: &'static str,
    },
    /// Longer than 64 characters.
    #[error("{what} is {len} characters long (at most 64 allowed)")]
    TooLong {
        /// Which UID.
        what: &'static str,
        /// Its length.
        len: usize,
    },
    /// Contains something else than digits and dots, or an empty component.
    #[error("{what} is not a DICOM UID (digits and single dots only)")]
    Invalid {
        /// Which UID.
        what: &'static str,
    },
}

/// The 8-byte fingerprint of a SOP Instance UID: the first 8 bytes of its SHA-256, big endian.
///
/// Study-completion keeps one per distinct instance, in arrival order, in the study's state
/// (`StudyState.instance_hashes`); the uploader picks a generation's files by them. One
/// definition, as both must compute the same number.
pub fn instance_fingerprint(sop_instance_uid: &str) -> u64 {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest(sop_instance_uid.as_bytes());
    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

impl Uid {
    /// Validates `value` (trailing NUL/space padding removed) as the UID named `what`.
    pub fn parse(what: &'static str, value: &str) -> Result<Self, UidError> {
        let v = value.trim_end_matches(['\0', ' ']).trim_start();
        if v.is_empty() {
            return Err(UidError::Empty { what });
        }
        if v.len() > 64 {
            return Err(UidError::TooLong { what, len: v.len() });
        }
        let ok = v.split('.').all(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()));
        if !ok {
            return Err(UidError::Invalid { what });
        }
        Ok(Self(v.to_owned()))
    }

    /// Validates `value` as the UID named `what` when it is exactly that UID,
    /// without the padding [`Uid::parse`] removes: for names in the file system
    /// (a directory `1.2.3 ` is not the directory `1.2.3`).
    pub fn parse_exact(what: &'static str, value: &str) -> Result<Self, UidError> {
        let uid = Self::parse(what, value)?;
        if uid.as_str() != value {
            return Err(UidError::Invalid { what });
        }
        Ok(uid)
    }

    /// The UID as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Uid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Uid {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_fingerprints_are_the_first_8_bytes_of_sha256() {
        // python3 -c "import hashlib; print(int.from_bytes(hashlib.sha256(b'1.2.840.10008.1.1').digest()[:8], 'big'))"
        assert_eq!(instance_fingerprint("1.2.840.10008.1.1"), 8833518850329136391);
    }

    #[test]
    fn accepts_uids_and_strips_padding() {
        assert_eq!(Uid::parse("x", "1.2.840.10008.5.1.4.1.1.4\0").unwrap().as_str(), "1.2.840.10008.5.1.4.1.1.4");
        assert_eq!(Uid::parse("x", "1.2.3 ").unwrap().as_str(), "1.2.3");
    }

    #[test]
    fn rejects_hostile_values() {
        for bad in ["..", "../etc", "1.2/3", "1..2", ".1.2", "1.2.", "1.2.a", "1.2.3\n", "1 2"] {
            assert!(Uid::parse("StudyInstanceUID", bad).is_err(), "{bad:?} accepted");
        }
        assert!(matches!(Uid::parse("x", ""), Err(UidError::Empty { .. })));
        let long = format!("1.{}", "2".repeat(70));
        assert!(matches!(Uid::parse("x", &long), Err(UidError::TooLong { .. })));
        assert!(Uid::parse("x", &"1".repeat(64)).is_ok());
    }

    #[test]
    fn exact_uids_have_no_padding() {
        assert_eq!(Uid::parse_exact("x", "1.2.3").unwrap().as_str(), "1.2.3");
        for padded in ["1.2.3 ", " 1.2.3", "1.2.3\0"] {
            assert!(matches!(Uid::parse_exact("x", padded), Err(UidError::Invalid { .. })), "{padded:?} accepted");
        }
        assert!(matches!(Uid::parse_exact("x", ""), Err(UidError::Empty { .. })));
    }
}
