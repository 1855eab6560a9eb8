//! Storing archives in S3, idempotently.
//!
//! For each archive: make sure the bucket exists (HeadBucket, then
//! CreateBucket when allowed), skip the upload when the object is already
//! there with the same size and MD5 ETag, else PutObject with `Content-MD5`
//! (the server checks the bytes) and HeadObject again to verify.
//!
//! Uploads are a single PutObject for now, which S3 caps at 5 GiB: multipart
//! upload (and with it resumable uploads of large studies) comes in a later
//! issue. Larger archives are refused with a clear reason.
//!
//! Errors are sorted once, in [`classify`]: network trouble, timeouts, 5xx and
//! throttling are worth retrying; refused credentials or permissions (403),
//! and other client errors, are not.
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
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{BucketLocationConstraint, CreateBucketConfiguration};
use bidsflux_session::s3::Placement;

use crate::config::Config;
use crate::spool::Digests;

/// Largest object a single PutObject may create (S3's limit).
pub const MAX_SINGLE_PUT: u64 = 5 * 1024 * 1024 * 1024;

/// An S3 failure, sorted by whether a retry can help.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    /// Network, timeout, 5xx, throttling: retry later.
    #[error("{op} on bucket {bucket}: {detail}")]
    Retryable {
        /// The S3 operation.
        op: &'static str,
        /// The bucket as it may be shown (`[redacted]` if patient data).
        bucket: String,
        /// What happened.
        detail: String,
    },
    /// Refused for a reason a retry will not fix (credentials, permissions, bad request).
    #[error("{op} on bucket {bucket}: {detail}")]
    Refused {
        /// The S3 operation.
        op: &'static str,
        /// The bucket as it may be shown (`[redacted]` if patient data).
        bucket: String,
        /// What happened and what to check.
        detail: String,
    },
}

/// What [`Store::put_archive`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The object was uploaded and verified.
    Uploaded,
    /// An identical object was already there (a redelivery or a replay).
    AlreadyThere,
}

/// What a classified error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Retry,
    Credentials,
    Refused,
}

/// Sorts an S3 error response by HTTP status and error code.
fn class_of(status: u16, code: &str) -> Class {
    const CREDENTIALS: &[&str] = &[
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidToken",
        "ExpiredToken",
        "AuthorizationHeaderMalformed",
        "InvalidSecurity",
        "AccountProblem",
    ];
    const RETRY: &[&str] = &[
        "SlowDown",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "BadDigest",
        "IncompleteBody",
        "XAmzContentSHA256Mismatch",
        "OperationAborted",
        "NoSuchBucket",
    ];
    if CREDENTIALS.contains(&code) || status == 401 || status == 403 {
        Class::Credentials
    } else if RETRY.contains(&code) || status >= 500 || status == 408 || status == 429 {
        Class::Retry
    } else {
        Class::Refused
    }
}

/// Turns an SDK error about `placement` into an [`S3Error`].
fn classify<E>(op: &'static str, placement: &Placement, err: &SdkError<E>) -> S3Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let bucket = placement.bucket_shown().to_owned();
    let detail = placement.redact(&format!("{}", DisplayErrorContext(err)));
    match err {
        SdkError::ServiceError(_) | SdkError::ResponseError(_) => {
            let status = err.raw_response().map(|r| r.status().as_u16()).unwrap_or(0);
            let code = err.code().unwrap_or("");
            let shown = if code.is_empty() { format!("HTTP {status}") } else { format!("HTTP {status} {code}") };
            match class_of(status, code) {
                Class::Retry => S3Error::Retryable { op, bucket, detail: format!("{shown}: {detail}") },
                Class::Credentials => S3Error::Refused {
                    op,
                    bucket,
                    detail: format!(
                        "S3 refused the request ({shown}): check the credentials (AWS_ACCESS_KEY_ID, \
                         AWS_SECRET_ACCESS_KEY) and their permissions on the bucket"
                    ),
                },
                Class::Refused => S3Error::Refused { op, bucket, detail: format!("S3 refused the request ({shown})") },
            }
        }
        SdkError::ConstructionFailure(_) => S3Error::Refused { op, bucket, detail },
        _ => S3Error::Retryable { op, bucket, detail },
    }
}

fn status_of<E>(err: &SdkError<E>) -> Option<u16> {
    err.raw_response().map(|r| r.status().as_u16())
}

/// Size and ETag of an existing object.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ObjectHead {
    size: Option<i64>,
    etag: Option<String>,
}

impl ObjectHead {
    /// Whether the object holds these bytes: same size, and for single-part
    /// objects (whose ETag is the MD5) the same MD5.
    fn matches(&self, d: &Digests) -> bool {
        let size_ok = self.size.and_then(|s| u64::try_from(s).ok()) == Some(d.size);
        let etag_ok = match self.etag.as_deref().map(|e| e.trim_matches('"').to_ascii_lowercase()) {
            Some(e) if e.contains('-') => true, // multipart: not an MD5 of the content
            Some(e) => e == d.md5,
            None => true,
        };
        size_ok && etag_ok
    }
}

/// An S3 client with the uploader's settings.
#[derive(Debug)]
pub struct Store {
    client: Client,
    create_bucket: bool,
    region: String,
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
        let s3 = aws_sdk_s3::Config::builder()
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
            // Content-MD5 is sent instead: understood by every S3 server, and
            // the body goes out as plain bytes rather than aws-chunked.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .build();
        Self {
            client: Client::from_conf(s3),
            create_bucket: config.create_bucket,
            region: config.region.clone(),
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
        match self.client.head_object().bucket(&placement.bucket).key(key).send().await {
            Ok(h) => Ok(Some(ObjectHead { size: h.content_length(), etag: h.e_tag().map(str::to_owned) })),
            Err(e) if status_of(&e) == Some(404) => Ok(None),
            Err(e) => Err(classify("HeadObject", placement, &e)),
        }
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
        let bucket = placement.bucket.as_str();
        let shown = placement.bucket_shown();
        if digests.size > MAX_SINGLE_PUT {
            return Err(S3Error::Refused {
                op: "PutObject",
                bucket: shown.to_owned(),
                detail: format!(
                    "the archive has {} bytes, more than a single PutObject can store (5 GiB); \
                     multipart upload is not implemented yet",
                    digests.size
                ),
            });
        }
        self.ensure_bucket(placement).await?;
        match self.head(placement, key).await? {
            Some(h) if h.matches(digests) => return Ok(PutOutcome::AlreadyThere),
            // The key is not logged: a prefix template may render patient values into it.
            Some(_) => tracing::warn!(bucket = shown, "archive object exists with other content, replacing it"),
            None => {}
        }
        let body = ByteStream::from_path(path).await.map_err(|e| S3Error::Retryable {
            op: "PutObject",
            bucket: shown.to_owned(),
            detail: format!("open {}: {e}", path.display()),
        })?;
        let md5 = hex::decode(&digests.md5).map_err(|e| S3Error::Refused {
            op: "PutObject",
            bucket: shown.to_owned(),
            detail: format!("archive md5 is not hex: {e}"),
        })?;
        let size = i64::try_from(digests.size).unwrap_or(i64::MAX);
        let put = self
            .client
            .put_object()
            .bucket(bucket)
            .key(key)
            .body(body)
            .content_length(size)
            .content_md5(aws_smithy_types::base64::encode(md5))
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
        match self.head(placement, key).await? {
            Some(h) if h.matches(digests) => Ok(PutOutcome::Uploaded),
            found => Err(S3Error::Retryable {
                op: "HeadObject",
                bucket: shown.to_owned(),
                detail: format!(
                    "verify upload: expected {} bytes with md5 {}, found {found:?}",
                    digests.size, digests.md5
                ),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert_eq!(class_of(403, "SignatureDoesNotMatch"), Class::Credentials);
        assert_eq!(class_of(403, "InvalidAccessKeyId"), Class::Credentials);
        assert_eq!(class_of(403, ""), Class::Credentials);
        assert_eq!(class_of(400, "AuthorizationHeaderMalformed"), Class::Credentials);
        assert_eq!(class_of(503, "SlowDown"), Class::Retry);
        assert_eq!(class_of(500, ""), Class::Retry);
        assert_eq!(class_of(429, ""), Class::Retry);
        assert_eq!(class_of(400, "BadDigest"), Class::Retry);
        assert_eq!(class_of(400, "InvalidBucketName"), Class::Refused);
        assert_eq!(class_of(409, "BucketAlreadyExists"), Class::Refused);
    }

    #[test]
    fn object_matching() {
        let d = Digests { size: 3, md5: "900150983cd24fb0d6963f7d28e17f72".into(), sha256: String::new() };
        let h = |size, etag: Option<&str>| ObjectHead { size: Some(size), etag: etag.map(str::to_owned) };
        assert!(h(3, Some("\"900150983CD24FB0D6963F7D28E17F72\"")).matches(&d));
        assert!(h(3, Some("\"abc-2\"")).matches(&d));
        assert!(h(3, None).matches(&d));
        assert!(!h(4, Some("\"900150983cd24fb0d6963f7d28e17f72\"")).matches(&d));
        assert!(!h(3, Some("\"00000000000000000000000000000000\"")).matches(&d));
    }
}
