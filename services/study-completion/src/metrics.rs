//! The service's metrics in atomics, rendered by hand in the Prometheus text format (served by
//! [`crate::http`]), like the receiver's.
//!
//! Labels are small fixed sets (criterion, outcome, result): never UIDs, rule names from a
//! file, or anything from a data set.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use bidsflux_proto::v1 as pb;

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

#[derive(Debug, Default)]
struct Histogram {
    /// Per-bucket counts (last: `+Inf`); cumulated when rendered.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_ms: AtomicU64,
}

impl Histogram {
    fn observe_ms(&self, ms: i64) {
        let ms = u64::try_from(ms).unwrap_or(0);
        let secs = ms as f64 / 1000.0;
        let bucket = BUCKETS.iter().position(|b| secs <= *b).unwrap_or(BUCKETS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_ms.fetch_add(ms, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) -> std::fmt::Result {
        writeln!(out, "# HELP {name} {help}")?;
        writeln!(out, "# TYPE {name} histogram")?;
        let mut cumulative = 0_u64;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}")?;
        }
        cumulative += self.buckets[BUCKETS.len()].load(Ordering::Relaxed);
        writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}")?;
        writeln!(out, "{name}_sum {}", self.sum_ms.load(Ordering::Relaxed) as f64 / 1000.0)?;
        writeln!(out, "{name}_count {cumulative}")
    }
}

/// Every metric of the service.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Decisions by criterion (row) and outcome (column).
    decisions: [[AtomicU64; OUTCOMES.len()]; CRITERIA.len()],
    instances: [AtomicU64; APPLIED.len()],
    /// Studies in HELD, as this process knows them (counted at start, then kept up to date).
    held: AtomicI64,
    first_to_completion: Histogram,
    last_to_completion: Histogram,
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

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing to a String cannot fail.
        let _ = (|| -> std::fmt::Result {
            writeln!(
                out,
                "# HELP bidsflux_completion_decisions_total Studies completed, discarded or held, by criterion and outcome."
            )?;
            writeln!(out, "# TYPE bidsflux_completion_decisions_total counter")?;
            for (ci, c) in CRITERIA.iter().enumerate() {
                for (oi, o) in OUTCOMES.iter().enumerate() {
                    let n = self.decisions[ci][oi].load(Ordering::Relaxed);
                    writeln!(
                        out,
                        "bidsflux_completion_decisions_total{{criterion=\"{}\",outcome=\"{}\"}} {n}",
                        criterion_label(*c),
                        o.label()
                    )?;
                }
            }
            writeln!(
                out,
                "# HELP bidsflux_completion_instances_total Instance events, by what they did to their study."
            )?;
            writeln!(out, "# TYPE bidsflux_completion_instances_total counter")?;
            for (i, (_, label)) in APPLIED.iter().enumerate() {
                let n = self.instances[i].load(Ordering::Relaxed);
                writeln!(out, "bidsflux_completion_instances_total{{result=\"{label}\"}} {n}")?;
            }
            writeln!(out, "# HELP bidsflux_completion_studies_held Studies waiting for an operator.")?;
            writeln!(out, "# TYPE bidsflux_completion_studies_held gauge")?;
            writeln!(out, "bidsflux_completion_studies_held {}", self.held.load(Ordering::Relaxed))?;
            self.first_to_completion.render(
                &mut out,
                "bidsflux_completion_first_instance_to_completion_seconds",
                "Time from a generation's first instance to its completion or discard.",
            )?;
            self.last_to_completion.render(
                &mut out,
                "bidsflux_completion_last_instance_to_completion_seconds",
                "Time from a generation's last instance to its completion or discard.",
            )
        })();
        out
    }
}

impl bidsflux_messaging::http::MetricsText for Metrics {
    fn render(&self) -> String {
        Metrics::render(self)
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
