//! Completion deadlines.
//!
//! Deadlines are wall-clock Unix ms stored in the KV state; this task keeps
//! the soonest in memory and, when one passes, re-reads the state (the KV is
//! the truth) and completes the study if it is still open and due.
//!
//! A failed check is retried with a growing delay (never a busy loop) and
//! logged on its first failure and every tenth after. A completion that was
//! published but not yet recorded is remembered, so its retry records exactly
//! what was published instead of publishing again.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use async_nats::jetstream::kv;
use bidsflux_messaging::{Bus, now_unix_ms, subjects, trace};
use bidsflux_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::config::Config;
use crate::state::Reconciled;
use crate::store::{self, WriteError};

/// Handle to schedule deadlines.
#[derive(Debug, Clone)]
pub struct Timers {
    tx: mpsc::UnboundedSender<(String, i64)>,
}

impl Timers {
    /// Starts the timer task.
    pub fn start(bus: Bus, kv: kv::Store, config: Config, shutdown: CancellationToken) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let checker = Checker { bus, kv, config, unrecorded: HashMap::new(), failures: HashMap::new() };
        tokio::spawn(timer_loop(checker, rx, shutdown));
        Self { tx }
    }

    /// Checks `study` at `deadline_ms` (a later call for the same study replaces it).
    pub fn schedule(&self, study: String, deadline_ms: i64) {
        let _ = self.tx.send((study, deadline_ms));
    }
}

async fn timer_loop(mut checker: Checker, mut rx: mpsc::UnboundedReceiver<(String, i64)>, shutdown: CancellationToken) {
    let mut by_study: HashMap<String, i64> = HashMap::new();
    let mut queue: BTreeSet<(i64, String)> = BTreeSet::new();
    fn schedule(by_study: &mut HashMap<String, i64>, queue: &mut BTreeSet<(i64, String)>, study: String, at: i64) {
        if let Some(old) = by_study.insert(study.clone(), at) {
            queue.remove(&(old, study.clone()));
        }
        queue.insert((at, study));
    }
    loop {
        let wait = queue
            .first()
            .map(|(d, _)| Duration::from_millis((*d - now_unix_ms()).max(0) as u64))
            .unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            msg = rx.recv() => {
                let Some((study, deadline)) = msg else { return };
                schedule(&mut by_study, &mut queue, study, deadline);
            }
            _ = tokio::time::sleep(wait) => {
                let now = now_unix_ms();
                while let Some((d, study)) = queue.first().cloned() {
                    if d > now {
                        break;
                    }
                    queue.remove(&(d, study.clone()));
                    by_study.remove(&study);
                    // Clamped past `now`, so this loop ends (no busy retry).
                    if let Some(next) = checker.check(&study).await {
                        schedule(&mut by_study, &mut queue, study, next.max(now + 1));
                    }
                }
            }
        }
    }
}

/// Checks due studies; owned by the timer task.
#[derive(Debug)]
struct Checker {
    bus: Bus,
    kv: kv::Store,
    config: Config,
    /// Completions published but not recorded yet (the record failed): the
    /// retry records these instead of publishing again, so instances that
    /// arrive meanwhile go to the next generation, never silently into this one.
    unrecorded: HashMap<String, pb::StudyState>,
    /// Consecutive failures per study, for the retry delay and to keep logs short.
    failures: HashMap<String, u32>,
}

/// A check that failed; `published` is set if *study completed* went out.
#[derive(Debug)]
struct Failed {
    error: anyhow::Error,
    published: Option<pb::StudyState>,
}

impl Failed {
    fn before_publishing(error: anyhow::Error) -> Self {
        Self { error, published: None }
    }
}

/// What the first half of a check found.
#[derive(Debug)]
enum Due {
    /// Not open (completed, deleted or never seen): nothing to do.
    Nothing,
    /// Open, due at this time.
    Later(i64),
    /// *study completed* was published for this state (read at `revision`): record it.
    Published { done: pb::StudyState, revision: u64 },
}

impl Checker {
    fn quiet_ms(&self) -> i64 {
        self.config.quiet_period.as_millis() as i64
    }

    /// Checks `study`; returns when to look at it again, if ever.
    async fn check(&mut self, study: &str) -> Option<i64> {
        let outcome = match self.unrecorded.remove(study) {
            Some(published) => record_completed(&self.kv, study, &published, None, self.quiet_ms())
                .await
                .map_err(|error| Failed { error, published: Some(published) }),
            None => self.fire(study).await,
        };
        match outcome {
            Ok(next) => {
                self.failures.remove(study);
                next
            }
            Err(Failed { error, published }) => {
                let failures = self.failures.entry(study.to_owned()).or_insert(0);
                *failures = failures.saturating_add(1);
                let failures = *failures;
                let delay = retry_delay(failures);
                let retry_in_ms = delay.as_millis() as u64;
                let unrecorded = published.is_some();
                if failures == 1 || failures.is_multiple_of(10) {
                    tracing::warn!(study_uid = %study, failures, retry_in_ms, unrecorded, error = %format!("{error:#}"), "completion check failed, will retry");
                } else {
                    tracing::debug!(study_uid = %study, failures, retry_in_ms, unrecorded, error = %format!("{error:#}"), "completion check failed, will retry");
                }
                if let Some(p) = published {
                    self.unrecorded.insert(study.to_owned(), p);
                }
                Some(now_unix_ms() + retry_in_ms as i64)
            }
        }
    }

    /// Completes `study` if it is open and due.
    async fn fire(&self, study: &str) -> Result<Option<i64>, Failed> {
        match publish_if_due(&self.bus, &self.kv, &self.config, study).await.map_err(Failed::before_publishing)? {
            Due::Nothing => Ok(None),
            Due::Later(at) => Ok(Some(at)),
            Due::Published { done, revision } => {
                record_completed(&self.kv, study, &done, Some(revision), self.quiet_ms())
                    .await
                    .map_err(|error| Failed { error, published: Some(done) })
            }
        }
    }
}

/// 1 s doubling to 60 s.
fn retry_delay(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(6)).min(Duration::from_secs(60))
}

/// Publishes *study completed* if `study` is open and due.
async fn publish_if_due(bus: &Bus, kv: &kv::Store, config: &Config, study: &str) -> anyhow::Result<Due> {
    let current = store::read(kv, study).await?;
    let (Some(s), Some(revision)) = (current.state, current.revision) else { return Ok(Due::Nothing) };
    if s.status != pb::StudyStatus::Open as i32 {
        return Ok(Due::Nothing);
    }
    let now = now_unix_ms();
    if s.deadline_unix_ms > now {
        return Ok(Due::Later(s.deadline_unix_ms));
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
    Ok(Due::Published { done, revision })
}

/// Records the published completion `published` (`revision`: the one it was
/// read at, `None` to read first). If instances arrived since, they open the
/// next generation ([`crate::state::reconcile_completion`]) and its deadline
/// is returned.
async fn record_completed(
    kv: &kv::Store,
    study: &str,
    published: &pb::StudyState,
    revision: Option<u64>,
    quiet_ms: i64,
) -> anyhow::Result<Option<i64>> {
    let mut known = revision;
    let mut next = Reconciled::Complete(published.clone());
    for _ in 0..store::MAX_CAS_ATTEMPTS {
        let revision = match known.take() {
            Some(r) => r,
            None => {
                let current = store::read(kv, study).await?;
                let Some(r) = current.revision else { return Ok(None) };
                next = crate::state::reconcile_completion(current.state, published, now_unix_ms(), quiet_ms);
                r
            }
        };
        let (state, reopened) = match &next {
            Reconciled::Settled => return Ok(None),
            Reconciled::Complete(s) => (s, None),
            Reconciled::Reopen(s) => (s, Some(s.deadline_unix_ms)),
        };
        match store::write(kv, study, state, Some(revision)).await {
            Ok(_) => {
                if reopened.is_some() {
                    tracing::info!(study_uid = %study, generation = state.generation, "instances arrived while completing: next generation opened");
                }
                return Ok(reopened);
            }
            Err(WriteError::Conflict) => {
                tracing::debug!(study_uid = %study, "state changed while recording the completion, re-reading");
            }
            Err(e) => return Err(anyhow::Error::new(e).context("record study completed")),
        }
    }
    anyhow::bail!(
        "record study completed: the state kept changing ({} compare-and-set conflicts in a row)",
        store::MAX_CAS_ATTEMPTS
    )
}

#[cfg(test)]
mod tests {
    use async_nats::jetstream::consumer::{self, pull};
    use bidsflux_config::Env;
    use bidsflux_messaging::topology;
    use bidsflux_testsupport::NatsServer;
    use futures::StreamExt as _;
    use prost::Message as _;

    use super::*;
    use crate::state::{Applied, apply_instance};

    fn instance(sop: &str) -> pb::InstanceStored {
        pb::InstanceStored {
            study_instance_uid: "1.2.3".into(),
            series_instance_uid: "1.2.3.1".into(),
            sop_instance_uid: sop.into(),
            ..Default::default()
        }
    }

    async fn completions(bus: &Bus) -> Vec<pb::StudyCompleted> {
        let st = bus.js.get_stream(subjects::STREAM_STUDIES).await.unwrap();
        let c = st.create_consumer(pull::Config { deliver_policy: consumer::DeliverPolicy::All, ..Default::default() });
        let mut batch =
            c.await.unwrap().fetch().max_messages(100).expires(Duration::from_millis(300)).messages().await.unwrap();
        let mut out = Vec::new();
        while let Some(Ok(m)) = batch.next().await {
            out.push(pb::StudyCompleted::decode(m.payload.as_ref()).unwrap());
        }
        out
    }

    /// Stores `sop` as `on_instance` does, at `now_ms`.
    async fn store_instance(kv: &kv::Store, sop: &str, now_ms: i64, quiet_ms: i64) -> Applied {
        let current = store::read(kv, "1.2.3").await.unwrap();
        let (next, applied) = apply_instance(current.state, &instance(sop), now_ms, quiet_ms, None);
        if applied != Applied::Duplicate {
            store::write(kv, "1.2.3", &next, current.revision).await.unwrap();
        }
        applied
    }

    /// The race at completion, made deterministic: an instance lands after the
    /// state was read and *study completed* published, before it is recorded.
    #[tokio::test]
    async fn instance_landing_between_publish_and_record_opens_the_next_generation() {
        let nats = NatsServer::start().await.unwrap();
        let bus = Bus::connect(&nats.url, "study-completion", Duration::from_secs(5)).await.unwrap();
        topology::declare(&bus.js).await.unwrap();
        let kv = bus.js.get_key_value(subjects::KV_STUDIES).await.unwrap();
        let config = Config::from_env(&Env::from_pairs([("BIDSFLUX_QUIET_PERIOD", "60s")])).unwrap();
        let quiet_ms = config.quiet_period.as_millis() as i64;
        let past = now_unix_ms() - 10 * quiet_ms;
        store_instance(&kv, "1.2.3.1.1", past, quiet_ms).await;
        store_instance(&kv, "1.2.3.1.2", past, quiet_ms).await;

        let Due::Published { done, revision } = publish_if_due(&bus, &kv, &config, "1.2.3").await.unwrap() else {
            panic!("the study is overdue");
        };
        let arrived = now_unix_ms();
        assert_eq!(store_instance(&kv, "1.2.3.1.3", arrived, quiet_ms).await, Applied::Added);
        let next = record_completed(&kv, "1.2.3", &done, Some(revision), quiet_ms).await.unwrap();

        let state = store::read(&kv, "1.2.3").await.unwrap().state.unwrap();
        assert_eq!((state.status, state.generation), (pb::StudyStatus::Open as i32, 1));
        assert_eq!(next, Some(state.deadline_unix_ms));
        assert_eq!(state.deadline_unix_ms, arrived + quiet_ms);
        assert_eq!((state.first_instance_unix_ms, state.instance_hashes.len()), (arrived, 3));
        let published = completions(&bus).await;
        assert_eq!(published.len(), 1);
        assert_eq!((published[0].generation, published[0].instance_count), (0, 2));
        // Resends of both generations stay duplicates.
        assert_eq!(store_instance(&kv, "1.2.3.1.1", arrived, quiet_ms).await, Applied::Duplicate);
        assert_eq!(store_instance(&kv, "1.2.3.1.3", arrived, quiet_ms).await, Applied::Duplicate);
    }

    /// A completion whose record failed is recorded by the retry, not published again.
    #[tokio::test]
    async fn a_retried_record_keeps_what_was_published() {
        let nats = NatsServer::start().await.unwrap();
        let bus = Bus::connect(&nats.url, "study-completion", Duration::from_secs(5)).await.unwrap();
        topology::declare(&bus.js).await.unwrap();
        let kv = bus.js.get_key_value(subjects::KV_STUDIES).await.unwrap();
        let config = Config::from_env(&Env::from_pairs([("BIDSFLUX_QUIET_PERIOD", "60s")])).unwrap();
        let quiet_ms = config.quiet_period.as_millis() as i64;
        store_instance(&kv, "1.2.3.1.1", now_unix_ms() - 10 * quiet_ms, quiet_ms).await;
        let Due::Published { done, .. } = publish_if_due(&bus, &kv, &config, "1.2.3").await.unwrap() else {
            panic!("the study is overdue");
        };
        let mut checker =
            Checker { bus: bus.clone(), kv: kv.clone(), config, unrecorded: HashMap::new(), failures: HashMap::new() };
        checker.unrecorded.insert("1.2.3".into(), done);
        store_instance(&kv, "1.2.3.1.2", now_unix_ms(), quiet_ms).await;

        let next = checker.check("1.2.3").await;
        let state = store::read(&kv, "1.2.3").await.unwrap().state.unwrap();
        assert_eq!(
            (state.status, state.generation, next),
            (pb::StudyStatus::Open as i32, 1, Some(state.deadline_unix_ms))
        );
        assert!(checker.unrecorded.is_empty());
        assert_eq!(completions(&bus).await.len(), 1);
    }

    #[test]
    fn retries_back_off_to_a_minute() {
        let delays: Vec<u64> = (1..=9).map(|n| retry_delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }
}
