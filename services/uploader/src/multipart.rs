//! Multipart upload of one archive: parts read by ranges from the archive
//! file, uploaded in parallel, each checked and retried on its own.
//!
//! - **Memory.** A part is read (`pread`) only when its turn comes, and at
//!   most `concurrency` parts are in flight: an upload buffers at most
//!   concurrency × part size, never the archive.
//! - **Checksums.** Each part is sent with `Content-MD5` and
//!   `x-amz-checksum-sha256` (the upload is created with checksum algorithm
//!   SHA-256), computed while the part is read: servers that check them
//!   (AWS, MinIO) refuse a damaged part. The part's ETag, which S3-compatible
//!   servers compute as the MD5 of the bytes they stored, is compared with
//!   ours, so a server that checks neither header (s3s-fs) is still checked.
//!   After completion the caller compares the object's ETag with the
//!   multipart ETag these part MD5s give (`md5(md5₁‖…‖md5ₙ)-n`), and the
//!   composite SHA-256 when the server returns one.
//! - **Retries.** Each part (and the completion) gets `part_attempts`
//!   attempts, each with the SDK's own retries, with exponential backoff in
//!   between. A part sent again replaces the earlier copy of the same part
//!   number: nothing is duplicated. A completion retried after a lost
//!   response finds the upload gone (`NoSuchUpload`): the object is then
//!   judged by the caller's HEAD, like any other.
//! - **Failure.** A failed upload is aborted (AbortMultipartUpload), so no
//!   parts are left behind; if the server cannot be reached to abort it,
//!   the bucket's lifecycle rule (AbortIncompleteMultipartUpload) cleans up.

use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use aws_smithy_types::base64;
use bidsflux_service::Backoff;
use bidsflux_session::s3::Placement;
use futures::{StreamExt as _, TryStreamExt as _};
use md5::{Digest as _, Md5};
use sha2::Sha256;

use crate::s3_error::{S3Error, classify};
use crate::spool::Digests;

/// Most parts S3 allows in one upload.
pub const MAX_PARTS: u64 = 10_000;
/// Longest pause between two attempts of a part.
const MAX_BACKOFF: Duration = Duration::from_secs(16);

/// One part of the plan: number (from 1), offset and length in the archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartRange {
    /// Part number, 1-based.
    pub number: i32,
    /// First byte in the archive.
    pub offset: u64,
    /// Bytes in the part.
    pub len: u64,
}

/// Splits `size` bytes into parts of `part_size`, growing the part size
/// when more than [`MAX_PARTS`] parts would be needed.
pub fn plan(size: u64, part_size: u64) -> Vec<PartRange> {
    let part_size = part_size.max(size.div_ceil(MAX_PARTS)).max(1);
    let mut parts = Vec::new();
    let mut offset = 0;
    let mut number = 1;
    while offset < size {
        let len = part_size.min(size - offset);
        parts.push(PartRange { number, offset, len });
        offset += len;
        number += 1;
    }
    parts
}

/// The pause before attempt `attempt + 1` (1 s, 2 s, 4 s … at most 16 s),
/// with up to a quarter more of jitter so parallel parts do not retry in step.
fn backoff(attempt: u32) -> Duration {
    Backoff::doubling(Duration::from_secs(1), MAX_BACKOFF).with_jitter(0.25).delay(attempt)
}

/// How long one attempt of a part may take: a minute plus 2 s per MiB (a
/// link slower than 512 KiB/s counts as stalled).
fn attempt_timeout(len: u64) -> Duration {
    Duration::from_secs(60 + 2 * len.div_ceil(1 << 20))
}

/// A part stored by the server.
#[derive(Debug)]
struct PartDone {
    number: i32,
    etag: String,
    md5: [u8; 16],
    sha256: [u8; 32],
}

/// What the caller verifies the completed object against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// `md5(md5₁‖…‖md5ₙ)-n`, the ETag S3-compatible servers give the object.
    pub etag: String,
    /// `base64(sha256(sha256₁‖…‖sha256ₙ))-n`, the composite checksum.
    pub composite_sha256: String,
    /// Parts uploaded.
    pub parts: usize,
    /// Attempts that failed and were retried (parts and completion).
    pub retries: u32,
}

/// The multipart ETag and composite SHA-256 of parts with these digests.
fn expected(parts: &[PartDone], retries: u32) -> Expected {
    let mut md5 = Md5::new();
    let mut sha = Sha256::new();
    for p in parts {
        md5.update(p.md5);
        sha.update(p.sha256);
    }
    let n = parts.len();
    Expected {
        etag: format!("{}-{n}", hex::encode(md5.finalize())),
        composite_sha256: format!("{}-{n}", base64::encode(sha.finalize())),
        parts: n,
        retries,
    }
}

/// One multipart upload in progress.
#[derive(Debug)]
pub struct Upload<'a> {
    /// The S3 client.
    pub client: &'a Client,
    /// Where the archive goes.
    pub placement: &'a Placement,
    /// Its key.
    pub key: &'a str,
    /// Part size (before growing for [`MAX_PARTS`]).
    pub part_size: u64,
    /// Parts in flight at once.
    pub concurrency: usize,
    /// Attempts per part.
    pub attempts: u32,
}

impl Upload<'_> {
    fn retryable(&self, op: &'static str, detail: String) -> S3Error {
        S3Error::Retryable { op, bucket: self.placement.bucket_shown().to_owned(), detail }
    }

    /// Uploads the archive at `path` (with `digests`) in parts; returns what
    /// the completed object must match. The upload is aborted on failure.
    pub async fn run(&self, path: &Path, digests: &Digests) -> Result<Expected, S3Error> {
        let bucket = self.placement.bucket.as_str();
        let upload_id = self
            .with_retries("CreateMultipartUpload", None, || async {
                let out = self
                    .client
                    .create_multipart_upload()
                    .bucket(bucket)
                    .key(self.key)
                    .content_type("application/x-7z-compressed")
                    .metadata("sha256", &digests.sha256)
                    .checksum_algorithm(ChecksumAlgorithm::Sha256)
                    .send()
                    .await
                    .map_err(|e| classify("CreateMultipartUpload", self.placement, &e))?;
                out.upload_id.ok_or_else(|| {
                    self.retryable("CreateMultipartUpload", "the server returned no upload id".to_owned())
                })
            })
            .await?;
        let retries = AtomicU32::new(0);
        match self.parts_and_complete(path, digests, &upload_id, &retries).await {
            Ok(e) => Ok(e),
            Err(e) => {
                self.abort(&upload_id).await;
                Err(e)
            }
        }
    }

    async fn parts_and_complete(
        &self,
        path: &Path,
        digests: &Digests,
        upload_id: &str,
        retries: &AtomicU32,
    ) -> Result<Expected, S3Error> {
        let file = std::fs::File::open(path)
            .map_err(|e| self.retryable("UploadPart", format!("open archive {}: {e}", path.display())))?;
        let file = Arc::new(file);
        let ranges = plan(digests.size, self.part_size);
        let mut parts: Vec<PartDone> = futures::stream::iter(ranges)
            .map(|r| self.part(file.clone(), r, upload_id, retries))
            .buffer_unordered(self.concurrency.max(1))
            .try_collect()
            .await?;
        parts.sort_by_key(|p| p.number);
        let completed = CompletedMultipartUpload::builder()
            .set_parts(Some(
                parts
                    .iter()
                    .map(|p| {
                        CompletedPart::builder()
                            .part_number(p.number)
                            .e_tag(&p.etag)
                            .checksum_sha256(base64::encode(p.sha256))
                            .build()
                    })
                    .collect(),
            ))
            .build();
        let bucket = self.placement.bucket.as_str();
        let first_try = AtomicU32::new(0);
        self.with_retries("CompleteMultipartUpload", Some(retries), || async {
            let attempt = first_try.fetch_add(1, Ordering::Relaxed);
            match self
                .client
                .complete_multipart_upload()
                .bucket(bucket)
                .key(self.key)
                .upload_id(upload_id)
                .multipart_upload(completed.clone())
                .send()
                .await
            {
                Ok(_) => Ok(()),
                // An earlier attempt completed it but its answer was lost: the HEAD decides.
                Err(e) if attempt > 0 && e.code() == Some("NoSuchUpload") => Ok(()),
                Err(e) => Err(classify("CompleteMultipartUpload", self.placement, &e)),
            }
        })
        .await?;
        Ok(expected(&parts, retries.load(Ordering::Relaxed)))
    }

    /// Reads part `r` and uploads it, retrying transient failures.
    async fn part(
        &self,
        file: Arc<std::fs::File>,
        r: PartRange,
        upload_id: &str,
        retries: &AtomicU32,
    ) -> Result<PartDone, S3Error> {
        let (bytes, md5, sha256) = tokio::task::spawn_blocking(move || read_part(&file, r))
            .await
            .map_err(|e| self.retryable("UploadPart", format!("join read task: {e}")))?
            .map_err(|e| self.retryable("UploadPart", format!("read part {} of the archive: {e}", r.number)))?;
        let (md5_b64, sha_b64, md5_hex) = (base64::encode(md5), base64::encode(sha256), hex::encode(md5));
        let bucket = self.placement.bucket.as_str();
        let etag = self
            .with_retries("UploadPart", Some(retries), || async {
                let send = self
                    .client
                    .upload_part()
                    .bucket(bucket)
                    .key(self.key)
                    .upload_id(upload_id)
                    .part_number(r.number)
                    .content_length(i64::try_from(r.len).unwrap_or(i64::MAX))
                    .content_md5(&md5_b64)
                    .checksum_sha256(&sha_b64)
                    .body(ByteStream::from(bytes.clone()))
                    .send();
                let out = tokio::time::timeout(attempt_timeout(r.len), send)
                    .await
                    .map_err(|_| self.retryable("UploadPart", format!("part {} timed out", r.number)))?
                    .map_err(|e| classify("UploadPart", self.placement, &e))?;
                let etag = out.e_tag().map(|e| e.trim_matches('"').to_ascii_lowercase()).unwrap_or_default();
                // A plain MD5 ETag must be ours (encrypted objects have other ETags: not checked).
                let is_md5 = etag.len() == 32 && etag.bytes().all(|b| b.is_ascii_hexdigit());
                if is_md5 && etag != md5_hex {
                    return Err(self.retryable(
                        "UploadPart",
                        format!("part {}: the server stored other bytes (ETag {etag}, sent MD5 {md5_hex})", r.number),
                    ));
                }
                if let Some(echoed) = out.checksum_sha256()
                    && echoed != sha_b64
                {
                    return Err(self.retryable(
                        "UploadPart",
                        format!("part {}: the server's SHA-256 {echoed} is not the one sent", r.number),
                    ));
                }
                Ok(out.e_tag().unwrap_or_default().to_owned())
            })
            .await?;
        Ok(PartDone { number: r.number, etag, md5, sha256 })
    }

    /// Runs `op` up to `self.attempts` times while it fails with a retryable
    /// error, counting the retries in `retries`.
    async fn with_retries<T, F, Fut>(
        &self,
        name: &'static str,
        retries: Option<&AtomicU32>,
        mut op: F,
    ) -> Result<T, S3Error>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, S3Error>>,
    {
        let mut attempt = 1;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e @ S3Error::Retryable { .. }) if attempt < self.attempts => {
                    if let Some(r) = retries {
                        r.fetch_add(1, Ordering::Relaxed);
                    }
                    let pause = backoff(attempt);
                    tracing::warn!(
                        op = name,
                        attempt,
                        pause_ms = pause.as_millis() as u64,
                        error = %format!("{e:#}"),
                        "s3 request failed, retrying"
                    );
                    tokio::time::sleep(pause).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Aborts the upload so its parts do not linger (best effort: logged).
    async fn abort(&self, upload_id: &str) {
        let bucket = self.placement.bucket.as_str();
        let aborted = self
            .with_retries("AbortMultipartUpload", None, || async {
                match self
                    .client
                    .abort_multipart_upload()
                    .bucket(bucket)
                    .key(self.key)
                    .upload_id(upload_id)
                    .send()
                    .await
                {
                    Ok(_) => Ok(()),
                    Err(e) if e.code() == Some("NoSuchUpload") => Ok(()),
                    Err(e) => Err(classify("AbortMultipartUpload", self.placement, &e)),
                }
            })
            .await;
        match aborted {
            Ok(()) => tracing::info!(bucket = self.placement.bucket_shown(), "aborted the failed multipart upload"),
            Err(e) => tracing::warn!(
                error = %format!("{e:#}"),
                "could not abort the failed multipart upload: its parts stay until the bucket's lifecycle removes them"
            ),
        }
    }
}

/// Reads part `r` of `file` and hashes it (MD5, SHA-256).
fn read_part(file: &std::fs::File, r: PartRange) -> std::io::Result<(bytes::Bytes, [u8; 16], [u8; 32])> {
    let len = usize::try_from(r.len).map_err(std::io::Error::other)?;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, r.offset)?;
    let md5: [u8; 16] = Md5::digest(&buf).into();
    let sha256: [u8; 32] = Sha256::digest(&buf).into();
    Ok((bytes::Bytes::from(buf), md5, sha256))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_cover_the_archive_once() {
        const MIB: u64 = 1 << 20;
        let p = plan(20 * MIB + 1, 8 * MIB);
        assert_eq!(
            p.iter().map(|r| (r.number, r.len)).collect::<Vec<_>>(),
            [(1, 8 * MIB), (2, 8 * MIB), (3, 4 * MIB + 1)]
        );
        assert_eq!(p[2].offset, 16 * MIB);
        assert_eq!(plan(8 * MIB, 8 * MIB).len(), 1);
        assert!(plan(0, 8 * MIB).is_empty());
        // 1 TiB in 5 MiB parts would be 209 716 parts: the part size grows.
        let big = plan(1 << 40, 5 * MIB);
        assert!(big.len() as u64 <= MAX_PARTS, "{}", big.len());
        assert_eq!(big.iter().map(|r| r.len).sum::<u64>(), 1 << 40);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(1) >= Duration::from_secs(1) && backoff(1) < Duration::from_millis(1300));
        assert!(backoff(3) >= Duration::from_secs(4));
        assert!(backoff(30) >= MAX_BACKOFF && backoff(30) <= MAX_BACKOFF + MAX_BACKOFF / 4);
    }

    #[test]
    fn expected_etag_is_the_multipart_convention() {
        let part = |b: &[u8], n| PartDone {
            number: n,
            etag: String::new(),
            md5: Md5::digest(b).into(),
            sha256: Sha256::digest(b).into(),
        };
        let e = expected(&[part(b"a", 1), part(b"b", 2)], 0);
        let mut cat = Vec::new();
        cat.extend_from_slice(&Md5::digest(b"a"));
        cat.extend_from_slice(&Md5::digest(b"b"));
        assert_eq!(e.etag, format!("{}-2", hex::encode(Md5::digest(&cat))));
        assert!(e.composite_sha256.ends_with("-2"));
        assert_eq!(e.parts, 2);
    }
}
