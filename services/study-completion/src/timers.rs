//! Re-check times.
//!
//! Deadlines are wall-clock Unix ms stored in the KV state (the verdict's re-check time); this
//! task keeps the soonest per study in memory and, when one passes, re-reads the state (the KV
//! is the truth), publishes what is left in its outbox, and evaluates the rule if the study is
//! open and due. After a restart every deadline and outbox is found again by a scan.
//!
//! A failed check is retried with a growing delay (never a busy loop) and logged on its first
//! failure and every tenth after.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use bidsflux_messaging::now_unix_ms;
use bidsflux_service::{Backoff, Tasks};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::core::{Core, next_check};
use crate::study_kv::{self, StoreError};

/// Handle to schedule checks.
#[derive(Debug, Clone)]
pub struct Timers {
    tx: mpsc::UnboundedSender<(String, i64)>,
}

impl Timers {
    /// Starts the timer task, one of `tasks`.
    pub fn start(core: Core, tasks: &Tasks) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let checker = Checker { core, failures: HashMap::new() };
        let looping = timer_loop(checker, rx, tasks.shutdown().clone());
        tasks.spawn("timers", async move {
            looping.await;
            Ok(())
        });
        Self { tx }
    }

    /// Checks `study` at `at_ms` (Unix ms) or earlier: of several pending times the soonest is
    /// kept, since a check re-reads the state and schedules the next one itself.
    pub fn schedule(&self, study: String, at_ms: i64) {
        let _ = self.tx.send((study, at_ms));
    }
}

async fn timer_loop(mut checker: Checker, mut rx: mpsc::UnboundedReceiver<(String, i64)>, shutdown: CancellationToken) {
    let mut by_study: HashMap<String, i64> = HashMap::new();
    let mut queue: BTreeSet<(i64, String)> = BTreeSet::new();
    fn schedule(by_study: &mut HashMap<String, i64>, queue: &mut BTreeSet<(i64, String)>, study: String, at: i64) {
        if let Some(old) = by_study.get(&study).copied() {
            if old <= at {
                return;
            }
            queue.remove(&(old, study.clone()));
        }
        by_study.insert(study.clone(), at);
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
                let Some((study, at)) = msg else { return };
                schedule(&mut by_study, &mut queue, study, at);
            }
            _ = tokio::time::sleep(wait) => {
                let now = now_unix_ms();
                while let Some((d, study)) = queue.first().cloned() {
                    if d > now {
                        break;
                    }
                    queue.remove(&(d, study.clone()));
                    by_study.remove(&study);
                    // Stopping: a check cut short is redone after the restart, which scans the
                    // KV bucket (the truth) again.
                    let next = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        next = checker.check(&study) => next,
                    };
                    // Clamped past `now`, so this loop ends (no busy retry).
                    if let Some(next) = next {
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
    core: Core,
    /// Consecutive failures per study, for the retry delay and to keep logs short.
    failures: HashMap<String, u32>,
}

impl Checker {
    /// Checks `study`; returns when to look at it again, if ever.
    async fn check(&mut self, study: &str) -> Option<i64> {
        match self.try_check(study).await {
            Ok(next) => {
                self.failures.remove(study);
                next
            }
            Err(error) => {
                let failures = self.failures.entry(study.to_owned()).or_insert(0);
                *failures = failures.saturating_add(1);
                let failures = *failures;
                let retry_in_ms = retry_delay(failures).as_millis() as u64;
                if failures == 1 || failures.is_multiple_of(10) {
                    tracing::warn!(study_uid = %study, failures, retry_in_ms, error = %format!("{error:#}"), "completion check failed, will retry");
                } else {
                    tracing::debug!(study_uid = %study, failures, retry_in_ms, error = %format!("{error:#}"), "completion check failed, will retry");
                }
                Some(now_unix_ms() + retry_in_ms as i64)
            }
        }
    }

    /// Publishes what is left in the outbox, then evaluates the study if it is open and due.
    async fn try_check(&self, study: &str) -> anyhow::Result<Option<i64>> {
        let core = &self.core;
        crate::outbox::flush(&core.bus, &core.kv, study).await?;
        let now = now_unix_ms();
        let updated = study_kv::update(&core.kv, study, |s| -> Result<_, StoreError> {
            let Some(s) = s else { return Ok((None, (None, None))) };
            let next = next_check(&s);
            match core.engine.on_due(s, now) {
                Some((s, decision)) => Ok((Some(s), (None, decision))),
                None => Ok((None, (next, None))),
            }
        })
        .await?;
        let (not_due, decision) = updated.value;
        let Some(written) = updated.written else { return Ok(not_due) };
        core.record(updated.before.as_ref(), &written, decision.as_ref());
        core.settle(&written).await
    }
}

/// 1 s doubling to 60 s.
const RETRY: Backoff = Backoff::doubling(Duration::from_secs(1), Duration::from_secs(60));

fn retry_delay(failures: u32) -> Duration {
    RETRY.delay(failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_to_a_minute() {
        let delays: Vec<u64> = (1..=9).map(|n| retry_delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }
}
