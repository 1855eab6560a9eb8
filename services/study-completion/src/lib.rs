//! The study-completion service.
//!
//! Consumes *instance stored*, keeps per-study state in the JetStream KV
//! bucket `bidsflux_v1_studies` (so a restart loses nothing: timers resume
//! from the stored deadlines), and publishes *study completed* with the
//! reason once a study has been quiet for the configured period.
//!
//! Exactly one completion per study generation: the state is updated with
//! compare-and-set, and the event carries a de-duplication id
//! (`completed:<uid>:<generation>`), so a crash between publishing and
//! recording, or two instances racing, cannot produce a second one.

mod config;
pub mod rules;
pub mod state;
mod store;
mod timers;

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::kv;
use bidsflux_messaging::topology::Requirement;
use bidsflux_messaging::{Bus, ConsumerOptions, Delivery, HandlerError, now_unix_ms, run_consumer, subjects, trace};
use bidsflux_proto::v1 as pb;
use bidsflux_session::Uid;
use prost::Message as _;
use tokio_util::sync::CancellationToken;

pub use config::Config;

use crate::state::Applied;
use crate::store::WriteError;
use crate::timers::Timers;

/// JetStream objects this service needs.
pub const REQUIRES: &[Requirement] = &[
    Requirement::Consumer { stream: subjects::STREAM_INSTANCES, name: subjects::CONSUMER_STUDY_COMPLETION },
    Requirement::Stream(subjects::STREAM_STUDIES),
    Requirement::KeyValue(subjects::KV_STUDIES),
    Requirement::Stream(subjects::STREAM_DEADLETTER),
];

/// Runs the service until `shutdown` is cancelled.
pub async fn run(config: Config, bus: Bus, shutdown: CancellationToken) -> anyhow::Result<()> {
    let kv = bus.js.get_key_value(subjects::KV_STUDIES).await.context("open the studies KV bucket")?;
    let timers = Timers::start(bus.clone(), kv.clone(), config.clone(), shutdown.clone());
    let resumed = resume_open_studies(&kv, &timers).await.context("resume open studies")?;
    tracing::info!(resumed, quiet_period_ms = config.quiet_period.as_millis() as u64, "study-completion started");

    let quiet_ms = config.quiet_period.as_millis() as i64;
    let mut opts = ConsumerOptions::new(subjects::STREAM_INSTANCES, subjects::CONSUMER_STUDY_COMPLETION);
    opts.concurrency = 8;
    run_consumer(bus, opts, shutdown, study_of, move |d: Delivery| {
        let kv = kv.clone();
        let timers = timers.clone();
        async move { on_instance(&kv, &timers, quiet_ms, d).await }
    })
    .await
}

fn study_of(d: &Delivery) -> Option<String> {
    pb::InstanceStored::decode(d.payload.as_ref()).ok().map(|e| e.study_instance_uid)
}

/// Schedules every study that was open when the service last stopped.
async fn resume_open_studies(kv: &kv::Store, timers: &Timers) -> anyhow::Result<usize> {
    use futures::TryStreamExt as _;
    let keys: Vec<String> = kv.keys().await?.try_collect().await?;
    let mut n = 0;
    for key in keys {
        let Some(entry) = kv.entry(key.clone()).await? else { continue };
        let Ok(s) = pb::StudyState::decode(entry.value.as_ref()) else {
            tracing::warn!(key, "undecodable study state ignored");
            continue;
        };
        if s.status == pb::StudyStatus::Open as i32 {
            timers.schedule(s.study_instance_uid.clone(), s.deadline_unix_ms);
            n += 1;
        }
    }
    Ok(n)
}

#[tracing::instrument(skip_all, fields(study_uid, sop_uid))]
async fn on_instance(kv: &kv::Store, timers: &Timers, quiet_ms: i64, d: Delivery) -> Result<(), HandlerError> {
    let ev: pb::InstanceStored = d.decode()?;
    let study =
        Uid::parse("StudyInstanceUID", &ev.study_instance_uid).map_err(|e| HandlerError::malformed(e.to_string()))?;
    Uid::parse("SOPInstanceUID", &ev.sop_instance_uid).map_err(|e| HandlerError::malformed(e.to_string()))?;
    let span = tracing::Span::current();
    span.record("study_uid", study.as_str());
    span.record("sop_uid", ev.sop_instance_uid.as_str());
    let traceparent = trace::current_traceparent();
    for _ in 0..store::MAX_CAS_ATTEMPTS {
        let current = store::read(kv, study.as_str()).await?;
        let (next, applied) = state::apply_instance(current.state, &ev, now_unix_ms(), quiet_ms, traceparent.clone());
        if applied == Applied::Duplicate {
            tracing::debug!("duplicate instance event ignored");
            return Ok(());
        }
        match store::write(kv, study.as_str(), &next, current.revision).await {
            Ok(_) => {
                if applied == Applied::Amendment {
                    tracing::info!(generation = next.generation, "late instance opened an amendment");
                } else if applied == Applied::NewStudy {
                    tracing::info!("new study");
                }
                timers.schedule(next.study_instance_uid.clone(), next.deadline_unix_ms);
                return Ok(());
            }
            Err(WriteError::Conflict) => {
                // Another writer got there first: re-read and apply again.
                tracing::debug!("study state changed concurrently, retrying");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // Not a conflict: retrying here would not help; the consumer
            // retries the message later and dead-letters it in the end.
            Err(e) => return Err(HandlerError::Transient(e.into())),
        }
    }
    Err(HandlerError::Transient(anyhow::anyhow!(
        "store study state: it kept changing ({} compare-and-set conflicts in a row)",
        store::MAX_CAS_ATTEMPTS
    )))
}
