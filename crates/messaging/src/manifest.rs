//! Manifests too large for one message.
//!
//! NATS refuses messages over `max_payload` (1 MiB by default). A manifest
//! entry is a few hundred bytes, so a study of a few thousand instances does
//! not fit in one `ArchiveStored`. [`offload`] moves such a manifest into the
//! JetStream object store bucket `bidsflux_v1_manifests` and leaves a
//! [`pb::ManifestRef`] (object name, entry count, SHA-256) in the event;
//! [`resolve`] puts it back on the consuming side and checks it.

use bidsflux_proto::v1 as pb;
use prost::Message as _;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncReadExt as _;

use crate::subjects;

/// Why a manifest could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The object store could not be reached or written (retry).
    #[error("object store {bucket}: {reason}")]
    Unavailable {
        /// Bucket.
        bucket: String,
        /// Cause.
        reason: String,
    },
    /// The object is missing or does not match its reference (will not heal).
    #[error("manifest {object} in {bucket}: {reason}")]
    Invalid {
        /// Bucket.
        bucket: String,
        /// Object name.
        object: String,
        /// What is wrong.
        reason: String,
    },
}

impl crate::consume::Classify for ManifestError {
    fn class(&self) -> crate::consume::ErrorClass {
        match self {
            Self::Unavailable { .. } => crate::consume::ErrorClass::Transient,
            Self::Invalid { .. } => {
                crate::consume::ErrorClass::Permanent(bidsflux_proto::v1::FailureKind::InvalidInput)
            }
        }
    }
}

/// Largest encoded event kept inline for a server with `max_payload`: a
/// quarter of it is left for headers and growth.
pub fn inline_limit(max_payload: usize) -> usize {
    max_payload - max_payload / 4
}

/// Name of a study archive's manifest object.
pub fn object_name(study: &str, generation: u32, archive_md5: &str) -> String {
    format!("{study}.{generation}.{archive_md5}.manifest")
}

/// Moves the manifest of `event` into the object store when the encoded
/// event is longer than `limit` bytes. Idempotent: the object name is derived
/// from the archive, and putting the same bytes again replaces them.
pub async fn offload(
    js: &async_nats::jetstream::Context,
    event: &mut pb::ArchiveStored,
    limit: usize,
) -> Result<bool, ManifestError> {
    if event.encoded_len() <= limit {
        return Ok(false);
    }
    let bucket = subjects::OBJ_MANIFESTS;
    let unavailable =
        |e: &dyn std::fmt::Display| ManifestError::Unavailable { bucket: bucket.to_owned(), reason: e.to_string() };
    let manifest = pb::Manifest { entries: std::mem::take(&mut event.manifest) };
    let bytes = manifest.encode_to_vec();
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let object = object_name(&event.study_instance_uid, event.generation, &event.md5);
    let store = js.get_object_store(bucket).await.map_err(|e| unavailable(&e))?;
    let put = store.put(object.as_str(), &mut bytes.as_slice()).await;
    if let Err(e) = put {
        event.manifest = manifest.entries;
        return Err(unavailable(&e));
    }
    event.manifest_ref =
        Some(pb::ManifestRef { bucket: bucket.to_owned(), object, entries: manifest.entries.len() as u64, sha256 });
    Ok(true)
}

/// Fills `event.manifest` from the object store when the event carries a
/// [`pb::ManifestRef`]; checks the entry count and SHA-256.
pub async fn resolve(js: &async_nats::jetstream::Context, event: &mut pb::ArchiveStored) -> Result<(), ManifestError> {
    let Some(r) = event.manifest_ref.clone() else { return Ok(()) };
    let invalid =
        |reason: String| ManifestError::Invalid { bucket: r.bucket.clone(), object: r.object.clone(), reason };
    if r.bucket != subjects::OBJ_MANIFESTS {
        return Err(invalid(format!("unknown manifest bucket (expected {})", subjects::OBJ_MANIFESTS)));
    }
    if !event.manifest.is_empty() {
        return Err(invalid("event has both an inline manifest and a reference".to_owned()));
    }
    let unavailable =
        |e: &dyn std::fmt::Display| ManifestError::Unavailable { bucket: r.bucket.clone(), reason: e.to_string() };
    let store = js.get_object_store(&r.bucket).await.map_err(|e| unavailable(&e))?;
    let mut object = match store.get(&r.object).await {
        Ok(o) => o,
        Err(e) if e.kind() == async_nats::jetstream::object_store::GetErrorKind::NotFound => {
            return Err(invalid("object not found".to_owned()));
        }
        Err(e) => return Err(unavailable(&e)),
    };
    let mut bytes = Vec::new();
    object.read_to_end(&mut bytes).await.map_err(|e| unavailable(&e))?;
    if hex::encode(Sha256::digest(&bytes)) != r.sha256 {
        return Err(invalid("SHA-256 does not match the reference".to_owned()));
    }
    let manifest = pb::Manifest::decode(bytes.as_slice()).map_err(|e| invalid(format!("cannot decode: {e}")))?;
    if manifest.entries.len() as u64 != r.entries {
        return Err(invalid(format!("{} entries, reference says {}", manifest.entries.len(), r.entries)));
    }
    event.manifest = manifest.entries;
    Ok(())
}
