//! The indexer's metrics (`GET /metrics` on `BIDSFLUX_INDEXER_HTTP_BIND`): sessions indexed,
//! failures by kind, superdataset push retries and the time of each step, written by
//! [`bidsflux_service::metrics`]. Each replica serves its own; Prometheus adds them up.
//!
//! A leaf module: it knows its labels, not the handler. Labels are fixed sets, never UIDs,
//! project paths or anything from a data set.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bidsflux_proto::v1 as pb;
use bidsflux_service::metrics::{Exposition, Histogram, Kind, MetricsText};

/// How a delivery ended, for `bidsflux_indexer_sessions_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A new indexing commit was pushed.
    Indexed,
    /// The archive was already indexed (a redelivery): announced again.
    AlreadyIndexed,
}

impl Outcome {
    const ALL: [Self; 2] = [Self::Indexed, Self::AlreadyIndexed];

    fn label(self) -> &'static str {
        match self {
            Self::Indexed => "indexed",
            Self::AlreadyIndexed => "already_indexed",
        }
    }
}

/// A step of indexing one session, for `bidsflux_indexer_step_seconds{step}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Getting or creating the session's project in the forge.
    Project,
    /// Writing and pushing the session dataset.
    Session,
    /// Recording the session in the study superdataset (push races included).
    Superdataset,
    /// Checking or creating the group's BIDS dataset.
    Bids,
    /// Publishing `StudyIndexed`.
    Publish,
}

impl Step {
    const ALL: [Self; 5] = [Self::Project, Self::Session, Self::Superdataset, Self::Bids, Self::Publish];

    fn label(self) -> &'static str {
        match self {
            Self::Project => "project",
            Self::Session => "session",
            Self::Superdataset => "superdataset",
            Self::Bids => "bids",
            Self::Publish => "publish",
        }
    }
}

/// Failure kinds counted: transient (retried) first, then the dead-lettered kinds.
const FAILURES: [(Option<pb::FailureKind>, &str); 4] = [
    (None, "transient"),
    (Some(pb::FailureKind::Malformed), "malformed"),
    (Some(pb::FailureKind::InvalidInput), "invalid_input"),
    (Some(pb::FailureKind::Permanent), "permanent"),
];

/// Upper bounds (seconds) of the step and job histograms: a push takes tens of milliseconds
/// on a local forge, seconds to a GitLab across the network.
const BUCKETS: [f64; 12] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0];

/// Every metric of one indexer process.
#[derive(Debug)]
pub struct Metrics {
    sessions: [AtomicU64; Outcome::ALL.len()],
    failures: [AtomicU64; FAILURES.len()],
    push_retries: AtomicU64,
    steps: [Histogram; Step::ALL.len()],
    job: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            sessions: Default::default(),
            failures: Default::default(),
            push_retries: AtomicU64::new(0),
            steps: Step::ALL.map(|_| Histogram::new(&BUCKETS)),
            job: Histogram::new(&BUCKETS),
        }
    }
}

impl Metrics {
    /// Counts a session handled to the end, and its time.
    pub fn session(&self, outcome: Outcome, elapsed: Duration) {
        self.sessions[outcome as usize].fetch_add(1, Ordering::Relaxed);
        self.job.observe(elapsed);
    }

    /// Counts a failed delivery: `None` for a transient failure (retried), else the kind it is
    /// dead-lettered with.
    pub fn failure(&self, kind: Option<pb::FailureKind>) {
        let i = FAILURES.iter().position(|(k, _)| *k == kind).unwrap_or(FAILURES.len() - 1);
        self.failures[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts superdataset pushes refused by a race with another replica and redone.
    pub fn push_retries(&self, n: u32) {
        self.push_retries.fetch_add(u64::from(n), Ordering::Relaxed);
    }

    /// Times one step.
    pub fn step(&self, step: Step, elapsed: Duration) {
        self.steps[step as usize].observe(elapsed);
    }
}

impl MetricsText for Metrics {
    /// The Prometheus text exposition (format 0.0.4).
    fn render(&self) -> String {
        let mut e = Exposition::new();
        let name = "bidsflux_indexer_sessions_total";
        e.family(name, "Sessions handled to the end, by result.", Kind::Counter);
        for o in Outcome::ALL {
            e.sample(name, &[("result", o.label())], self.sessions[o as usize].load(Ordering::Relaxed));
        }
        let name = "bidsflux_indexer_failures_total";
        e.family(name, "Deliveries that failed: transient ones are retried, the others dead-lettered.", Kind::Counter);
        for (i, (_, label)) in FAILURES.iter().enumerate() {
            e.sample(name, &[("kind", label)], self.failures[i].load(Ordering::Relaxed));
        }
        e.counter(
            "bidsflux_indexer_push_retries_total",
            "Study superdataset pushes refused because another replica pushed first, then redone.",
            self.push_retries.load(Ordering::Relaxed),
        );
        let name = "bidsflux_indexer_step_seconds";
        e.family(name, "Time of each step of indexing a session.", Kind::Histogram);
        for s in Step::ALL {
            e.histogram_samples(name, &[("step", s.label())], &self.steps[s as usize]);
        }
        e.histogram(
            "bidsflux_indexer_session_seconds",
            "Time to index a session, from delivery to StudyIndexed.",
            &self.job,
        );
        e.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_sessions_failures_retries_and_steps() {
        let m = Metrics::default();
        m.session(Outcome::Indexed, Duration::from_millis(300));
        m.failure(None);
        m.failure(Some(pb::FailureKind::InvalidInput));
        m.push_retries(2);
        m.step(Step::Superdataset, Duration::from_millis(40));
        let text = m.render();
        for line in [
            "bidsflux_indexer_sessions_total{result=\"indexed\"} 1",
            "bidsflux_indexer_sessions_total{result=\"already_indexed\"} 0",
            "bidsflux_indexer_failures_total{kind=\"transient\"} 1",
            "bidsflux_indexer_failures_total{kind=\"invalid_input\"} 1",
            "bidsflux_indexer_push_retries_total 2",
            "bidsflux_indexer_step_seconds_bucket{step=\"superdataset\",le=\"0.05\"} 1",
            "bidsflux_indexer_step_seconds_count{step=\"bids\"} 0",
            "bidsflux_indexer_session_seconds_count 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
