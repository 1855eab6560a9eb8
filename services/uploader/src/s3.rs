//! Storing archives in S3, idempotently and verified.
//!
//! For each archive: make sure the bucket exists (HeadBucket, then
//! CreateBucket when allowed), skip the upload when the object is already
//! there with the same content (below), else upload it and HEAD it again to
//! verify it.
//!
//! - Archives up to `BIDSFLUX_S3_PART_SIZE` go in one PutObject with
//!   `Content-MD5` and `x-amz-checksum-sha256` of the whole archive (the
//!   server checks the bytes).
//! - Larger ones go in a multipart upload ([`crate::multipart`]): parallel
//!   parts read by ranges, each with its MD5 and SHA-256, retried on its own.
//!
//! Every object carries the archive's SHA-256 as user metadata
//! (`x-amz-meta-sha256`), because a multipart object has no whole-object
//! digest S3 servers agree on: its ETag is not an MD5 of the content, and a
//! composite checksum is returned only by some servers (MinIO, AWS) and not
//! by others (s3s-fs). The verification HEAD checks the size, that
//! metadata, the ETag (the MD5 for one PutObject, `md5(part MD5s)-n` for
//! multipart) and the SHA-256 checksum when the server returns one.
//!
//! An object already there is the same archive when it has the same size
//! and its `x-amz-meta-sha256`, or failing that its full-object SHA-256
//! checksum or its single-part (MD5) ETag, agrees. Otherwise (say, a
//! multipart object from another client, without our metadata) it is
//! uploaded again: same key, same bytes.
//!
//! Errors are sorted once, in [`crate::s3_error`]: network trouble, timeouts,
//! 5xx and throttling are worth retrying; refused credentials or permissions
//! (403), and other client errors, are not.
//!
//! Errors and logs name the bucket as [`Placement::bucket_shown`] gives it:
//! `[redacted]` when `S3_URL_PATTERN` renders it from patient values, and the
//! SDK's own error text is scrubbed with [`Placement::redact`].

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{BucketLocationConstraint, ChecksumMode, CreateBucketConfiguration};
use bidsflux_session::s3::Placement;

use crate::config::Config;
use crate::multipart::{self, Expected};
use crate::s3_error::{S3Error, classify};
use crate::spool::Digests;

/// User metadata key holding the archive's hex SHA-256 (`x-amz-meta-sha256`).
pub const SHA256_METADATA: &str = "sha256";

/// What [`Store::put_archive`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The object was uploaded and verified.
    Uploaded,
    /// An identical object was already there (a redelivery or a replay).
    AlreadyThere,
}

fn status_of<E>(err: &SdkError<E>) -> Option<u16> {
    err.raw_response().map(|r| r.status().as_u16())
}

/// What HEAD says about an existing object.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct ObjectHead {
    size: Option<i64>,
    /// Without quotes, lower case.
    etag: Option<String>,
    /// `x-amz-meta-sha256`, lower case.
    sha256_meta: Option<String>,
    /// `x-amz-checksum-sha256`: base64, with `-n` when composite (multipart).
    checksum_sha256: Option<String>,
}

impl ObjectHead {
    fn size_is(&self, d: &Digests) -> bool {
        self.size.and_then(|s| u64::try_from(s).ok()) == Some(d.size)
    }

    /// Whether the object holds the archive with these digests, judged
    /// without knowing how it was uploaded (see the module docs).
    fn matches(&self, d: &Digests) -> bool {
        if !self.size_is(d) {
            return false;
        }
        if let Some(sha) = &self.sha256_meta {
            return *sha == d.sha256;
        }
        if let Some(sum) = self.checksum_sha256.as_deref().filter(|c| !c.contains('-')) {
            return hex::decode(&d.sha256).is_ok_and(|raw| aws_smithy_types::base64::encode(raw) == sum);
        }
        matches!(&self.etag, Some(e) if !e.contains('-') && *e == d.md5)
    }

    /// Why the object just uploaded is not the archive, if it is not.
    fn mismatch(&self, d: &Digests, multipart: Option<&Expected>) -> Option<String> {
        if !self.size_is(d) {
            return Some(format!("size {:?}, expected {}", self.size, d.size));
        }
        if self.sha256_meta.as_deref() != Some(d.sha256.as_str()) {
            return Some(format!("x-amz-meta-sha256 {:?}, expected {}", self.sha256_meta, d.sha256));
        }
        let etag = self.etag.as_deref().unwrap_or("");
        let (want_etag, want_sum) = match multipart {
            Some(e) => (e.etag.clone(), e.composite_sha256.clone()),
            None => {
                let raw = hex::decode(&d.sha256).unwrap_or_default();
                (d.md5.clone(), aws_smithy_types::base64::encode(raw))
            }
        };
        // ETags that are neither form (encrypted objects) are not checked.
        let comparable = if multipart.is_some() { etag.contains('-') } else { etag.len() == 32 };
        if comparable && etag != want_etag {
            return Some(format!("ETag {etag}, expected {want_etag}"));
        }
        match &self.checksum_sha256 {
            Some(sum) if sum.contains('-') == want_sum.contains('-') && *sum != want_sum => {
                Some(format!("checksum SHA-256 {sum}, expected {want_sum}"))
            }
            _ => None,
        }
    }
}

/// An S3 client with the uploader's settings.
#[derive(Debug)]
pub struct Store {
    client: Client,
    create_bucket: bool,
    region: String,
    /// `BIDSFLUX_S3_PART_SIZE`: larger archives go in a multipart upload.
    part_size: u64,
    /// `BIDSFLUX_S3_UPLOAD_CONCURRENCY`: parts in flight per archive.
    upload_concurrency: usize,
    /// `BIDSFLUX_S3_PART_ATTEMPTS`: attempts per part.
    part_attempts: u32,
    /// Buckets known to exist, so HeadBucket is asked once per bucket.
    known_buckets: Mutex<HashSet<String>>,
}

impl Store {
    /// A client for `config`'s endpoint, region, credentials and retry settings.
    pub fn new(config: &Config) -> Self {
        let credentials = Credentials::new(
            config.access_key_id.expose(),
            config.secret_access_key.expose(),
            None,
            None,
            "bidsflux-uploader-config",
        );
        let mut s3 = aws_sdk_s3::Config::builder();
        if let Some(ca) = &config.ca_bundle {
            use aws_smithy_http_client::tls;
            s3.set_http_client(Some(
                aws_smithy_http_client::Builder::new()
                    .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::AwsLc))
                    .tls_context(ca.tls.clone())
                    .build_https(),
            ));
        }
        let s3 = s3
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(config.region.clone()))
            .endpoint_url(config.endpoint_url.clone())
            .credentials_provider(credentials)
            .force_path_style(config.path_style)
            .retry_config(RetryConfig::standard().with_max_attempts(config.s3_max_attempts))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .read_timeout(Duration::from_secs(120))
                    .build(),
            )
            // Checksums are computed here and sent as headers (Content-MD5,
            // x-amz-checksum-sha256): the body goes out as plain bytes rather
            // than aws-chunked with trailers, which not every server reads.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .build();
        Self {
            client: Client::from_conf(s3),
            create_bucket: config.create_bucket,
            region: config.region.clone(),
            part_size: config.part_size,
            upload_concurrency: config.upload_concurrency,
            part_attempts: config.part_attempts,
            known_buckets: Mutex::new(HashSet::new()),
        }
    }

    fn is_known(&self, bucket: &str) -> bool {
        self.known_buckets.lock().map(|k| k.contains(bucket)).unwrap_or(false)
    }

    fn set_known(&self, bucket: &str, known: bool) {
        if let Ok(mut k) = self.known_buckets.lock() {
            if known {
                k.insert(bucket.to_owned());
            } else {
                k.remove(bucket);
            }
        }
    }

    /// Makes sure the bucket of `placement` exists, creating it when allowed.
    pub async fn ensure_bucket(&self, placement: &Placement) -> Result<(), S3Error> {
        let bucket = placement.bucket.as_str();
        if self.is_known(bucket) {
            return Ok(());
        }
        match self.client.head_bucket().bucket(bucket).send().await {
            Ok(_) => {}
            Err(e) if status_of(&e) == Some(404) => {
                if !self.create_bucket {
                    return Err(S3Error::Refused {
                        op: "HeadBucket",
                        bucket: placement.bucket_shown().to_owned(),
                        detail: "the bucket does not exist and BIDSFLUX_S3_CREATE_BUCKET is off".to_owned(),
                    });
                }
                self.create(placement).await?;
            }
            Err(e) => return Err(classify("HeadBucket", placement, &e)),
        }
        self.set_known(bucket, true);
        Ok(())
    }

    async fn create(&self, placement: &Placement) -> Result<(), S3Error> {
        let mut req = self.client.create_bucket().bucket(&placement.bucket);
        if self.region != "us-east-1" {
            let constraint = BucketLocationConstraint::from(self.region.as_str());
            req = req.create_bucket_configuration(
                CreateBucketConfiguration::builder().location_constraint(constraint).build(),
            );
        }
        match req.send().await {
            Ok(_) => {
                tracing::info!(bucket = placement.bucket_shown(), "created bucket");
                Ok(())
            }
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_bucket_already_owned_by_you() || s.is_bucket_already_exists()) =>
            {
                Ok(())
            }
            Err(e) => Err(classify("CreateBucket", placement, &e)),
        }
    }

    async fn head(&self, placement: &Placement, key: &str) -> Result<Option<ObjectHead>, S3Error> {
        let head = self.client.head_object().bucket(&placement.bucket).key(key).checksum_mode(ChecksumMode::Enabled);
        match head.send().await {
            Ok(h) => Ok(Some(ObjectHead {
                size: h.content_length(),
                etag: h.e_tag().map(|e| e.trim_matches('"').to_ascii_lowercase()),
                sha256_meta: h.metadata().and_then(|m| m.get(SHA256_METADATA)).map(|s| s.trim().to_ascii_lowercase()),
                checksum_sha256: h.checksum_sha256().map(str::to_owned),
            })),
            Err(e) if status_of(&e) == Some(404) => Ok(None),
            Err(e) => Err(classify("HeadObject", placement, &e)),
        }
    }

    /// Whether the object at `placement`/`key` is the archive described by `digests`.
    pub async fn is_stored(&self, placement: &Placement, key: &str, digests: &Digests) -> Result<bool, S3Error> {
        Ok(self.head(placement, key).await?.is_some_and(|h| h.matches(digests)))
    }

    /// Stores the archive at `placement`/`key` unless an identical object is
    /// already there, then verifies it.
    pub async fn put_archive(
        &self,
        placement: &Placement,
        key: &str,
        path: &std::path::Path,
        digests: &Digests,
    ) -> Result<PutOutcome, S3Error> {
        let shown = placement.bucket_shown();
        self.ensure_bucket(placement).await?;
        match self.head(placement, key).await? {
            Some(h) if h.matches(digests) => return Ok(PutOutcome::AlreadyThere),
            // The key is not logged: a prefix template may render patient values into it.
            Some(_) => tracing::warn!(bucket = shown, "archive object exists with other content, replacing it"),
            None => {}
        }
        let started = std::time::Instant::now();
        let multipart = if digests.size > self.part_size {
            let upload = multipart::Upload {
                client: &self.client,
                placement,
                key,
                part_size: self.part_size,
                concurrency: self.upload_concurrency,
                attempts: self.part_attempts,
            };
            let expected = upload.run(path, digests).await?;
            tracing::info!(
                parts = expected.parts,
                retries = expected.retries,
                archive_size = digests.size,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "multipart upload complete"
            );
            Some(expected)
        } else {
            self.put_single(placement, key, path, digests).await?;
            None
        };
        match self.head(placement, key).await? {
            Some(h) => match h.mismatch(digests, multipart.as_ref()) {
                None => Ok(PutOutcome::Uploaded),
                Some(why) => Err(S3Error::Retryable {
                    op: "HeadObject",
                    bucket: shown.to_owned(),
                    detail: format!("verify upload: {why}"),
                }),
            },
            None => Err(S3Error::Retryable {
                op: "HeadObject",
                bucket: shown.to_owned(),
                detail: "verify upload: the object is not there".to_owned(),
            }),
        }
    }

    /// One PutObject with the archive's MD5 and SHA-256 for the server to check.
    async fn put_single(
        &self,
        placement: &Placement,
        key: &str,
        path: &std::path::Path,
        digests: &Digests,
    ) -> Result<(), S3Error> {
        let (bucket, shown) = (placement.bucket.as_str(), placement.bucket_shown());
        let body = ByteStream::from_path(path).await.map_err(|e| S3Error::Retryable {
            op: "PutObject",
            bucket: shown.to_owned(),
            detail: format!("open {}: {e}", path.display()),
        })?;
        let hex_to_b64 = |what: &str, h: &str| {
            hex::decode(h).map(aws_smithy_types::base64::encode).map_err(|e| S3Error::Refused {
                op: "PutObject",
                bucket: shown.to_owned(),
                detail: format!("archive {what} is not hex: {e}"),
            })
        };
        let (md5, sha256) = (hex_to_b64("md5", &digests.md5)?, hex_to_b64("sha256", &digests.sha256)?);
        let size = i64::try_from(digests.size).unwrap_or(i64::MAX);
        let put = self
            .client
            .put_object()
            .bucket(bucket)
            .key(key)
            .body(body)
            .content_length(size)
            .content_md5(md5)
            .checksum_sha256(sha256)
            .metadata(SHA256_METADATA, &digests.sha256)
            .content_type("application/x-7z-compressed")
            .send()
            .await;
        if let Err(e) = put {
            let err = classify("PutObject", placement, &e);
            if e.code() == Some("NoSuchBucket") {
                self.set_known(bucket, false);
            }
            return Err(err);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_matching() {
        let d = Digests {
            size: 3,
            md5: "900150983cd24fb0d6963f7d28e17f72".into(),
            sha256: "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad".into(),
        };
        let h = |size, etag: Option<&str>| ObjectHead {
            size: Some(size),
            etag: etag.map(str::to_owned),
            ..ObjectHead::default()
        };
        assert!(h(3, Some("900150983cd24fb0d6963f7d28e17f72")).matches(&d));
        assert!(!h(3, Some("abc-2")).matches(&d), "a multipart ETag alone proves nothing");
        assert!(!h(3, None).matches(&d));
        assert!(!h(4, Some("900150983cd24fb0d6963f7d28e17f72")).matches(&d));
        assert!(!h(3, Some("00000000000000000000000000000000")).matches(&d));
        let meta = |sha: &str| ObjectHead { sha256_meta: Some(sha.to_owned()), ..h(3, Some("abc-2")) };
        assert!(meta(&d.sha256).matches(&d), "multipart object with our metadata");
        assert!(!meta(&"0".repeat(64)).matches(&d));
        let sum = "ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0=";
        let checksum = |c: &str| ObjectHead { checksum_sha256: Some(c.to_owned()), ..h(3, None) };
        assert!(checksum(sum).matches(&d));
        assert!(!checksum("AAAA").matches(&d));
    }

    #[test]
    fn verification_after_upload() {
        let d = Digests {
            size: 3,
            md5: "900150983cd24fb0d6963f7d28e17f72".into(),
            sha256: "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad".into(),
        };
        let good = ObjectHead {
            size: Some(3),
            etag: Some(d.md5.clone()),
            sha256_meta: Some(d.sha256.clone()),
            checksum_sha256: Some("ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0=".into()),
        };
        assert_eq!(good.mismatch(&d, None), None);
        let no_meta = ObjectHead { sha256_meta: None, ..good.clone() };
        assert!(no_meta.mismatch(&d, None).unwrap().contains("x-amz-meta-sha256"));
        let e = Expected { etag: "abc-2".into(), composite_sha256: "xyz-2".into(), parts: 2, retries: 0 };
        let mp = ObjectHead { etag: Some("abc-2".into()), checksum_sha256: None, ..good.clone() };
        assert_eq!(mp.mismatch(&d, Some(&e)), None);
        let wrong = ObjectHead { etag: Some("abd-2".into()), ..mp.clone() };
        assert!(wrong.mismatch(&d, Some(&e)).unwrap().contains("ETag"));
        let composite = ObjectHead { checksum_sha256: Some("xyw-2".into()), ..mp };
        assert!(composite.mismatch(&d, Some(&e)).unwrap().contains("checksum"));
    }
}
