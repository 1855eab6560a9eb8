//! The receiver's metrics: counters and gauges in atomics and one histogram, written in
//! the Prometheus text format by [`bidsflux_service::metrics`] (served by [`bidsflux_service::http`]).
//!
//! Labels are small fixed sets (a store's result, a rejection's reason): never UIDs, AE titles
//! or anything from a data set.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use bidsflux_service::metrics::{Exposition, Histogram, Kind, MetricsText};

/// How a C-STORE ended, for `bidsflux_receiver_instances_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreResult {
    /// A new spool file.
    Stored,
    /// The same data set was already spooled.
    Duplicate,
    /// A different data set with the same SOP Instance UID was spooled; kept both.
    Conflict,
    /// A failure status was answered.
    Failed,
}

impl StoreResult {
    const ALL: [Self; 4] = [Self::Stored, Self::Duplicate, Self::Conflict, Self::Failed];

    fn label(self) -> &'static str {
        match self {
            Self::Stored => "stored",
            Self::Duplicate => "duplicate",
            Self::Conflict => "conflict",
            Self::Failed => "failed",
        }
    }
}

/// Why an association was rejected, for `bidsflux_receiver_association_rejects_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// Calling AE title unknown, or not allowed from the peer's address.
    CallingAe,
    /// Called AE title not ours or not allowed for the caller.
    CalledAe,
    /// `BIDSFLUX_MAX_ASSOCIATIONS` reached.
    Limit,
    /// Anything else: no acceptable context, a failed TLS handshake, a malformed request, a timeout.
    Negotiation,
}

impl RejectReason {
    const ALL: [Self; 4] = [Self::CallingAe, Self::CalledAe, Self::Limit, Self::Negotiation];

    fn label(self) -> &'static str {
        match self {
            Self::CallingAe => "calling_ae",
            Self::CalledAe => "called_ae",
            Self::Limit => "limit",
            Self::Negotiation => "negotiation",
        }
    }
}

/// Upper bounds (seconds) of the store latency histogram buckets (`+Inf` implied).
const STORE_BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// Every metric of the receiver.
#[derive(Debug)]
pub struct Metrics {
    instances: [AtomicU64; 4],
    /// Data set bytes of instances answered Success.
    bytes: AtomicU64,
    rejects: [AtomicU64; 4],
    /// Time from C-STORE-RQ to the response.
    store_seconds: Histogram,
    /// Free bytes of the spool file system at the last check.
    spool_free_bytes: AtomicU64,
    associations_active: AtomicI64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            instances: Default::default(),
            bytes: AtomicU64::new(0),
            rejects: Default::default(),
            store_seconds: Histogram::new(&STORE_BUCKETS),
            spool_free_bytes: AtomicU64::new(0),
            associations_active: AtomicI64::new(0),
        }
    }
}

impl Metrics {
    /// Counts a finished C-STORE: its result, its data set size (on success) and its latency.
    pub fn store(&self, result: StoreResult, dataset_len: u64, elapsed: Duration) {
        self.instances[result as usize].fetch_add(1, Ordering::Relaxed);
        if result != StoreResult::Failed {
            self.bytes.fetch_add(dataset_len, Ordering::Relaxed);
        }
        self.store_seconds.observe(elapsed);
    }

    /// Counts a rejected association.
    pub fn reject(&self, reason: RejectReason) {
        self.rejects[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Records the spool's free space.
    pub fn set_spool_free(&self, bytes: u64) {
        self.spool_free_bytes.store(bytes, Ordering::Relaxed);
    }

    /// Counts an association as open until the returned guard is dropped.
    pub fn association_opened(&self) -> ActiveAssociation<'_> {
        self.associations_active.fetch_add(1, Ordering::Relaxed);
        ActiveAssociation { metrics: self }
    }
}

impl MetricsText for Metrics {
    /// The Prometheus text exposition (format 0.0.4).
    fn render(&self) -> String {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut e = Exposition::new();
        let name = "bidsflux_receiver_instances_total";
        e.family(name, "C-STORE requests answered, by result.", Kind::Counter);
        for r in StoreResult::ALL {
            e.sample(name, &[("result", r.label())], load(&self.instances[r as usize]));
        }
        e.counter("bidsflux_receiver_bytes_total", "Data set bytes of instances answered Success.", load(&self.bytes));
        let name = "bidsflux_receiver_association_rejects_total";
        e.family(name, "Associations rejected, by reason.", Kind::Counter);
        for r in RejectReason::ALL {
            e.sample(name, &[("reason", r.label())], load(&self.rejects[r as usize]));
        }
        e.histogram("bidsflux_receiver_store_seconds", "Time from C-STORE-RQ to the response.", &self.store_seconds);
        e.gauge(
            "bidsflux_receiver_spool_free_bytes",
            "Free bytes of the spool file system.",
            load(&self.spool_free_bytes),
        );
        e.gauge(
            "bidsflux_receiver_associations_active",
            "Associations being served.",
            self.associations_active.load(Ordering::Relaxed),
        );
        e.finish()
    }
}

/// An open association, counted in `bidsflux_receiver_associations_active` while it lives.
#[derive(Debug)]
pub struct ActiveAssociation<'a> {
    metrics: &'a Metrics,
}

impl Drop for ActiveAssociation<'_> {
    fn drop(&mut self) {
        self.metrics.associations_active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_a_cumulative_histogram() {
        let m = Metrics::default();
        m.store(StoreResult::Stored, 100, Duration::from_millis(3));
        m.store(StoreResult::Duplicate, 50, Duration::from_millis(30));
        m.store(StoreResult::Failed, 70, Duration::from_secs(60));
        m.reject(RejectReason::Limit);
        m.set_spool_free(1234);
        let active = m.association_opened();
        let text = m.render();
        for line in [
            "bidsflux_receiver_instances_total{result=\"stored\"} 1",
            "bidsflux_receiver_instances_total{result=\"duplicate\"} 1",
            "bidsflux_receiver_instances_total{result=\"conflict\"} 0",
            "bidsflux_receiver_instances_total{result=\"failed\"} 1",
            "bidsflux_receiver_bytes_total 150",
            "bidsflux_receiver_association_rejects_total{reason=\"limit\"} 1",
            "bidsflux_receiver_store_seconds_bucket{le=\"0.001\"} 0",
            "bidsflux_receiver_store_seconds_bucket{le=\"0.005\"} 1",
            "bidsflux_receiver_store_seconds_bucket{le=\"0.05\"} 2",
            "bidsflux_receiver_store_seconds_bucket{le=\"10\"} 2",
            "bidsflux_receiver_store_seconds_bucket{le=\"+Inf\"} 3",
            "bidsflux_receiver_store_seconds_count 3",
            "bidsflux_receiver_spool_free_bytes 1234",
            "bidsflux_receiver_associations_active 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        drop(active);
        assert!(m.render().contains("bidsflux_receiver_associations_active 0\n"));
    }
}
