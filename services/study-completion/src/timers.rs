//! Completion deadlines.
//!
//! Deadlines are wall-clock Unix ms stored in the KV state; this task keeps
//! the soonest in memory and, when one passes, re-reads the state (the KV is
//! the truth) and completes the study if it is still open and due.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use async_nats::jetstream::kv;
use bidsflux_messaging::{Bus, now_unix_ms, subjects, trace};
use bidsflux_proto::v1 as pb;
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::config::Config;

/// Handle to schedule deadlines.
#[derive(Debug, Clone)]
pub struct Timers {
    tx: mpsc::UnboundedSender<(String, i64)>,
}

impl Timers {
    /// Starts the timer task.
    pub fn start(bus: Bus, kv: kv::Store, config: Config, shutdown: CancellationToken) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let retry = tx.clone();
        tokio::spawn(timer_loop(bus, kv, config, rx, retry, shutdown));
        Self { tx }
    }

    /// Checks `study` at `deadline_ms` (a later call for the same study replaces it).
    pub fn schedule(&self, study: String, deadline_ms: i64) {
        let _ = self.tx.send((study, deadline_ms));
    }
}

async fn timer_loop(
    bus: Bus,
    kv: kv::Store,
    config: Config,
    mut rx: mpsc::UnboundedReceiver<(String, i64)>,
    retry: mpsc::UnboundedSender<(String, i64)>,
    shutdown: CancellationToken,
) {
    let mut by_study: HashMap<String, i64> = HashMap::new();
    let mut queue: BTreeSet<(i64, String)> = BTreeSet::new();
    loop {
        let wait = queue
            .first()
            .map(|(d, _)| Duration::from_millis((*d - now_unix_ms()).max(0) as u64))
            .unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            msg = rx.recv() => {
                let Some((study, deadline)) = msg else { return };
                if let Some(old) = by_study.insert(study.clone(), deadline) {
                    queue.remove(&(old, study.clone()));
                }
                queue.insert((deadline, study));
            }
            _ = tokio::time::sleep(wait) => {
                let now = now_unix_ms();
                while let Some((d, study)) = queue.first().cloned() {
                    if d > now {
                        break;
                    }
                    queue.remove(&(d, study.clone()));
                    by_study.remove(&study);
                    match fire(&bus, &kv, &config, &study).await {
                        Ok(Some(next)) => { let _ = retry.send((study, next)); }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(study_uid = %study, error = %format!("{e:#}"), "completion check failed, retrying");
                            let _ = retry.send((study, now_unix_ms() + 1000));
                        }
                    }
                }
            }
        }
    }
}

/// Completes `study` if it is open and due. Returns a new deadline to check when not due yet.
async fn fire(bus: &Bus, kv: &kv::Store, config: &Config, study: &str) -> anyhow::Result<Option<i64>> {
    let Some(entry) = kv.entry(study).await? else { return Ok(None) };
    if entry.operation != kv::Operation::Put {
        return Ok(None);
    }
    let s = pb::StudyState::decode(entry.value.as_ref())?;
    if s.status != pb::StudyStatus::Open as i32 {
        return Ok(None);
    }
    let now = now_unix_ms();
    if s.deadline_unix_ms > now {
        return Ok(Some(s.deadline_unix_ms));
    }
    let secs = config.quiet_period.as_secs_f64();
    let reason = pb::CompletionReason {
        rule: config.rule_name.clone(),
        criterion: pb::CompletionCriterion::QuietPeriod as i32,
        detail: format!("quiet {secs}s"),
    };
    let generation = s.generation;
    let parent = if s.traceparent.is_empty() {
        opentelemetry::Context::new()
    } else {
        trace::context_from_traceparent(&s.traceparent)
    };
    let (done, event) = crate::state::complete(s, reason, now);
    let span = tracing::info_span!("complete_study", study_uid = %study, generation, instances = event.instance_count, series = event.series_count);
    let _ = span.set_parent(parent);
    // Publish first, with a de-duplication id, then record. A crash in
    // between leaves the study open and overdue: it is completed again at
    // start-up and JetStream drops the second event (same id within the
    // stream's duplicate window). Recording first would lose the
    // completion on such a crash.
    let id = subjects::completed_msg_id(study, generation);
    async {
        bus.publish(subjects::STUDY_COMPLETED, &event, Some(&id)).await?;
        tracing::info!(criterion = "quiet_period", "study completed");
        Ok::<(), anyhow::Error>(())
    }
    .instrument(span)
    .await
    .map_err(|e| e.context("publish study completed"))?;
    record_completed(kv, study, done, entry.revision).await?;
    Ok(None)
}

/// Stores the completed state; if an instance arrived meanwhile, it is part of
/// what the uploader archives (it reads the spool when it runs), so the study
/// is marked complete with it.
async fn record_completed(kv: &kv::Store, study: &str, done: pb::StudyState, revision: u64) -> anyhow::Result<()> {
    let mut revision = revision;
    let mut done = done;
    loop {
        match kv.update(study, done.encode_to_vec().into(), revision).await {
            Ok(_) => return Ok(()),
            Err(e) => {
                tracing::debug!(error = %e, "state changed while completing, merging");
                let Some(cur) = kv.entry(study).await? else { return Ok(()) };
                let cur_state = pb::StudyState::decode(cur.value.as_ref())?;
                if cur_state.generation != done.generation || cur_state.status == pb::StudyStatus::Completed as i32 {
                    return Ok(());
                }
                let mut merged = cur_state;
                merged.status = pb::StudyStatus::Completed as i32;
                merged.completed_at_unix_ms = done.completed_at_unix_ms;
                merged.last_reason = done.last_reason.clone();
                done = merged;
                revision = cur.revision;
            }
        }
    }
}
