//! Metrics in the Prometheus text format (0.0.4), without a metrics library: counters and
//! gauges are atomics in each service's `metrics.rs`, histograms are [`Histogram`], and
//! [`Exposition`] writes them.
//!
//! Labels are small fixed sets chosen by the service (a result, a reason, a step): never UIDs,
//! AE titles or anything from a data set.

use std::fmt::{Display, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A service's metrics, rendered in the Prometheus text format.
pub trait MetricsText: std::fmt::Debug + Send + Sync {
    /// The current values.
    fn render(&self) -> String;
}

/// A histogram of durations in seconds, in atomics.
#[derive(Debug)]
pub struct Histogram {
    /// Upper bounds in seconds, ascending (`+Inf` implied).
    bounds: &'static [f64],
    /// Per-bucket counts (the last one: `+Inf`); cumulated when rendered.
    buckets: Vec<AtomicU64>,
    /// Sum of the observations, in nanoseconds.
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// A histogram with these bucket upper bounds (seconds, ascending).
    pub fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(), sum_nanos: AtomicU64::new(0) }
    }

    /// Counts one observation.
    pub fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let bucket = self.bounds.iter().position(|b| secs <= *b).unwrap_or(self.bounds.len());
        if let Some(b) = self.buckets.get(bucket) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_nanos.fetch_add(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Counts one observation given in milliseconds (negative: zero).
    pub fn observe_ms(&self, ms: i64) {
        self.observe(Duration::from_millis(u64::try_from(ms).unwrap_or(0)));
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }
}

/// The kind of a metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Buckets, sum and count.
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
        }
    }
}

/// Writes the text exposition.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    /// An empty exposition.
    pub fn new() -> Self {
        Self { out: String::with_capacity(4096) }
    }

    /// Starts a family: its `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &str, help: &str, kind: Kind) -> &mut Self {
        // Writing to a String cannot fail.
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {}", kind.as_str());
        self
    }

    /// One sample of the current family: `name{labels} value`.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) -> &mut Self {
        self.out.push_str(name);
        self.labels(labels, None);
        let _ = writeln!(self.out, " {value}");
        self
    }

    /// A family of one unlabelled counter.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) -> &mut Self {
        self.family(name, help, Kind::Counter).sample(name, &[], value)
    }

    /// A family of one unlabelled gauge.
    pub fn gauge(&mut self, name: &str, help: &str, value: impl Display) -> &mut Self {
        self.family(name, help, Kind::Gauge).sample(name, &[], value)
    }

    /// A family of one unlabelled histogram.
    pub fn histogram(&mut self, name: &str, help: &str, h: &Histogram) -> &mut Self {
        self.family(name, help, Kind::Histogram).histogram_samples(name, &[], h)
    }

    /// The samples of one histogram of the current family (buckets, sum and count).
    pub fn histogram_samples(&mut self, name: &str, labels: &[(&str, &str)], h: &Histogram) -> &mut Self {
        let mut cumulative = 0_u64;
        for (i, bucket) in h.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            let le = match h.bounds.get(i) {
                Some(b) => b.to_string(),
                None => "+Inf".to_owned(),
            };
            let _ = write!(self.out, "{name}_bucket");
            self.labels(labels, Some(&le));
            let _ = writeln!(self.out, " {cumulative}");
        }
        let sum = h.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = write!(self.out, "{name}_sum");
        self.labels(labels, None);
        let _ = writeln!(self.out, " {sum}");
        let _ = write!(self.out, "{name}_count");
        self.labels(labels, None);
        let _ = writeln!(self.out, " {cumulative}");
        self
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }

    fn labels(&mut self, labels: &[(&str, &str)], le: Option<&str>) {
        if labels.is_empty() && le.is_none() {
            return;
        }
        self.out.push('{');
        let all = labels.iter().copied().chain(le.map(|le| ("le", le)));
        for (i, (k, v)) in all.enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            let _ = write!(self.out, "{k}=\"");
            for c in v.chars() {
                match c {
                    '\\' => self.out.push_str("\\\\"),
                    '"' => self.out.push_str("\\\""),
                    '\n' => self.out.push_str("\\n"),
                    c => self.out.push(c),
                }
            }
            self.out.push('"');
        }
        self.out.push('}');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_families_labels_and_cumulative_histograms() {
        static BOUNDS: [f64; 3] = [0.001, 0.5, 1.0];
        let h = Histogram::new(&BOUNDS);
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(700));
        h.observe(Duration::from_secs(3));
        h.observe_ms(-5);
        assert_eq!(h.count(), 4);
        let mut e = Exposition::new();
        e.counter("x_total", "Things.", 3).family("y_total", "By result.", Kind::Counter);
        e.sample("y_total", &[("result", "a\"b")], 1).histogram("t_seconds", "Time.", &h);
        e.family("s_seconds", "By step.", Kind::Histogram).histogram_samples("s_seconds", &[("step", "push")], &h);
        let text = e.finish();
        let expected = "# HELP x_total Things.\n# TYPE x_total counter\nx_total 3\n\
             # HELP y_total By result.\n# TYPE y_total counter\ny_total{result=\"a\\\"b\"} 1\n\
             # HELP t_seconds Time.\n# TYPE t_seconds histogram\n\
             t_seconds_bucket{le=\"0.001\"} 2\nt_seconds_bucket{le=\"0.5\"} 2\nt_seconds_bucket{le=\"1\"} 3\n\
             t_seconds_bucket{le=\"+Inf\"} 4\nt_seconds_sum 3.7005\nt_seconds_count 4\n";
        assert!(text.starts_with(expected), "{text}");
        assert!(
            text.contains(
                "s_seconds_bucket{step=\"push\",le=\"1\"} 3\ns_seconds_bucket{step=\"push\",le=\"+Inf\"} 4\n"
            )
        );
        assert!(text.ends_with("s_seconds_sum{step=\"push\"} 3.7005\ns_seconds_count{step=\"push\"} 4\n"), "{text}");
    }
}
