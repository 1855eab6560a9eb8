//! Reads and compare-and-set writes of [`pb::StudyState`] in the studies KV bucket.
//!
//! A write fails with [`WriteError::Conflict`] only when another writer
//! changed the key since it was read (the caller re-reads and applies its
//! change again, at most [`MAX_CAS_ATTEMPTS`] times); every other failure is
//! returned as it is, so nothing retries blindly.

use anyhow::Context as _;
use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::kv::{self, CreateErrorKind, UpdateErrorKind};
use async_nats::jetstream::{self, ErrorCode};
use bidsflux_messaging::topology::KV_STUDIES_MAX_VALUE_SIZE;
use bidsflux_proto::v1 as pb;
use prost::Message as _;

/// Compare-and-set attempts for one change before giving up. Each conflict
/// means another writer made progress, so only a storm of writes to one study
/// reaches it.
pub const MAX_CAS_ATTEMPTS: u32 = 100;

/// Largest encoded state written: the bucket's value limit less room for the
/// write's headers, which count against the same limit (and NATS's
/// `max_payload`).
pub const MAX_STATE_BYTES: usize = KV_STUDIES_MAX_VALUE_SIZE as usize - 1024;

/// The state of a study as read, with the revision to write against.
#[derive(Debug, Default)]
pub struct Current {
    /// The state, if the key holds one (not deleted).
    pub state: Option<pb::StudyState>,
    /// Revision of the key's last entry (a delete marker included); `None` if it never existed.
    pub revision: Option<u64>,
}

/// Why a write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Another writer changed the state since it was read.
    #[error("study state changed concurrently")]
    Conflict,
    /// The state outgrew the bucket's value limit (see "Known limits" in `docs/bus.md`).
    #[error(
        "state of study {study} is too large to store: {bytes} bytes for {instances} instances \
         (limit {limit} bytes, see \"Known limits\" in docs/bus.md)"
    )]
    TooLarge {
        /// StudyInstanceUID.
        study: String,
        /// Encoded size of the state.
        bytes: usize,
        /// Instance fingerprints in the state.
        instances: usize,
        /// The limit.
        limit: usize,
    },
    /// Anything else (server unreachable, timeout, ...).
    #[error("write study state: {0:#}")]
    Other(anyhow::Error),
}

/// Reads the state of `study`.
pub async fn read(kv: &kv::Store, study: &str) -> anyhow::Result<Current> {
    let Some(entry) = kv.entry(study).await.context("read study state")? else { return Ok(Current::default()) };
    if entry.operation != kv::Operation::Put {
        return Ok(Current { state: None, revision: Some(entry.revision) });
    }
    let state = pb::StudyState::decode(entry.value.as_ref()).context("decode study state")?;
    Ok(Current { state: Some(state), revision: Some(entry.revision) })
}

/// Writes `state` if the key is still at `revision` (`None`: if it does not exist yet).
pub async fn write(
    kv: &kv::Store,
    study: &str,
    state: &pb::StudyState,
    revision: Option<u64>,
) -> Result<u64, WriteError> {
    let too_large = |bytes: usize| WriteError::TooLarge {
        study: study.to_owned(),
        bytes,
        instances: state.instance_hashes.len(),
        limit: MAX_STATE_BYTES,
    };
    let value = state.encode_to_vec();
    if value.len() > MAX_STATE_BYTES {
        return Err(too_large(value.len()));
    }
    let bytes = value.len();
    let result = match revision {
        None => kv.create(study, value.into()).await.map_err(|e| match e.kind() {
            CreateErrorKind::AlreadyExists => Failure::Conflict,
            _ => classify(e),
        }),
        Some(rev) => kv.update(study, value.into(), rev).await.map_err(|e| match e.kind() {
            UpdateErrorKind::WrongLastRevision => Failure::Conflict,
            _ => classify(e),
        }),
    };
    result.map_err(|f| match f {
        Failure::Conflict => WriteError::Conflict,
        Failure::TooLarge => too_large(bytes),
        Failure::Other(e) => WriteError::Other(e),
    })
}

/// Why [`update`] did not write.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading the state failed.
    #[error("{0:#}")]
    Read(anyhow::Error),
    /// Writing failed for a reason other than a conflict (too large, server unreachable, ...).
    #[error(transparent)]
    Write(WriteError),
    /// Every attempt lost to another writer.
    #[error("store study state: it kept changing ({MAX_CAS_ATTEMPTS} compare-and-set conflicts in a row)")]
    Contended,
}

impl bidsflux_messaging::Classify for StoreError {
    /// A state too large to store only grows with retries: dead-lettered at once (see "Known
    /// limits" in `docs/bus.md`). Everything else is the KV bucket being unavailable or busy.
    fn class(&self) -> bidsflux_messaging::ErrorClass {
        match self {
            Self::Write(WriteError::TooLarge { .. }) => {
                bidsflux_messaging::ErrorClass::Permanent(pb::FailureKind::Permanent)
            }
            _ => bidsflux_messaging::ErrorClass::Transient,
        }
    }
}

/// What [`update`] did.
#[derive(Debug)]
pub struct Updated<T> {
    /// The state before the change (as last read).
    pub before: Option<pb::StudyState>,
    /// The state written, `None` when `change` asked for no write.
    pub written: Option<pb::StudyState>,
    /// What `change` returned with it.
    pub value: T,
}

/// Reads `study`, applies `change` and writes the result with compare-and-set, re-reading and
/// applying `change` again on a conflict (at most [`MAX_CAS_ATTEMPTS`] times). `change` returns
/// `Ok((Some(state), v))` to write `state`, `Ok((None, v))` to leave the key alone, or an error
/// that ends the update; it must be pure, as it may run several times.
pub async fn update<T, E>(
    kv: &kv::Store,
    study: &str,
    mut change: impl FnMut(Option<pb::StudyState>) -> Result<(Option<pb::StudyState>, T), E>,
) -> Result<Updated<T>, E>
where
    E: From<StoreError>,
{
    for _ in 0..MAX_CAS_ATTEMPTS {
        let current = read(kv, study).await.map_err(StoreError::Read)?;
        let before = current.state.clone();
        let (next, value) = change(current.state)?;
        let Some(next) = next else { return Ok(Updated { before, written: None, value }) };
        match write(kv, study, &next, current.revision).await {
            Ok(_) => return Ok(Updated { before, written: Some(next), value }),
            Err(WriteError::Conflict) => {
                // Another writer got there first: re-read and apply again.
                tracing::debug!(study_uid = %study, "study state changed concurrently, retrying");
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            Err(e) => return Err(StoreError::Write(e).into()),
        }
    }
    Err(StoreError::Contended.into())
}

/// Every study state in the bucket (undecodable values are skipped with a warning).
pub async fn scan(kv: &kv::Store) -> anyhow::Result<Vec<pb::StudyState>> {
    use futures::TryStreamExt as _;
    let keys: Vec<String> = kv.keys().await.context("list studies")?.try_collect().await.context("list studies")?;
    let mut out = Vec::with_capacity(keys.len());
    for key in keys {
        match read(kv, &key).await {
            Ok(Current { state: Some(s), .. }) => out.push(s),
            Ok(_) => {}
            Err(e) => tracing::warn!(key, error = %format!("{e:#}"), "unreadable study state skipped"),
        }
    }
    Ok(out)
}

enum Failure {
    Conflict,
    TooLarge,
    Other(anyhow::Error),
}

/// Looks through the error's causes for the server's answer: async-nats maps
/// "wrong last sequence" (10071, what NATS 2.9 answers to a stale revision) to
/// a conflict kind itself, but a future mapping may leave it generic.
fn classify<E: std::error::Error + Send + Sync + 'static>(e: E) -> Failure {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = e.source();
    while let Some(c) = cause {
        if let Some(js) = c.downcast_ref::<jetstream::Error>() {
            match js.error_code() {
                ErrorCode::STREAM_WRONG_LAST_SEQUENCE => return Failure::Conflict,
                ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM => return Failure::TooLarge,
                _ => {}
            }
        }
        if c.downcast_ref::<PublishError>().is_some_and(|p| p.kind() == PublishErrorKind::MaxPayloadExceeded) {
            return Failure::TooLarge;
        }
        cause = c.source();
    }
    Failure::Other(anyhow::Error::new(e))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use async_nats::jetstream::stream;
    use bidsflux_messaging::{Bus, subjects, topology};
    use bidsflux_testsupport::NatsServer;

    use super::*;

    fn state(instances: u64) -> pb::StudyState {
        pb::StudyState {
            study_instance_uid: "1.2.3".into(),
            status: pb::StudyStatus::Open as i32,
            instance_hashes: (0..instances).collect(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn only_stale_revisions_are_conflicts_and_oversized_states_are_refused() {
        let nats = NatsServer::start().await.unwrap();
        let bus = Bus::connect(&nats.url, "study-completion", Duration::from_secs(5)).await.unwrap();
        topology::declare(&bus.js).await.unwrap();
        let kv = bus.js.get_key_value(subjects::KV_STUDIES).await.unwrap();

        let rev = write(&kv, "1.2.3", &state(1), None).await.unwrap();
        assert!(matches!(write(&kv, "1.2.3", &state(2), None).await, Err(WriteError::Conflict)));
        assert!(matches!(write(&kv, "1.2.3", &state(2), Some(rev + 7)).await, Err(WriteError::Conflict)));
        let rev = write(&kv, "1.2.3", &state(2), Some(rev)).await.unwrap();

        // About 130 000 fingerprints no longer fit: refused before sending, naming study and count.
        let err = write(&kv, "1.2.3", &state(131_000), Some(rev)).await.unwrap_err();
        assert!(matches!(err, WriteError::TooLarge { instances: 131_000, .. }), "{err}");
        assert!(err.to_string().contains("1.2.3") && err.to_string().contains("131000 instances"), "{err}");
        let current = read(&kv, "1.2.3").await.unwrap();
        assert_eq!((current.revision, current.state.map(|s| s.instance_hashes.len())), (Some(rev), Some(2)));

        // The server's own refusal (10054, from a bucket with a smaller limit) is recognised too.
        bus.js
            .create_stream(stream::Config {
                name: "KV_small".into(),
                subjects: vec!["$KV.small.>".into()],
                max_message_size: 256,
                max_messages_per_subject: 5,
                allow_direct: true,
                allow_rollup: true,
                discard: stream::DiscardPolicy::New,
                ..Default::default()
            })
            .await
            .unwrap();
        let small = bus.js.get_key_value("small").await.unwrap();
        let err = write(&small, "1.2.3", &state(40), None).await.unwrap_err();
        assert!(matches!(err, WriteError::TooLarge { instances: 40, .. }), "{err}");
        let rev = write(&small, "1.2.3", &state(1), None).await.unwrap();
        let err = write(&small, "1.2.3", &state(40), Some(rev)).await.unwrap_err();
        assert!(matches!(err, WriteError::TooLarge { instances: 40, .. }), "{err}");
    }
}
