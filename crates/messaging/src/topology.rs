//! The JetStream objects of bidsflux.
//!
//! [`declare`] creates or updates them (idempotent; the provisioner runs it at
//! start). Services call [`require`] at start and refuse to run with a message
//! that names what is missing.
//!
//! Only NATS 2.9 features are used (Debian's nats-server is 2.9.10).

use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};

use crate::subjects as s;

/// Something a service needs to exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requirement {
    /// A stream.
    Stream(&'static str),
    /// A durable consumer on a stream.
    Consumer {
        /// Stream.
        stream: &'static str,
        /// Durable name.
        name: &'static str,
    },
    /// A KV bucket.
    KeyValue(&'static str),
    /// An object store bucket.
    ObjectStore(&'static str),
}

/// Missing or unreachable topology.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// An object does not exist.
    #[error("JetStream {what} is missing; run bidsflux-provisioner against this NATS server first")]
    Missing {
        /// e.g. `stream BIDSFLUX_V1_INSTANCES`.
        what: String,
    },
    /// The server could not be asked.
    #[error("cannot check JetStream {what}: {reason}")]
    Unreachable {
        /// The object.
        what: String,
        /// Cause.
        reason: String,
    },
    /// Declaring failed.
    #[error("cannot declare JetStream {what}: {reason}")]
    Declare {
        /// The object.
        what: String,
        /// Cause.
        reason: String,
    },
}

/// Retention of event streams (events are small; replays help operators).
const EVENT_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);
/// De-duplication window: a resend with the same `Nats-Msg-Id` within it is dropped.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(3600);
/// Largest value of the studies KV bucket (headers included, as the server counts them).
///
/// Equal to NATS's default `max_payload`, so it binds even on a server
/// configured with a larger payload: a study state that outgrows it (about
/// 130 000 instances, see `docs/bus.md`) is refused with JetStream error 10054
/// instead of growing without bound.
pub const KV_STUDIES_MAX_VALUE_SIZE: i32 = 1024 * 1024;

/// The streams: name, subjects, max age (zero = keep).
pub fn streams() -> Vec<stream::Config> {
    let evs = |name: &str, subjects: &[&str], max_age: Duration| stream::Config {
        name: name.to_owned(),
        subjects: subjects.iter().map(|s| (*s).to_owned()).collect(),
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        max_age,
        duplicate_window: DUPLICATE_WINDOW,
        ..Default::default()
    };
    let ev = |name: &str, subject: &str, max_age: Duration| evs(name, &[subject], max_age);
    vec![
        ev(s::STREAM_INSTANCES, s::INSTANCE_STORED, EVENT_MAX_AGE),
        ev(s::STREAM_CONFLICTS, s::INSTANCE_CONFLICT, Duration::ZERO),
        // One stream for a study's outcome; the uploader's consumer filters on `study.completed`.
        evs(s::STREAM_STUDIES, &[s::STUDY_COMPLETED, s::STUDY_DISCARDED, s::STUDY_HELD], EVENT_MAX_AGE),
        ev(s::STREAM_ARCHIVES, s::ARCHIVE_STORED, EVENT_MAX_AGE),
        ev(s::STREAM_INDEXED, s::STUDY_INDEXED, EVENT_MAX_AGE),
        ev(s::STREAM_DEADLETTER, &format!("{}.>", s::DEADLETTER_PREFIX), Duration::ZERO),
    ]
}

/// The durable pull consumers: (stream, config).
///
/// `max_deliver` is unlimited: the consumers count attempts themselves and
/// dead-letter, so the server never drops a message silently.
pub fn consumers() -> Vec<(&'static str, consumer::pull::Config)> {
    let c = |name: &str, subject: &str, ack_wait: Duration| consumer::pull::Config {
        durable_name: Some(name.to_owned()),
        filter_subject: subject.to_owned(),
        ack_policy: consumer::AckPolicy::Explicit,
        deliver_policy: consumer::DeliverPolicy::All,
        ack_wait,
        max_deliver: -1,
        max_ack_pending: 1000,
        ..Default::default()
    };
    vec![
        (s::STREAM_INSTANCES, c(s::CONSUMER_STUDY_COMPLETION, s::INSTANCE_STORED, Duration::from_secs(30))),
        (s::STREAM_STUDIES, c(s::CONSUMER_UPLOADER, s::STUDY_COMPLETED, Duration::from_secs(120))),
        (s::STREAM_ARCHIVES, c(s::CONSUMER_INDEXER, s::ARCHIVE_STORED, Duration::from_secs(120))),
        // The uploader's spool lifecycle: delete a study's files once indexed or discarded.
        (s::STREAM_INDEXED, c(s::CONSUMER_UPLOADER_LIFECYCLE, s::STUDY_INDEXED, Duration::from_secs(120))),
        (s::STREAM_STUDIES, c(s::CONSUMER_UPLOADER_LIFECYCLE, s::STUDY_DISCARDED, Duration::from_secs(120))),
    ]
}

/// The KV buckets.
pub fn key_values() -> Vec<kv::Config> {
    vec![kv::Config {
        bucket: s::KV_STUDIES.to_owned(),
        description: "study-completion state per StudyInstanceUID".to_owned(),
        history: 5,
        max_value_size: KV_STUDIES_MAX_VALUE_SIZE,
        storage: stream::StorageType::File,
        ..Default::default()
    }]
}

/// The object store buckets (name, description).
pub fn object_stores() -> Vec<(&'static str, &'static str)> {
    vec![(s::OBJ_MANIFESTS, "manifests of archives too large for one ArchiveStored message")]
}

/// The stream backing an object store bucket, as async-nats lays it out.
///
/// No age limit: a manifest must outlive the event that refers to it, and
/// dead letters (kept for ever) may be replayed long after the event streams
/// have dropped them.
fn object_stream_config(bucket: &str, description: &str) -> stream::Config {
    stream::Config {
        name: format!("OBJ_{bucket}"),
        description: Some(description.to_owned()),
        subjects: vec![format!("$O.{bucket}.C.>"), format!("$O.{bucket}.M.>")],
        max_age: Duration::ZERO,
        storage: stream::StorageType::File,
        num_replicas: 1,
        discard: stream::DiscardPolicy::New,
        allow_rollup: true,
        allow_direct: true,
        ..Default::default()
    }
}

/// The stream backing a KV bucket, as async-nats lays it out (`KV_<bucket>`, `$KV.<bucket>.>`).
fn kv_stream_config(cfg: &kv::Config) -> stream::Config {
    stream::Config {
        name: format!("KV_{}", cfg.bucket),
        description: Some(cfg.description.clone()),
        subjects: vec![format!("$KV.{}.>", cfg.bucket)],
        max_messages_per_subject: cfg.history.max(1),
        max_bytes: cfg.max_bytes,
        max_age: cfg.max_age,
        max_message_size: cfg.max_value_size,
        storage: cfg.storage,
        allow_rollup: true,
        deny_delete: true,
        deny_purge: false,
        allow_direct: true,
        num_replicas: 1,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    }
}

/// What [`reconcile`] does, or would do, to one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Change {
    /// Missing: created.
    Create,
    /// There, with settings that differ: updated.
    Update,
    /// There, as wanted: left alone (no write request).
    Keep,
}

impl Change {
    /// `create`, `update` or `keep`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Update => "update",
            Self::Keep => "keep",
        }
    }
}

/// One object of the topology and what [`reconcile`] did (or, dry, would do) to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reconciled {
    /// `stream`, `consumer`, `KV bucket` or `object store`.
    pub kind: &'static str,
    /// Its name (`STREAM/consumer` for a consumer).
    pub name: String,
    /// What happened.
    pub change: Change,
    /// For an update: the settings that differed.
    pub differs: Vec<String>,
}

/// Whether every field set in `wanted` has the same value in `have`. Left at its default, a
/// field is either not serialized or a zero, which JetStream reads as "the server's default" (it
/// then reports e.g. `max_bytes: -1` or `num_replicas: 1`): neither counts as a change.
fn covers(have: &serde_json::Value, wanted: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (have, wanted) {
        (_, Value::Number(n)) if n.as_f64() == Some(0.0) => true,
        (Value::Object(h), Value::Object(w)) => w.iter().all(|(k, wv)| h.get(k).is_some_and(|hv| covers(hv, wv))),
        (Value::Array(h), Value::Array(w)) => h.len() == w.len() && h.iter().zip(w).all(|(hv, wv)| covers(hv, wv)),
        _ => have == wanted,
    }
}

/// The settings of `wanted` that `have` does not have (by their JSON names), for the plan's
/// line; empty when it covers them all.
fn differences<T: serde::Serialize, U: serde::Serialize>(have: &T, wanted: &U) -> Vec<String> {
    let (Ok(h), Ok(serde_json::Value::Object(w))) = (serde_json::to_value(have), serde_json::to_value(wanted)) else {
        return vec!["(unreadable settings)".to_owned()];
    };
    w.iter().filter(|(k, wv)| !h.get(k.as_str()).is_some_and(|hv| covers(hv, wv))).map(|(k, _)| k.clone()).collect()
}

/// Brings every stream, durable consumer, KV bucket and object store to its settings: creates what
/// is missing, updates what differs, and makes no write request for what is as wanted. With
/// `dry_run` nothing is written; the result says what a real run would do. Idempotent.
pub async fn reconcile(js: &jetstream::Context, dry_run: bool) -> Result<Vec<Reconciled>, TopologyError> {
    use async_nats::jetstream::context::GetStreamErrorKind;
    let mut done = Vec::new();
    let mut all_streams: Vec<(&'static str, stream::Config)> = streams().into_iter().map(|c| ("stream", c)).collect();
    all_streams.extend(key_values().iter().map(|c| ("KV bucket", kv_stream_config(c))));
    all_streams.extend(object_stores().into_iter().map(|(b, d)| ("object store", object_stream_config(b, d))));
    for (kind, cfg) in all_streams {
        let shown = match kind {
            "KV bucket" => cfg.name.trim_start_matches("KV_").to_owned(),
            "object store" => cfg.name.trim_start_matches("OBJ_").to_owned(),
            _ => cfg.name.clone(),
        };
        let what = format!("{kind} {shown}");
        let mut differs = Vec::new();
        let change = match js.get_stream(&cfg.name).await {
            Ok(mut st) => {
                let info = st
                    .info()
                    .await
                    .map_err(|e| TopologyError::Unreachable { what: what.clone(), reason: e.to_string() })?;
                differs = differences(&info.config, &cfg);
                if differs.is_empty() { Change::Keep } else { Change::Update }
            }
            Err(e) if matches!(e.kind(), GetStreamErrorKind::JetStream(_)) => Change::Create,
            Err(e) => return Err(TopologyError::Unreachable { what, reason: e.to_string() }),
        };
        if !dry_run {
            match change {
                Change::Create => {
                    js.create_stream(cfg).await.map_err(|e| TopologyError::Declare { what, reason: e.to_string() })?;
                }
                Change::Update => {
                    js.update_stream(cfg).await.map_err(|e| TopologyError::Declare { what, reason: e.to_string() })?;
                }
                Change::Keep => {}
            }
        }
        done.push(Reconciled { kind, name: shown, change, differs });
    }
    for (stream, cfg) in consumers() {
        let name = cfg.durable_name.clone().unwrap_or_default();
        let what = format!("consumer {name} on {stream}");
        let existing = match js.get_stream(stream).await {
            Ok(st) => match st.get_consumer::<consumer::pull::Config>(&name).await {
                Ok(mut c) => Some(
                    c.info()
                        .await
                        .map_err(|e| TopologyError::Unreachable { what: what.clone(), reason: e.to_string() })?
                        .config
                        .clone(),
                ),
                Err(_) => None,
            },
            // The stream itself is created above, except in a dry run.
            Err(e) if dry_run && matches!(e.kind(), GetStreamErrorKind::JetStream(_)) => None,
            Err(e) => return Err(TopologyError::Unreachable { what, reason: e.to_string() }),
        };
        let differs = existing.as_ref().map(|have| differences(have, &cfg)).unwrap_or_default();
        let change = match existing {
            None => Change::Create,
            Some(_) if differs.is_empty() => Change::Keep,
            Some(_) => Change::Update,
        };
        if !dry_run {
            match change {
                Change::Create => {
                    let st = js
                        .get_stream(stream)
                        .await
                        .map_err(|e| TopologyError::Declare { what: what.clone(), reason: e.to_string() })?;
                    st.create_consumer(cfg)
                        .await
                        .map_err(|e| TopologyError::Declare { what, reason: e.to_string() })?;
                }
                Change::Update => {
                    js.update_consumer_on_stream(cfg, stream)
                        .await
                        .map_err(|e| TopologyError::Declare { what, reason: e.to_string() })?;
                }
                Change::Keep => {}
            }
        }
        done.push(Reconciled { kind: "consumer", name: format!("{stream}/{name}"), change, differs });
    }
    Ok(done)
}

/// Creates or updates every object (see [`reconcile`]).
pub async fn declare(js: &jetstream::Context) -> Result<(), TopologyError> {
    reconcile(js, false).await.map(|_| ())
}

/// Checks that each requirement exists.
pub async fn require(js: &jetstream::Context, needs: &[Requirement]) -> Result<(), TopologyError> {
    use async_nats::jetstream::context::GetStreamErrorKind;
    for need in needs {
        match *need {
            Requirement::Stream(name) | Requirement::Consumer { stream: name, .. } => {
                let what = format!("stream {name}");
                let st = match js.get_stream(name).await {
                    Ok(st) => st,
                    Err(e) if matches!(e.kind(), GetStreamErrorKind::JetStream(_)) => {
                        return Err(TopologyError::Missing { what });
                    }
                    Err(e) => return Err(TopologyError::Unreachable { what, reason: e.to_string() }),
                };
                if let Requirement::Consumer { name: consumer, .. } = *need {
                    let what = format!("consumer {consumer} on stream {name}");
                    st.consumer_info(consumer).await.map_err(|_| TopologyError::Missing { what })?;
                }
            }
            Requirement::ObjectStore(bucket) => {
                js.get_object_store(bucket)
                    .await
                    .map_err(|_| TopologyError::Missing { what: format!("object store {bucket}") })?;
            }
            Requirement::KeyValue(bucket) => {
                js.get_key_value(bucket)
                    .await
                    .map_err(|_| TopologyError::Missing { what: format!("KV bucket {bucket}") })?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn studies_bucket_is_bounded_and_manifests_never_expire() {
        let kv = key_values().into_iter().find(|c| c.bucket == s::KV_STUDIES).unwrap();
        assert_eq!(kv.max_value_size, KV_STUDIES_MAX_VALUE_SIZE);
        assert_eq!(kv_stream_config(&kv).max_message_size, KV_STUDIES_MAX_VALUE_SIZE);
        for (bucket, description) in object_stores() {
            assert_eq!(object_stream_config(bucket, description).max_age, Duration::ZERO, "{bucket}");
        }
    }

    #[test]
    fn study_outcomes_share_the_studies_stream_and_the_uploader_sees_completions_only() {
        let studies = streams().into_iter().find(|c| c.name == s::STREAM_STUDIES).unwrap();
        assert_eq!(studies.subjects, [s::STUDY_COMPLETED, s::STUDY_DISCARDED, s::STUDY_HELD]);
        let (_, uploader) = consumers().into_iter().find(|(st, _)| *st == s::STREAM_STUDIES).unwrap();
        assert_eq!(uploader.filter_subject, s::STUDY_COMPLETED);
    }

    #[test]
    fn the_spool_lifecycle_sees_indexed_and_discarded_studies() {
        let lifecycle: Vec<_> = consumers()
            .into_iter()
            .filter(|(_, c)| c.durable_name.as_deref() == Some(s::CONSUMER_UPLOADER_LIFECYCLE))
            .map(|(st, c)| (st, c.filter_subject))
            .collect();
        assert_eq!(
            lifecycle,
            [(s::STREAM_INDEXED, s::STUDY_INDEXED.to_owned()), (s::STREAM_STUDIES, s::STUDY_DISCARDED.to_owned())]
        );
    }
}
