//! Publishing the events a transition put in a study's outbox ([`crate::decide`]).
//!
//! Each entry is published with its de-duplication id, in order, in the study's trace; then the
//! published entries are removed with compare-and-set. A crash or a failed publish leaves them in
//! the state: the timer retries, and a restart finds them when it scans the bucket. Two writers
//! flushing the same entry publish it twice under one id, and JetStream keeps one.

use anyhow::Context as _;
use async_nats::jetstream::kv;
use bidsflux_messaging::{Bus, subjects, trace};
use bidsflux_proto::v1 as pb;
use prost::Message as _;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::study_kv::{self, StoreError};

/// Publishes every outbox entry of `study` and removes them; returns how many were published.
pub async fn flush(bus: &Bus, kv: &kv::Store, study: &str) -> anyhow::Result<usize> {
    let current = study_kv::read(kv, study).await?;
    let Some(s) = current.state else { return Ok(0) };
    if s.outbox.is_empty() {
        return Ok(0);
    }
    let parent = if s.traceparent.is_empty() {
        opentelemetry::Context::new()
    } else {
        trace::context_from_traceparent(&s.traceparent)
    };
    let span = tracing::info_span!("publish_study_events", study_uid = %study, generation = s.generation);
    let _ = span.set_parent(parent);
    let published: Vec<String> = async {
        let mut done = Vec::with_capacity(s.outbox.len());
        for entry in &s.outbox {
            publish(bus, entry).await?;
            done.push(entry.msg_id.clone());
        }
        Ok::<_, anyhow::Error>(done)
    }
    .instrument(span)
    .await?;
    let n = published.len();
    study_kv::update(kv, study, |s| -> Result<_, StoreError> {
        let Some(mut s) = s else { return Ok((None, ())) };
        let before = s.outbox.len();
        s.outbox.retain(|e| !published.contains(&e.msg_id));
        Ok(((s.outbox.len() != before).then_some(s), ()))
    })
    .await
    .context("remove published events from the study's outbox")?;
    Ok(n)
}

async fn publish(bus: &Bus, entry: &pb::OutboxEntry) -> anyhow::Result<()> {
    let id = Some(entry.msg_id.as_str());
    let payload = entry.payload.as_slice();
    match pb::OutboxKind::try_from(entry.kind) {
        Ok(pb::OutboxKind::StudyCompleted) => {
            let ev = pb::StudyCompleted::decode(payload).context("decode outbox entry")?;
            bus.publish(subjects::STUDY_COMPLETED, &ev, id).await.context("publish study completed")?;
        }
        Ok(pb::OutboxKind::StudyDiscarded) => {
            let ev = pb::StudyDiscarded::decode(payload).context("decode outbox entry")?;
            bus.publish(subjects::STUDY_DISCARDED, &ev, id).await.context("publish study discarded")?;
        }
        Ok(pb::OutboxKind::StudyHeld) => {
            let ev = pb::StudyHeld::decode(payload).context("decode outbox entry")?;
            bus.publish(subjects::STUDY_HELD, &ev, id).await.context("publish study held")?;
        }
        _ => {
            // Written by a newer version of this service: leave it for that version.
            anyhow::bail!("outbox entry {} has an unknown kind {}", entry.msg_id, entry.kind);
        }
    }
    tracing::debug!(msg_id = %entry.msg_id, "study event published");
    Ok(())
}
