//! The service's metrics: counters and a gauge in atomics and two histograms, written in the
//! Prometheus text format by [`bidsflux_service::metrics`] (served by [`bidsflux_service::http`]).
//!
//! Labels are small fixed sets (criterion, outcome, result): never UIDs, rule names from a
//! file, or anything from a data set.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use bidsflux_proto::v1 as pb;
use bidsflux_service::metrics::{Exposition, Histogram, Kind, MetricsText};

use crate::decide::{Decision, Outcome, criterion_label};
use crate::state::Applied;

const CRITERIA: [pb::CompletionCriterion; 6] = [
    pb::CompletionCriterion::QuietPeriod,
    pb::CompletionCriterion::SeriesReceived,
    pb::CompletionCriterion::ExpectedCounts,
    pb::CompletionCriterion::Forced,
    pb::CompletionCriterion::Operator,
    pb::CompletionCriterion::NoRule,
];
const OUTCOMES: [Outcome; 3] = [Outcome::Indexed, Outcome::Discarded, Outcome::Held];
const APPLIED: [(Applied, &str); 4] = [
    (Applied::NewStudy, "new_study"),
    (Applied::Added, "added"),
    (Applied::Duplicate, "duplicate"),
    (Applied::Amendment, "amendment"),
];

/// Upper bounds (seconds) of the time-to-completion histograms (`+Inf` implied): from the
/// listed-series rule's sub-second to forced completions after hours.
const BUCKETS: [f64; 14] = [0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0];

/// Every metric of the service.
#[derive(Debug)]
pub struct Metrics {
    /// Decisions by criterion (row) and outcome (column).
    decisions: [[AtomicU64; OUTCOMES.len()]; CRITERIA.len()],
    instances: [AtomicU64; APPLIED.len()],
    /// Studies in HELD, as this process knows them (counted at start, then kept up to date).
    held: AtomicI64,
    first_to_completion: Histogram,
    last_to_completion: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            decisions: Default::default(),
            instances: Default::default(),
            held: AtomicI64::new(0),
            first_to_completion: Histogram::new(&BUCKETS),
            last_to_completion: Histogram::new(&BUCKETS),
        }
    }
}

impl Metrics {
    /// Counts an instance event by what it did.
    pub fn instance(&self, applied: Applied) {
        if let Some(i) = APPLIED.iter().position(|(a, _)| *a == applied) {
            self.instances[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a decision; a generation that ended (indexed or discarded) is timed.
    pub fn decision(&self, d: &Decision) {
        if let (Some(c), Some(o)) =
            (CRITERIA.iter().position(|c| *c == d.criterion), OUTCOMES.iter().position(|o| *o == d.outcome))
        {
            self.decisions[c][o].fetch_add(1, Ordering::Relaxed);
        }
        if d.outcome != Outcome::Held {
            self.first_to_completion.observe_ms(d.since_first_ms);
            self.last_to_completion.observe_ms(d.since_last_ms);
        }
    }

    /// Follows a status change of one study (`before` → `after`, raw enum values) in the held gauge.
    pub fn status_changed(&self, before: Option<i32>, after: i32) {
        let held = pb::StudyStatus::Held as i32;
        let delta = i64::from(after == held) - i64::from(before == Some(held));
        self.held.fetch_add(delta, Ordering::Relaxed);
    }

    /// Sets the held gauge (at start, from a scan of the bucket).
    pub fn set_held(&self, n: i64) {
        self.held.store(n, Ordering::Relaxed);
    }
}

impl MetricsText for Metrics {
    /// The Prometheus text exposition (format 0.0.4).
    fn render(&self) -> String {
        let mut e = Exposition::new();
        let name = "bidsflux_completion_decisions_total";
        e.family(name, "Studies completed, discarded or held, by criterion and outcome.", Kind::Counter);
        for (ci, c) in CRITERIA.iter().enumerate() {
            for (oi, o) in OUTCOMES.iter().enumerate() {
                let n = self.decisions[ci][oi].load(Ordering::Relaxed);
                e.sample(name, &[("criterion", criterion_label(*c)), ("outcome", o.label())], n);
            }
        }
        let name = "bidsflux_completion_instances_total";
        e.family(name, "Instance events, by what they did to their study.", Kind::Counter);
        for (i, (_, label)) in APPLIED.iter().enumerate() {
            e.sample(name, &[("result", label)], self.instances[i].load(Ordering::Relaxed));
        }
        e.gauge(
            "bidsflux_completion_studies_held",
            "Studies waiting for an operator.",
            self.held.load(Ordering::Relaxed),
        );
        e.histogram(
            "bidsflux_completion_first_instance_to_completion_seconds",
            "Time from a generation's first instance to its completion or discard.",
            &self.first_to_completion,
        );
        e.histogram(
            "bidsflux_completion_last_instance_to_completion_seconds",
            "Time from a generation's last instance to its completion or discard.",
            &self.last_to_completion,
        );
        e.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_decisions_the_held_gauge_and_cumulative_histograms() {
        let m = Metrics::default();
        let d = |criterion, outcome, since_first_ms, since_last_ms| Decision {
            criterion,
            outcome,
            detail: String::new(),
            generation: 0,
            since_first_ms,
            since_last_ms,
        };
        m.decision(&d(pb::CompletionCriterion::SeriesReceived, Outcome::Indexed, 90_000, 50));
        m.decision(&d(pb::CompletionCriterion::Forced, Outcome::Held, 7_200_000, 10));
        m.instance(Applied::Duplicate);
        m.set_held(2);
        m.status_changed(Some(pb::StudyStatus::Open as i32), pb::StudyStatus::Held as i32);
        m.status_changed(Some(pb::StudyStatus::Held as i32), pb::StudyStatus::Completed as i32);
        m.status_changed(None, pb::StudyStatus::Held as i32);
        let text = m.render();
        for line in [
            "bidsflux_completion_decisions_total{criterion=\"series_received\",outcome=\"indexed\"} 1",
            "bidsflux_completion_decisions_total{criterion=\"forced\",outcome=\"held\"} 1",
            "bidsflux_completion_decisions_total{criterion=\"quiet_period\",outcome=\"indexed\"} 0",
            "bidsflux_completion_instances_total{result=\"duplicate\"} 1",
            "bidsflux_completion_studies_held 3",
            "bidsflux_completion_last_instance_to_completion_seconds_bucket{le=\"0.1\"} 1",
            "bidsflux_completion_first_instance_to_completion_seconds_bucket{le=\"60\"} 0",
            "bidsflux_completion_first_instance_to_completion_seconds_bucket{le=\"120\"} 1",
            "bidsflux_completion_first_instance_to_completion_seconds_count 1",
            "bidsflux_completion_first_instance_to_completion_seconds_sum 90",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
