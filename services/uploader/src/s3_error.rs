//! S3 failures, sorted once by whether a retry can help.
//!
//! Network trouble, timeouts, 5xx and throttling are worth retrying; refused
//! credentials or permissions (403), and other client errors, are not. A leaf
//! module: the single-request store and the multipart upload both sort their
//! errors here.

use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use bidsflux_session::s3::Placement;

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

impl bidsflux_messaging::Classify for S3Error {
    fn class(&self) -> bidsflux_messaging::ErrorClass {
        match self {
            Self::Retryable { .. } => bidsflux_messaging::ErrorClass::Transient,
            Self::Refused { .. } => {
                bidsflux_messaging::ErrorClass::Permanent(bidsflux_proto::v1::FailureKind::Permanent)
            }
        }
    }
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
    } else if RETRY.contains(&code) || status >= 500 || status == 408 || status == 429 || status == 0 {
        Class::Retry
    } else {
        Class::Refused
    }
}

/// Turns an SDK error about `placement` into an [`S3Error`].
pub(crate) fn classify<E>(op: &'static str, placement: &Placement, err: &SdkError<E>) -> S3Error
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
}
