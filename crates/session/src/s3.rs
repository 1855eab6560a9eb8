//! Where a study's archive goes in S3.
//!
//! `S3_URL_PATTERN` has the original BIDS-flux form
//! `s3://HOST[:PORT]/BUCKET_TEMPLATE[/PREFIX_TEMPLATE]`, e.g.
//! `s3://s3.example.org/test.{ReferringPhysicianName}.{StudyDescriptionPath[1]}.dicoms`.
//! As in the original, the whole path is rendered first and split after:
//! the bucket is the first element of the *rendered* path, the key prefix
//! (git-annex's `fileprefix`) is the rest plus `/<StudyInstanceUID>/` (just
//! `<StudyInstanceUID>/` when there is no rest). A PersonName spans segments
//! (`^` is `/`): `test.Smith^John.Study1.dicoms` gives the bucket `test.smith`
//! and the prefix `John.Study1.dicoms/<StudyInstanceUID>/`.
//!
//! S3 refuses most bucket names a template renders from DICOM values
//! (capitals, spaces, underscores). [`bucket_name`] defines the mapping; see
//! `docs/s3-placement.md`.
//!
//! When the bucket or prefix template uses a patient variable (PatientID,
//! PatientName, StudyDate), the rendered bucket or prefix is patient data:
//! errors then name the template and the rule broken only, and [`Placement`]
//! says what callers may show ([`Placement::bucket_shown`],
//! [`Placement::redact`]).

use std::fmt;
use std::net::Ipv4Addr;

use crate::metas::SessionMetas;
use crate::template::{RenderError, Template, TemplateError};
use crate::{REDACTED, redact};

/// A parsed `S3_URL_PATTERN`.
#[derive(Debug, Clone)]
pub struct S3UrlPattern {
    source: String,
    /// `HOST[:PORT]` of the pattern.
    pub host: String,
    /// The path after `HOST/`, rendered whole and then split into bucket and prefix.
    path: Template,
    /// The path up to its first literal `/`: the only part that can render
    /// into the bucket (used to tell whether the bucket is patient data).
    bucket: Template,
}

/// An `S3_URL_PATTERN` that cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// Not of the form `s3://HOST/BUCKET[/PREFIX]`.
    #[error("S3_URL_PATTERN {pattern:?} is not of the form s3://HOST/BUCKET_TEMPLATE[/PREFIX_TEMPLATE]")]
    Shape {
        /// The pattern.
        pattern: String,
    },
    /// A template part does not parse.
    #[error("S3_URL_PATTERN: {0}")]
    Template(#[from] TemplateError),
}

/// Why a study cannot be placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// A template value cannot be used.
    #[error(transparent)]
    Render(#[from] RenderError),
    /// The rendered bucket is not a valid S3 bucket name even after normalisation.
    #[error(
        "S3_URL_PATTERN path {template:?} renders the bucket (its first path element) {bucket:?}, which S3 refuses \
         as a bucket name: {why}"
    )]
    Bucket {
        /// The path template of the pattern.
        template: String,
        /// The normalised bucket name (the template uses no patient variable).
        bucket: String,
        /// The rule it breaks.
        why: &'static str,
    },
    /// Like [`PlacementError::Bucket`], for a path with a patient variable
    /// before its first `/`: the name is patient data and is not kept.
    #[error(
        "S3_URL_PATTERN path {template:?} renders, from patient values (not shown), a bucket (its first path \
         element) S3 refuses as a bucket name: {why}"
    )]
    PatientBucket {
        /// The path template of the pattern.
        template: String,
        /// The rule the normalised name breaks.
        why: &'static str,
    },
}

/// Bucket and key prefix of one study.
#[derive(Clone, PartialEq, Eq)]
pub struct Placement {
    /// Valid S3 bucket name.
    pub bucket: String,
    /// Key prefix, ending with `/<StudyInstanceUID>/`.
    pub fileprefix: String,
    /// The bucket was rendered from a patient variable: never show it.
    bucket_is_patient_data: bool,
    /// The prefix (before `/<StudyInstanceUID>/`) was rendered from a patient variable.
    prefix_is_patient_data: bool,
}

impl fmt::Debug for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Placement")
            .field("bucket", &self.bucket_shown())
            .field("fileprefix", &self.fileprefix_shown())
            .finish()
    }
}

impl Placement {
    /// The object key of a file (e.g. a git-annex key) under the prefix.
    pub fn key(&self, name: &str) -> String {
        format!("{}{}", self.fileprefix, name)
    }

    /// Whether the bucket is patient data (its template uses a patient variable).
    pub fn bucket_is_patient_data(&self) -> bool {
        self.bucket_is_patient_data
    }

    /// Whether the key prefix is patient data (its template uses a patient variable).
    pub fn prefix_is_patient_data(&self) -> bool {
        self.prefix_is_patient_data
    }

    /// The bucket as logs, spans and errors may show it: the name, or
    /// `[redacted]` when it is patient data.
    pub fn bucket_shown(&self) -> &str {
        if self.bucket_is_patient_data { REDACTED } else { &self.bucket }
    }

    /// The key prefix as logs may show it: `[redacted]/<StudyInstanceUID>/`
    /// when the rendered part is patient data.
    pub fn fileprefix_shown(&self) -> String {
        match self.rendered_prefix() {
            Some(p) if self.prefix_is_patient_data => format!("{REDACTED}{}", &self.fileprefix[p.len()..]),
            _ => self.fileprefix.clone(),
        }
    }

    /// `text` (e.g. an S3 server's error) with the bucket and the rendered
    /// prefix replaced by `[redacted]` where they are patient data.
    pub fn redact(&self, text: &str) -> String {
        let mut hidden = Vec::new();
        if self.bucket_is_patient_data {
            hidden.push(self.bucket.as_str());
        }
        if self.prefix_is_patient_data
            && let Some(p) = self.rendered_prefix()
        {
            hidden.push(p);
        }
        redact(text, &hidden)
    }

    /// The rendered part of the prefix, before `/<StudyInstanceUID>/`.
    fn rendered_prefix(&self) -> Option<&str> {
        self.fileprefix.trim_end_matches('/').rsplit_once('/').map(|(p, _)| p).filter(|p| !p.is_empty())
    }
}

impl S3UrlPattern {
    /// Parses a pattern.
    pub fn parse(pattern: &str) -> Result<Self, PatternError> {
        let shape = || PatternError::Shape { pattern: pattern.to_owned() };
        let rest = pattern.trim().strip_prefix("s3://").ok_or_else(shape)?;
        let (host, path) = rest.split_once('/').ok_or_else(shape)?;
        if host.is_empty() || host.contains(['{', '}']) {
            return Err(shape());
        }
        let path = path.trim_end_matches('/');
        // A `/` is always literal (no variable name holds one).
        let bucket = path.split_once('/').map_or(path, |(b, _)| b);
        if bucket.is_empty() {
            return Err(shape());
        }
        Ok(Self {
            source: pattern.to_owned(),
            host: host.to_owned(),
            path: Template::parse(path)?,
            bucket: Template::parse(bucket)?,
        })
    }

    /// The pattern text.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether a patient variable (PatientID, PatientName, StudyDate) comes
    /// before the path's first literal `/`: then bucket names are patient data.
    pub fn bucket_uses_patient_values(&self) -> bool {
        self.bucket.uses_patient_values()
    }

    /// Whether the path uses a patient variable anywhere: then key prefixes
    /// (and object keys) are patient data, as a value of the bucket part may
    /// span into the prefix (`{PatientName}` = `Doe/Jane`: bucket `doe`,
    /// prefix `Jane/...`).
    pub fn prefix_uses_patient_values(&self) -> bool {
        self.path.uses_patient_values()
    }

    /// Bucket and key prefix of a study: the path rendered whole, its first
    /// element normalised into the bucket, the rest the prefix.
    pub fn place(&self, metas: &SessionMetas) -> Result<Placement, PlacementError> {
        let rendered = self.path.render(metas)?;
        let (first, rest) = match rendered.split_once('/') {
            Some((first, rest)) => (first, Some(rest)),
            None => (rendered.as_str(), None),
        };
        let bucket_is_patient_data = self.bucket_uses_patient_values();
        let bucket = bucket_name(first).map_err(|(bucket, why)| {
            let template = self.path.as_str().to_owned();
            if bucket_is_patient_data {
                PlacementError::PatientBucket { template, why }
            } else {
                PlacementError::Bucket { template, bucket, why }
            }
        })?;
        let uid = metas.study_instance_uid.as_str();
        let fileprefix = match rest {
            Some(rest) => format!("{rest}/{uid}/"),
            None => format!("{uid}/"),
        };
        Ok(Placement {
            bucket,
            fileprefix,
            bucket_is_patient_data,
            prefix_is_patient_data: self.prefix_uses_patient_values(),
        })
    }
}

/// Maps a rendered value to a valid S3 bucket name.
///
/// Rules, in order: ASCII letters are lower-cased; every character other than
/// `a-z`, `0-9`, `.` and `-` becomes `-`; runs of `-` or `.` collapse to one,
/// and `-.`/`.-` become `.`; leading and trailing `.`/`-` are removed. The
/// result must then follow S3's rules (3–63 characters, not an IPv4 address,
/// no reserved prefix or suffix), or the error gives the normalised name and
/// the rule it breaks. Truncation is never done: two studies must not share a
/// bucket by accident.
pub fn bucket_name(rendered: &str) -> Result<String, (String, &'static str)> {
    let mut out = String::with_capacity(rendered.len());
    for c in rendered.chars() {
        let c = c.to_ascii_lowercase();
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' { c } else { '-' };
        match (out.chars().last(), c) {
            (Some('-'), '-') | (Some('.'), '.') | (Some('.'), '-') => {}
            (Some('-'), '.') => {
                out.pop();
                if !out.ends_with('.') {
                    out.push('.');
                }
            }
            _ => out.push(c),
        }
    }
    let name = out.trim_matches(['.', '-']).to_owned();
    let why = if name.len() < 3 {
        Some("shorter than 3 characters")
    } else if name.len() > 63 {
        Some("longer than 63 characters")
    } else if name.parse::<Ipv4Addr>().is_ok() {
        Some("formatted as an IP address")
    } else if ["xn--", "sthree-", "amzn-s3-demo-"].iter().any(|p| name.starts_with(p)) {
        Some("starts with a reserved prefix")
    } else if ["-s3alias", "--ol-s3", ".mrap", "--x-s3"].iter().any(|s| name.ends_with(s)) {
        Some("ends with a reserved suffix")
    } else {
        None
    };
    match why {
        Some(why) => Err((name, why)),
        None => Ok(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metas::example;

    #[test]
    fn original_example_becomes_a_valid_bucket() {
        let p =
            S3UrlPattern::parse("s3://s3.example.org/test.{ReferringPhysicianName}.{StudyDescriptionPath[1]}.dicoms")
                .unwrap();
        assert_eq!(p.host, "s3.example.org");
        let pl = p.place(&example()).unwrap();
        assert_eq!(pl.bucket, "test.investigator.study1.dicoms");
        assert_eq!(pl.fileprefix, "1.2.3.4/");
        assert_eq!(pl.key("MD5E-s1--x.7z"), "1.2.3.4/MD5E-s1--x.7z");
    }

    #[test]
    fn prefix_after_the_bucket() {
        let p = S3UrlPattern::parse("s3://127.0.0.1:9000/dicoms/{ReferringPhysicianName}/{StudyDescriptionPath[1]}")
            .unwrap();
        let pl = p.place(&example()).unwrap();
        assert_eq!(pl.bucket, "dicoms");
        assert_eq!(pl.fileprefix, "Investigator/Study1/1.2.3.4/");
    }

    /// The original rendered the whole URL (`^` → `/`) and then
    /// took the first path element as the bucket, the rest as the prefix.
    #[test]
    fn a_person_name_splits_the_rendered_url_as_the_original_did() {
        let m =
            SessionMetas::from_raw("1.2.3.4", "P001", "Doe^Jane", "Smith^John", "20261127", "Brain^Study1").unwrap();
        let place = |pattern: &str| {
            let pl = S3UrlPattern::parse(pattern).unwrap().place(&m).unwrap();
            (pl.bucket, pl.fileprefix)
        };
        // The deployed default: `test.Smith/John.Study1.dicoms`.
        assert_eq!(
            place("s3://s3.example.org/test.{ReferringPhysicianName}.{StudyDescriptionPath[1]}.dicoms"),
            ("test.smith".to_owned(), "John.Study1.dicoms/1.2.3.4/".to_owned())
        );
        assert_eq!(
            place("s3://h/test.{ReferringPhysicianName}.{StudyDescriptionPath[1]}.dicoms/sourcedata"),
            ("test.smith".to_owned(), "John.Study1.dicoms/sourcedata/1.2.3.4/".to_owned())
        );
        assert_eq!(
            place("s3://h/dicoms/{ReferringPhysicianName}/{StudyDescriptionPath[1]}"),
            ("dicoms".to_owned(), "Smith/John/Study1/1.2.3.4/".to_owned())
        );
        assert_eq!(place("s3://h/{ReferringPhysicianName}"), ("smith".to_owned(), "John/1.2.3.4/".to_owned()));
    }

    #[test]
    fn person_names_are_refused_only_where_unusable() {
        let with_pi = |pi: &str| SessionMetas::from_raw("1.2.3.4", "P001", "Doe^Jane", pi, "20261127", "a^b").unwrap();
        let p = S3UrlPattern::parse("s3://h/{ReferringPhysicianName}").unwrap();
        // `Li/Wei`: the bucket `li` is too short, said clearly.
        let e = p.place(&with_pi("Li^Wei")).unwrap_err();
        assert!(matches!(&e, PlacementError::Bucket { bucket, .. } if bucket == "li"), "{e:?}");
        assert!(e.to_string().contains("shorter than 3 characters"), "{e}");
        for pi in ["..^x", "Smith^..", "a\\b", "Smith^\u{7}"] {
            let e = p.place(&with_pi(pi)).unwrap_err();
            assert!(matches!(e, PlacementError::Render(RenderError::Unsafe { .. })), "{pi:?}: {e:?}");
        }
        // Empty components make no segment; the literal `/` still separates.
        let p = S3UrlPattern::parse("s3://h/dicoms.{ReferringPhysicianName}/x").unwrap();
        let pl = p.place(&with_pi("Smith^^John")).unwrap();
        assert_eq!((pl.bucket.as_str(), pl.fileprefix.as_str()), ("dicoms.smith", "John/x/1.2.3.4/"));
        let pl = p.place(&with_pi("O'Brien")).unwrap();
        assert_eq!((pl.bucket.as_str(), pl.fileprefix.as_str()), ("dicoms.o-brien", "x/1.2.3.4/"));
    }

    #[test]
    fn a_patient_name_spanning_into_the_prefix_is_not_shown() {
        let p = S3UrlPattern::parse("s3://h/bucket-{PatientName}").unwrap();
        assert!(p.bucket_uses_patient_values() && p.prefix_uses_patient_values());
        let pl = p.place(&example()).unwrap();
        assert_eq!((pl.bucket.as_str(), pl.fileprefix.as_str()), ("bucket-doe", "Jane/1.2.3.4/"));
        assert_eq!((pl.bucket_shown(), pl.fileprefix_shown().as_str()), (REDACTED, "[redacted]/1.2.3.4/"));
        let text = format!("PUT /bucket-doe/{}: denied", pl.key("K.7z"));
        assert_eq!(pl.redact(&text), "PUT /[redacted]/[redacted]/1.2.3.4/K.7z: denied");
    }

    #[test]
    fn bucket_normalisation() {
        assert_eq!(bucket_name("test.Dr Smith.Study_1.dicoms").unwrap(), "test.dr-smith.study-1.dicoms");
        assert_eq!(bucket_name("--A..B-.c--").unwrap(), "a.b.c");
        assert_eq!(bucket_name("Müller.ß").unwrap(), "m-ller");
        assert!(bucket_name("ab").is_err());
        assert!(bucket_name(&"a".repeat(64)).is_err());
        assert!(bucket_name("192.168.1.1").is_err());
        assert!(bucket_name("sthree-abc").is_err());
        assert_eq!(bucket_name("xn--abc").unwrap(), "xn-abc");
        assert_eq!(bucket_name("___").unwrap_err().1, "shorter than 3 characters");
        for ok in ["abc", "a-b.c", "bucket.with.dots"] {
            assert_eq!(bucket_name(ok).unwrap(), ok);
        }
    }

    #[test]
    fn bad_patterns() {
        assert!(S3UrlPattern::parse("http://host/b").is_err());
        assert!(S3UrlPattern::parse("s3://host").is_err());
        assert!(S3UrlPattern::parse("s3://host/").is_err());
        assert!(S3UrlPattern::parse("s3://host/{Nope}").is_err());
    }

    #[test]
    fn unplaceable_studies_are_errors() {
        let p = S3UrlPattern::parse("s3://h/x{StudyDescriptionPath[1]}").unwrap();
        let m = SessionMetas::from_raw("1.2", "P001", "x", "y", "z", "a^_").unwrap();
        let e = p.place(&m).unwrap_err();
        assert!(matches!(e, PlacementError::Bucket { .. }), "{e:?}");
        let e = e.to_string();
        // No patient variable: the normalised name is shown, as before.
        assert!(e.contains("{StudyDescriptionPath[1]}") && e.contains("\"x\"") && e.contains("shorter than 3"), "{e}");
    }

    #[test]
    fn bucket_errors_from_patient_values_do_not_show_them() {
        let cases = [
            // Too short: "P1" normalises to "p1".
            ("s3://h/{PatientID}", "P1", "shorter than 3"),
            // Too long.
            ("s3://h/{PatientID}{PatientID}", "PATIENT-0123456789-0123456789-0123", "longer than 63"),
            // An IP address.
            ("s3://h/{PatientID}", "10.1.2.3", "IP address"),
        ];
        for (pattern, patient_id, rule) in cases {
            let p = S3UrlPattern::parse(pattern).unwrap();
            assert!(p.bucket_uses_patient_values());
            let m = SessionMetas::from_raw("1.2", patient_id, "Doe^Jane", "Inv", "20260101", "a^b").unwrap();
            let e = p.place(&m).unwrap_err();
            assert!(matches!(e, PlacementError::PatientBucket { .. }), "{e:?}");
            let e = e.to_string();
            assert!(e.contains(p.bucket.as_str()) && e.contains(rule), "{e}");
            for shown in [patient_id.to_owned(), patient_id.to_ascii_lowercase()] {
                assert!(!e.contains(&shown), "patient value in: {e}");
            }
        }
        for pattern in ["s3://h/b-{PatientName}", "s3://h/{StudyDate}.x"] {
            let p = S3UrlPattern::parse(pattern).unwrap();
            assert!(p.bucket_uses_patient_values(), "{pattern}");
        }
    }

    #[test]
    fn placements_from_patient_values_are_shown_redacted() {
        let p = S3UrlPattern::parse("s3://h/b-{PatientID}/{ReferringPhysicianName}/{StudyDate}").unwrap();
        assert!(p.bucket_uses_patient_values() && p.prefix_uses_patient_values());
        let pl = p.place(&example()).unwrap();
        assert_eq!((pl.bucket.as_str(), pl.fileprefix.as_str()), ("b-p001", "Investigator/20261127/1.2.3.4/"));
        assert!(pl.bucket_is_patient_data() && pl.prefix_is_patient_data());
        assert_eq!(pl.bucket_shown(), REDACTED);
        assert_eq!(pl.fileprefix_shown(), "[redacted]/1.2.3.4/");
        let text = format!("PUT http://h/b-p001/{}: denied", pl.key("K.7z"));
        assert_eq!(pl.redact(&text), "PUT http://h/[redacted]/[redacted]/1.2.3.4/K.7z: denied");
        let debug = format!("{pl:?}");
        assert!(!debug.contains("p001") && !debug.contains("20261127"), "{debug}");

        let pl = S3UrlPattern::parse("s3://h/b.{ReferringPhysicianName}/{StudyDescriptionPath[1]}")
            .unwrap()
            .place(&example())
            .unwrap();
        assert!(!pl.bucket_is_patient_data() && !pl.prefix_is_patient_data());
        assert_eq!((pl.bucket_shown(), pl.fileprefix_shown().as_str()), ("b.investigator", "Study1/1.2.3.4/"));
        assert_eq!(pl.redact("b.investigator/Study1"), "b.investigator/Study1");
        let pl = S3UrlPattern::parse("s3://h/{PatientID}").unwrap().place(&example()).unwrap();
        assert_eq!(pl.fileprefix_shown(), "1.2.3.4/");
    }
}
