//! Domain types of one scanning session, shared by every service.
//!
//! - [`uid`]: DICOM UID validation, done before a UID touches a path.
//! - [`metas`]: the session metas read from the first DICOM of a study.
//! - [`template`]: the safe renderer of `S3_URL_PATTERN` and
//!   `GITLAB_INDEXER_GROUP_TEMPLATE` as the original rendered them (`^` is `/`),
//!   without eval; values unsafe in a path are refused.
//! - [`s3`]: bucket naming and key placement of study archives.
//! - [`annex`]: git-annex keys, computed the way git-annex computes them.
//! - [`spool`]: the spool layout the receiver writes and the uploader reads.
//!
//! Patient values (PatientID, PatientName, StudyDate) may be rendered into a
//! bucket, a key prefix or a forge project path when a site's templates use
//! them ([`metas::PATIENT_VARIABLES`]). Such results are shown as [`REDACTED`]
//! in logs, spans and errors; [`redact`] scrubs them from other text.

pub mod annex;
pub mod metas;
pub mod s3;
pub mod spool;
pub mod template;
pub mod uid;

pub use metas::SessionMetas;
pub use spool::{SpoolPath, SpoolPathError};
pub use template::{RenderError, Template, TemplateError};
pub use uid::{Uid, UidError, instance_fingerprint};

/// What logs, spans and errors show instead of a value rendered from patient data.
pub const REDACTED: &str = "[redacted]";

/// `text` with every occurrence of each non-empty string of `hidden` replaced
/// by [`REDACTED`] (longest first, so a value inside another is not half-shown).
///
/// For error texts of other programs (git, S3 servers) that may quote a path
/// or URL rendered from patient values.
pub fn redact(text: &str, hidden: &[&str]) -> String {
    let mut hidden: Vec<&str> = hidden.iter().copied().filter(|h| !h.is_empty()).collect();
    hidden.sort_by_key(|h| std::cmp::Reverse(h.len()));
    if hidden.is_empty() {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        match hidden.iter().find(|h| rest.starts_with(**h)) {
            Some(h) => {
                out.push_str(REDACTED);
                rest = &rest[h.len()..];
            }
            None => {
                out.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_replaces_every_occurrence() {
        assert_eq!(redact("a/P001/b P001", &["P001"]), "a/[redacted]/b [redacted]");
        assert_eq!(redact("x/PI/P001/y", &["P001", "PI/P001"]), "x/[redacted]/y");
        assert_eq!(redact("nothing", &["", "zzz"]), "nothing");
        assert_eq!(redact("red is redacted", &["red"]), "[redacted] is [redacted]acted");
        assert_eq!(redact("Müller/x", &["Müller"]), "[redacted]/x");
    }
}
