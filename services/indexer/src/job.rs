//! `ArchiveStored` validated into an [`IndexJob`] at the edge.
//!
//! Every value that later becomes a path, a git-annex key or a line in the
//! git-annex branch is checked here: UIDs are DICOM UIDs, manifest paths are
//! exactly `<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`, keys
//! match the sizes and hashes they are computed from. Error messages carry
//! UIDs and field names, never session metas (patient values).

use std::collections::HashSet;

use bidsflux_messaging::{Classify, ErrorClass};
use bidsflux_proto::v1 as pb;
use bidsflux_proto::v1::FailureKind;
use bidsflux_session::annex::md5e_key;
use bidsflux_session::{SessionMetas, SpoolPath, Uid};

/// Why a message cannot be indexed (it is dead-lettered).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// A required part of the message is absent.
    #[error("malformed ArchiveStored: {0}")]
    Malformed(String),
    /// A value is present but unusable (hostile path, bad UID, inconsistent key).
    #[error("invalid ArchiveStored: {0}")]
    Invalid(String),
}

impl Classify for JobError {
    fn class(&self) -> ErrorClass {
        match self {
            Self::Malformed(_) => ErrorClass::Permanent(FailureKind::Malformed),
            Self::Invalid(_) => ErrorClass::Permanent(FailureKind::InvalidInput),
        }
    }
}

fn invalid(reason: impl Into<String>) -> JobError {
    JobError::Invalid(reason.into())
}

/// The archive of the study, annexed at the dataset root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Archive {
    /// File name in the dataset (e.g. `<StudyInstanceUID>.7z`).
    pub name: String,
    /// MD5E key.
    pub key: String,
}

/// `http` or `https`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Plain HTTP (test servers, private MinIO).
    Http,
    /// HTTPS.
    Https,
}

impl Protocol {
    /// The value of git-annex's `protocol=` setting.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
        }
    }
}

/// Where the archive is in S3, in git-annex's S3 special remote terms.
///
/// The endpoint is the location's `public_url` (where users reach the
/// bucket), or its `endpoint_url` in messages older than that field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Remote {
    /// Host name or IP address of the public endpoint.
    pub host: String,
    /// TCP port (explicit, or 80/443 from the scheme).
    pub port: u16,
    /// Scheme of the endpoint.
    pub protocol: Protocol,
    /// Bucket.
    pub bucket: String,
    /// Key prefix of the study (`fileprefix`).
    pub fileprefix: String,
    /// Path-style requests (`requeststyle=path`).
    pub path_style: bool,
    /// Region, for git-annex's `datacenter` (`US` when unset or us-east-1).
    pub datacenter: String,
}

/// One DICOM file of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DicomFile {
    /// Path inside the archive: `<study>/<series>/<sop>.dcm`.
    pub archive_path: String,
    /// Path in the dataset: the archive path without its first component.
    pub dataset_path: String,
    /// Size in bytes.
    pub size: u64,
    /// MD5E key.
    pub key: String,
}

/// One archive to index, every value validated.
#[derive(Debug, Clone)]
pub struct IndexJob {
    /// StudyInstanceUID.
    pub study: Uid,
    /// 0 for the study, 1.. for amendments.
    pub generation: u32,
    /// Session metas (patient values: never log).
    pub metas: SessionMetas,
    /// The archive.
    pub archive: Archive,
    /// Where the archive is stored.
    pub s3: S3Remote,
    /// The files inside the archive.
    pub files: Vec<DicomFile>,
}

impl TryFrom<&pb::ArchiveStored> for IndexJob {
    type Error = JobError;

    fn try_from(m: &pb::ArchiveStored) -> Result<Self, JobError> {
        let study = Uid::parse("StudyInstanceUID", &m.study_instance_uid).map_err(|e| invalid(e.to_string()))?;
        let metas = m.metas.as_ref().ok_or_else(|| JobError::Malformed("metas are missing".into()))?;
        let metas = SessionMetas::try_from(metas).map_err(|e| invalid(format!("metas: {e}")))?;
        if metas.study_instance_uid != study {
            return Err(invalid("metas belong to another StudyInstanceUID"));
        }
        if !is_safe_file_name(&m.archive_name) {
            return Err(invalid("archive_name is not a plain file name ([A-Za-z0-9._-], not starting with '.')"));
        }
        let md5 = checked_md5("archive md5", &m.md5)?;
        let key = md5e_key(m.size, &md5, &m.archive_name);
        if m.annex_key != key {
            return Err(invalid(format!(
                "annex_key {:?} does not match size, md5 and archive_name ({key})",
                m.annex_key
            )));
        }
        let location = m.location.as_ref().ok_or_else(|| JobError::Malformed("location is missing".into()))?;
        let s3 = s3_remote(location, &key)?;
        if m.manifest.is_empty() {
            return Err(invalid("manifest is empty"));
        }
        let mut seen = HashSet::new();
        let mut files = Vec::with_capacity(m.manifest.len());
        for entry in &m.manifest {
            let file = dicom_file(&study, entry)?;
            if !seen.insert(file.dataset_path.clone()) {
                return Err(invalid(format!("manifest lists {} twice", file.archive_path)));
            }
            files.push(file);
        }
        Ok(Self {
            study,
            generation: m.generation,
            metas,
            archive: Archive { name: m.archive_name.clone(), key },
            s3,
            files,
        })
    }
}

/// A single path component safe for a file name: `[A-Za-z0-9._-]`, not starting with `.`.
fn is_safe_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn checked_md5(what: &str, md5: &str) -> Result<String, JobError> {
    if md5.len() == 32 && md5.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(md5.to_ascii_lowercase())
    } else {
        Err(invalid(format!("{what} is not 32 hex digits")))
    }
}

fn dicom_file(study: &Uid, e: &pb::ManifestEntry) -> Result<DicomFile, JobError> {
    let bad = || {
        invalid(format!(
            "manifest path {:?} is not <StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm",
            e.path
        ))
    };
    // The archive holds the study as the spool did: the same layout, parsed by its one definition.
    let path = SpoolPath::parse(&e.path).map_err(|_| bad())?;
    if path.study() != study || path.is_conflict() {
        return Err(bad());
    }
    let (series, sop) = (path.series(), path.sop());
    let archive_path = path.to_string();
    if !e.series_instance_uid.is_empty() && e.series_instance_uid != series.as_str() {
        return Err(invalid(format!("manifest entry {:?} names another SeriesInstanceUID", e.path)));
    }
    if !e.sop_instance_uid.is_empty() && e.sop_instance_uid != sop.as_str() {
        return Err(invalid(format!("manifest entry {:?} names another SOPInstanceUID", e.path)));
    }
    let md5 = checked_md5(&format!("md5 of {}", e.path), &e.md5)?;
    // In the session dataset the study directory is stripped (`--strip-leading-dirs`).
    let dataset_path = format!("{series}/{}", path.file_name());
    let key = md5e_key(e.size, &md5, &dataset_path);
    Ok(DicomFile { archive_path, dataset_path, size: e.size, key })
}

fn s3_remote(l: &pb::S3Location, archive_key: &str) -> Result<S3Remote, JobError> {
    // Uploaders older than `public_url` sent only the endpoint they used.
    let (field, url) = if l.public_url.is_empty() {
        ("location.endpoint_url", l.endpoint_url.as_str())
    } else {
        ("location.public_url", l.public_url.as_str())
    };
    let (protocol, rest) = if let Some(r) = url.strip_prefix("http://") {
        (Protocol::Http, r)
    } else if let Some(r) = url.strip_prefix("https://") {
        (Protocol::Https, r)
    } else {
        return Err(invalid(format!("{field} is not an http(s) URL")));
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    let bad_endpoint = || invalid(format!("{field} must be scheme://host[:port] without a path"));
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':') => {
            (h, p.parse::<u16>().map_err(|_| bad_endpoint())?)
        }
        _ => (authority, if protocol == Protocol::Https { 443 } else { 80 }),
    };
    let host_ok = !host.is_empty()
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'[' | b']' | b':'))
        && (host.starts_with('[') || !host.contains(':'));
    if !host_ok || port == 0 {
        return Err(bad_endpoint());
    }
    let bucket_ok = !l.bucket.is_empty()
        && l.bucket.len() <= 63
        && l.bucket.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if !bucket_ok {
        return Err(invalid("location.bucket is not a bucket name"));
    }
    if l.fileprefix.chars().any(char::is_control) {
        return Err(invalid("location.fileprefix contains control characters"));
    }
    if l.key != format!("{}{archive_key}", l.fileprefix) {
        return Err(invalid("location.key is not location.fileprefix followed by the archive's annex key"));
    }
    let region = l.region.trim();
    let datacenter = if region.is_empty() || region == "us-east-1" { "US" } else { region };
    if datacenter.bytes().any(|b| !(b.is_ascii_alphanumeric() || b == b'-')) {
        return Err(invalid("location.region is not a region name"));
    }
    Ok(S3Remote {
        host: host.to_owned(),
        port,
        protocol,
        bucket: l.bucket.clone(),
        fileprefix: l.fileprefix.clone(),
        path_style: l.path_style,
        datacenter: datacenter.to_owned(),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn message() -> pb::ArchiveStored {
        let study = "1.2.3.4";
        let key = md5e_key(10, "0123456789abcdef0123456789abcdef", "1.2.3.4.7z");
        pb::ArchiveStored {
            study_instance_uid: study.into(),
            generation: 0,
            metas: Some(pb::SessionMetas {
                study_instance_uid: study.into(),
                patient_id: "P1".into(),
                patient_name: "Doe^Jane".into(),
                referring_physician_name: "Investigator".into(),
                study_date: "20260101".into(),
                study_description: "Brain^Study1".into(),
            }),
            location: Some(pb::S3Location {
                endpoint_url: "http://127.0.0.1:9000".into(),
                region: String::new(),
                bucket: "dicoms".into(),
                fileprefix: "Investigator/1.2.3.4/".into(),
                key: format!("Investigator/1.2.3.4/{key}"),
                path_style: true,
                public_url: "https://s3.example.org".into(),
            }),
            archive_name: "1.2.3.4.7z".into(),
            size: 10,
            md5: "0123456789ABCDEF0123456789ABCDEF".into(),
            sha256: String::new(),
            annex_key: key,
            manifest: vec![pb::ManifestEntry {
                path: "1.2.3.4/1.2.5/1.2.5.1.dcm".into(),
                size: 5,
                md5: "ffffffffffffffffffffffffffffffff".into(),
                sha256: String::new(),
                sop_instance_uid: "1.2.5.1".into(),
                series_instance_uid: "1.2.5".into(),
                sop_class_uid: String::new(),
            }],
            reason: None,
            manifest_ref: None,
        }
    }

    #[test]
    fn a_good_message_becomes_a_job() {
        let job = IndexJob::try_from(&message()).unwrap();
        assert_eq!(job.archive.key, "MD5E-s10--0123456789abcdef0123456789abcdef.4.7z");
        // The public URL, not the endpoint the uploader used.
        assert_eq!((job.s3.host.as_str(), job.s3.port, job.s3.protocol), ("s3.example.org", 443, Protocol::Https));
        assert_eq!(job.s3.datacenter, "US");
        assert_eq!(job.files[0].dataset_path, "1.2.5/1.2.5.1.dcm");
        assert_eq!(job.files[0].key, "MD5E-s5--ffffffffffffffffffffffffffffffff.1.dcm");
    }

    #[test]
    fn default_ports_follow_the_scheme() {
        let mut m = message();
        let l = m.location.as_mut().unwrap();
        l.public_url = "http://s3.example.org/".into();
        let job = IndexJob::try_from(&m).unwrap();
        assert_eq!((job.s3.host.as_str(), job.s3.port, job.s3.protocol), ("s3.example.org", 80, Protocol::Http));
    }

    #[test]
    fn messages_without_a_public_url_use_the_endpoint() {
        let mut m = message();
        m.location.as_mut().unwrap().public_url.clear();
        let job = IndexJob::try_from(&m).unwrap();
        assert_eq!((job.s3.host.as_str(), job.s3.port, job.s3.protocol), ("127.0.0.1", 9000, Protocol::Http));
        m.location.as_mut().unwrap().endpoint_url = "ftp://x".into();
        let e = IndexJob::try_from(&m).unwrap_err().to_string();
        assert!(e.contains("location.endpoint_url"), "{e}");
    }

    #[test]
    fn hostile_manifest_paths_are_invalid() {
        for path in [
            "1.2.3.4/../1.2.5.1.dcm",
            "1.2.3.4/1.2.5/../../x.dcm",
            "../1.2.5/1.2.5.1.dcm",
            "1.2.3.5/1.2.5/1.2.5.1.dcm",
            "1.2.3.4/1.2.5/1.2.5.1.txt",
            "1.2.3.4/1.2.5/sub/1.2.5.1.dcm",
            "/1.2.3.4/1.2.5/1.2.5.1.dcm",
            "1.2.3.4/1.2.5/1.2.5.1 .dcm",
            "1.2.3.4/.git/1.dcm",
        ] {
            let mut m = message();
            m.manifest[0].path = path.into();
            let e = IndexJob::try_from(&m).unwrap_err();
            assert!(matches!(e, JobError::Invalid(_)), "{path}: {e}");
        }
    }

    #[test]
    fn inconsistent_or_missing_values_are_rejected() {
        type Change = fn(&mut pb::ArchiveStored);
        let cases: Vec<(&str, Change)> = vec![
            ("study uid", |m| m.study_instance_uid = "..".into()),
            ("archive name", |m| m.archive_name = "../x.7z".into()),
            ("annex key", |m| m.annex_key = "MD5E-s11--x.7z".into()),
            ("md5", |m| m.md5 = "zz".into()),
            ("location key", |m| m.location.as_mut().unwrap().key = "elsewhere".into()),
            ("public url", |m| m.location.as_mut().unwrap().public_url = "ftp://x".into()),
            ("public url path", |m| m.location.as_mut().unwrap().public_url = "http://x/y".into()),
            ("public url port", |m| m.location.as_mut().unwrap().public_url = "http://x:0".into()),
            ("bucket", |m| m.location.as_mut().unwrap().bucket = "a b".into()),
            ("metas study", |m| m.metas.as_mut().unwrap().study_instance_uid = "1.2.3.9".into()),
            ("series", |m| m.manifest[0].series_instance_uid = "1.2.6".into()),
            ("duplicate", |m| m.manifest.push(m.manifest[0].clone())),
            ("empty manifest", |m| m.manifest.clear()),
        ];
        for (what, change) in cases {
            let mut m = message();
            change(&mut m);
            assert!(matches!(IndexJob::try_from(&m), Err(JobError::Invalid(_))), "{what}");
        }
        let mut m = message();
        m.metas = None;
        assert!(matches!(IndexJob::try_from(&m), Err(JobError::Malformed(_))));
    }

    #[test]
    fn errors_do_not_leak_patient_values() {
        let mut m = message();
        m.metas.as_mut().unwrap().study_instance_uid = "Doe^Jane".into();
        let e = IndexJob::try_from(&m).unwrap_err().to_string();
        assert!(!e.contains("Doe"), "{e}");
    }
}
