//! Completion criteria as a pure function of what was received and the time.
//!
//! The caller (the service's state machine) keeps a [`StudyProgress`] per
//! study generation and asks [`Completion::evaluate`] after every instance
//! and when the returned re-check time comes; no timers or I/O here.
//!
//! # Semantics
//!
//! A **series is received** (for `series_received`) at the earliest of:
//! - `expected_counts` is on, the series announced its instance count and that
//!   many distinct instances arrived;
//! - `series_quiet_period` is set and no instance of the series arrived for that long;
//! - neither applies (no `series_quiet_period`, and no announced count to wait
//!   for): its first instance arrived. This is Mercure's "listed series
//!   received"; use `series_quiet_period` or counts when the listed series are
//!   large, or the rest of such a series arrives as an amendment.
//!
//! A **study is complete** when the first of these fires, checked in this order:
//! 1. `series_received`: the expression is true over the descriptions of the
//!    received series;
//! 2. `expected_counts`: the study announced its size and all of it arrived —
//!    either `NumberOfStudyRelatedInstances` distinct instances, or
//!    `NumberOfStudyRelatedSeries` series each complete by its own announced
//!    count. (Every series *seen so far* being complete is not enough: a sender
//!    that sends series one after another would complete the study between two
//!    series.)
//! 3. `quiet_period` since the last instance, or `force_after` since the first
//!    instance, whichever deadline came first (after a restart both may have passed).

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use super::file::{Completion, ForceAction, format_duration};

/// One series of a study generation, as the caller has recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesProgress {
    /// SeriesDescription, trimmed; empty when absent.
    pub description: String,
    /// Distinct instances received.
    pub instances: u32,
    /// Announced instance count (see [`merge_announced`](super::announced::merge_announced)).
    pub expected_instances: Option<u32>,
    /// When its last instance arrived (Unix ms).
    pub last_instance_ms: i64,
}

/// One study generation, as the caller has recorded it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StudyProgress {
    /// When its first instance arrived (Unix ms).
    pub first_instance_ms: i64,
    /// When its last instance arrived (Unix ms).
    pub last_instance_ms: i64,
    /// Distinct instances received.
    pub instances: u32,
    /// Its series.
    pub series: Vec<SeriesProgress>,
    /// Announced number of series in the study.
    pub expected_series: Option<u32>,
    /// Announced number of instances in the study.
    pub expected_instances: Option<u32>,
}

/// Why a study is complete; its `Display` is the reason recorded in *study completed*.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Criterion {
    /// `series_received` became true; the named descriptions that were received.
    SeriesReceived(Vec<String>),
    /// The announced study size arrived.
    ExpectedCounts {
        /// Series received.
        series: u32,
        /// Instances received.
        instances: u32,
    },
    /// No instance for this long.
    Quiet(Duration),
    /// The study reached its maximum age.
    Forced {
        /// The maximum age.
        after: Duration,
        /// What to do now.
        action: ForceAction,
    },
}

impl fmt::Display for Criterion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Criterion::SeriesReceived(names) => write!(f, "series_received: {}", names.join(", ")),
            Criterion::ExpectedCounts { series, instances } => {
                write!(f, "expected counts: {series} series, {instances} instances")
            }
            Criterion::Quiet(d) => write!(f, "quiet {}", format_duration(*d)),
            Criterion::Forced { after, action } => write!(f, "forced after {}: {action}", format_duration(*after)),
        }
    }
}

/// The outcome of [`Completion::evaluate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Complete now, for this reason.
    Complete(Criterion),
    /// Not yet. Evaluate again at `recheck_at_ms` (Unix ms) if no instance
    /// arrives before; `None`: only a new instance can change the verdict.
    Wait {
        /// The earliest time a criterion could fire without new instances.
        recheck_at_ms: Option<i64>,
    },
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Completion {
    /// When `s` counts as received (Unix ms; may be in the future), `None` if
    /// only more instances can make it so.
    fn series_received_at(&self, s: &SeriesProgress) -> Option<i64> {
        let counted = self.expected_counts.then_some(s.expected_instances).flatten();
        if counted.is_some_and(|n| s.instances >= n) {
            return Some(s.last_instance_ms);
        }
        match (self.series_quiet_period, counted) {
            (Some(q), _) => Some(s.last_instance_ms.saturating_add(ms(q))),
            (None, Some(_)) => None,
            (None, None) => Some(s.last_instance_ms),
        }
    }

    fn counts_complete(&self, study: &StudyProgress) -> bool {
        if !self.expected_counts {
            return false;
        }
        if study.expected_instances.is_some_and(|n| study.instances >= n) {
            return true;
        }
        study.expected_series.is_some_and(|n| {
            study.series.len() >= n as usize
                && study.series.iter().all(|s| s.expected_instances.is_some_and(|m| s.instances >= m))
        })
    }

    /// Decides whether `study` is complete at `now_ms` (Unix ms) under this rule.
    pub fn evaluate(&self, study: &StudyProgress, now_ms: i64) -> Verdict {
        let mut recheck: Option<i64> = None;
        let mut later = |t: i64| recheck = Some(recheck.map_or(t, |r| r.min(t)));

        if let Some(expr) = &self.series_received {
            let mut received = BTreeSet::new();
            for s in &study.series {
                match self.series_received_at(s) {
                    Some(t) if t <= now_ms => {
                        received.insert(s.description.as_str());
                    }
                    Some(t) => later(t),
                    None => {}
                }
            }
            if expr.eval(|d| received.contains(d)) {
                let names = expr.descriptions().into_iter().filter(|d| received.contains(d)).map(str::to_owned);
                return Verdict::Complete(Criterion::SeriesReceived(names.collect()));
            }
        }

        if self.counts_complete(study) {
            let series = u32::try_from(study.series.len()).unwrap_or(u32::MAX);
            return Verdict::Complete(Criterion::ExpectedCounts { series, instances: study.instances });
        }

        let quiet = self.quiet_period.map(|q| (study.last_instance_ms.saturating_add(ms(q)), Criterion::Quiet(q)));
        let forced = self.force.map(|f| {
            let at = study.first_instance_ms.saturating_add(ms(f.after));
            (at, Criterion::Forced { after: f.after, action: f.action })
        });
        let mut due: Option<(i64, Criterion)> = None;
        for (at, criterion) in quiet.into_iter().chain(forced) {
            if at > now_ms {
                later(at);
            } else if due.as_ref().is_none_or(|(first, _)| at < *first) {
                due = Some((at, criterion));
            }
        }
        match due {
            Some((_, criterion)) => Verdict::Complete(criterion),
            None => Verdict::Wait { recheck_at_ms: recheck },
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::rules::expr::SeriesExpr;
    use crate::rules::file::Force;

    const S: i64 = 1000;

    fn completion() -> Completion {
        Completion {
            quiet_period: Some(Duration::from_secs(60)),
            series_quiet_period: None,
            series_received: None,
            expected_counts: false,
            force: None,
        }
    }

    fn series(description: &str, instances: u32, expected: Option<u32>, last_s: i64) -> SeriesProgress {
        SeriesProgress {
            description: description.to_owned(),
            instances,
            expected_instances: expected,
            last_instance_ms: last_s * S,
        }
    }

    fn study(series: Vec<SeriesProgress>) -> StudyProgress {
        StudyProgress {
            first_instance_ms: 0,
            last_instance_ms: series.iter().map(|s| s.last_instance_ms).max().unwrap_or(0),
            instances: series.iter().map(|s| s.instances).sum(),
            series,
            expected_series: None,
            expected_instances: None,
        }
    }

    fn reason(v: Verdict) -> String {
        match v {
            Verdict::Complete(c) => c.to_string(),
            Verdict::Wait { recheck_at_ms } => format!("wait {recheck_at_ms:?}"),
        }
    }

    #[test]
    fn quiet_period_after_the_last_instance() {
        let c = completion();
        let st = study(vec![series("T1w", 10, None, 5)]);
        assert_eq!(c.evaluate(&st, 64 * S), Verdict::Wait { recheck_at_ms: Some(65 * S) });
        assert_eq!(reason(c.evaluate(&st, 65 * S)), "quiet 1m");
    }

    #[test]
    fn listed_series_fire_without_waiting_for_quiet() {
        let mut c = completion();
        c.series_received = Some(SeriesExpr::parse(r#""MRSI" and "STAGE_preproc""#).unwrap());
        let mut st = study(vec![series("T1w", 100, None, 1), series("MRSI", 1, None, 2)]);
        assert_eq!(c.evaluate(&st, 2 * S), Verdict::Wait { recheck_at_ms: Some(62 * S) });
        st.series.push(series("STAGE_preproc", 1, None, 3));
        assert_eq!(reason(c.evaluate(&st, 3 * S)), "series_received: MRSI, STAGE_preproc");
    }

    #[test]
    fn series_quiet_period_delays_a_listed_series() {
        let mut c = completion();
        c.series_received = Some(SeriesExpr::parse(r#""MRSI""#).unwrap());
        c.series_quiet_period = Some(Duration::from_secs(10));
        let st = study(vec![series("MRSI", 5, None, 20)]);
        assert_eq!(c.evaluate(&st, 25 * S), Verdict::Wait { recheck_at_ms: Some(30 * S) });
        assert_eq!(reason(c.evaluate(&st, 30 * S)), "series_received: MRSI");
    }

    #[test]
    fn an_announced_series_count_makes_a_listed_series_received_at_its_last_instance() {
        let mut c = completion();
        c.series_received = Some(SeriesExpr::parse(r#""MRSI""#).unwrap());
        c.series_quiet_period = Some(Duration::from_secs(10));
        c.expected_counts = true;
        let st = study(vec![series("MRSI", 4, Some(5), 20)]);
        assert_eq!(c.evaluate(&st, 20 * S), Verdict::Wait { recheck_at_ms: Some(30 * S) });
        let st = study(vec![series("MRSI", 5, Some(5), 20)]);
        assert_eq!(reason(c.evaluate(&st, 20 * S)), "series_received: MRSI");
        // Without series_quiet_period an announced but unreached count waits for the rest.
        c.series_quiet_period = None;
        let st = study(vec![series("MRSI", 4, Some(5), 20)]);
        assert_eq!(c.evaluate(&st, 21 * S), Verdict::Wait { recheck_at_ms: Some(80 * S) });
    }

    #[test]
    fn expected_counts_need_the_study_size() {
        let mut c = completion();
        c.expected_counts = true;
        // Every series seen is complete, but nothing says no more series follow.
        let mut st = study(vec![series("a", 3, Some(3), 1), series("b", 2, Some(2), 2)]);
        assert_eq!(c.evaluate(&st, 2 * S), Verdict::Wait { recheck_at_ms: Some(62 * S) });
        st.expected_series = Some(3);
        assert!(matches!(c.evaluate(&st, 2 * S), Verdict::Wait { .. }));
        st.expected_series = Some(2);
        assert_eq!(reason(c.evaluate(&st, 2 * S)), "expected counts: 2 series, 5 instances");
        // A series without an announced count blocks the series-count path.
        st.series.push(series("c", 1, None, 3));
        st.instances += 1;
        st.expected_series = Some(3);
        assert!(matches!(c.evaluate(&st, 3 * S), Verdict::Wait { .. }));
        // The study-instance count alone is enough.
        st.expected_instances = Some(6);
        assert_eq!(reason(c.evaluate(&st, 3 * S)), "expected counts: 3 series, 6 instances");
        // And nothing of this applies when the rule does not ask for counts.
        c.expected_counts = false;
        assert!(matches!(c.evaluate(&st, 3 * S), Verdict::Wait { .. }));
    }

    #[test]
    fn forced_completion_and_which_deadline_came_first() {
        let mut c = completion();
        c.force = Some(Force { after: Duration::from_secs(7200), action: ForceAction::Discard });
        // Instances keep arriving: quiet never fires, force does.
        let mut st = study(vec![series("a", 500, None, 7190)]);
        assert_eq!(c.evaluate(&st, 7100 * S), Verdict::Wait { recheck_at_ms: Some(7200 * S) });
        assert_eq!(reason(c.evaluate(&st, 7200 * S)), "forced after 2h: discard");
        // After a long outage both have passed: the earlier deadline is the reason.
        st = study(vec![series("a", 5, None, 10)]);
        assert_eq!(reason(c.evaluate(&st, 99_999 * S)), "quiet 1m");
        // Quiet off: only force (or a new instance) can end it.
        c.quiet_period = None;
        assert_eq!(c.evaluate(&st, 100 * S), Verdict::Wait { recheck_at_ms: Some(7200 * S) });
        c.force = None;
        assert_eq!(c.evaluate(&st, 100 * S), Verdict::Wait { recheck_at_ms: None });
    }
}
