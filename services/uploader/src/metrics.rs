//! The uploader's metrics (`GET /metrics`): spool lifecycle counters and the
//! janitor's gauges. No labels carry UIDs or patient values.

use std::sync::atomic::{AtomicU64, Ordering};

use bidsflux_service::metrics::Exposition;

use crate::report::{Outcome, Report};

/// Counters and gauges, shared by the lifecycle consumers and the janitor.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Spool files deleted (indexed or discarded).
    deleted_files: AtomicU64,
    /// Files kept because they differ from the indexed manifest.
    kept_different_files: AtomicU64,
    /// Files that would have been deleted with `BIDSFLUX_SPOOL_KEEP=true`.
    kept_by_config_files: AtomicU64,
    /// Studies whose newest spool file is older than the threshold (last janitor pass).
    stale_studies: AtomicU64,
    /// Files of those studies.
    stale_files: AtomicU64,
    /// Age of the oldest stale study's newest file, in seconds.
    oldest_stale_age_seconds: AtomicU64,
    /// Janitor passes completed.
    janitor_runs: AtomicU64,
}

impl Metrics {
    /// Adds what one lifecycle event did.
    pub fn record_deletion(&self, o: &Outcome) {
        self.deleted_files.fetch_add(o.deleted, Ordering::Relaxed);
        self.kept_different_files.fetch_add(o.kept, Ordering::Relaxed);
        self.kept_by_config_files.fetch_add(o.would_delete, Ordering::Relaxed);
    }

    /// Sets the gauges from one janitor pass.
    pub fn record_janitor(&self, r: &Report) {
        self.stale_studies.store(r.stale.len() as u64, Ordering::Relaxed);
        self.stale_files.store(r.stale.iter().map(|s| s.files).sum(), Ordering::Relaxed);
        let oldest = r.stale.iter().map(|s| s.age.as_secs()).max().unwrap_or(0);
        self.oldest_stale_age_seconds.store(oldest, Ordering::Relaxed);
        self.janitor_runs.fetch_add(1, Ordering::Relaxed);
    }

    /// Studies reported stale by the last janitor pass.
    pub fn stale_studies(&self) -> u64 {
        self.stale_studies.load(Ordering::Relaxed)
    }

    /// Files of the stale studies of the last janitor pass.
    pub fn stale_files(&self) -> u64 {
        self.stale_files.load(Ordering::Relaxed)
    }

    /// Spool files deleted so far.
    pub fn deleted_files(&self) -> u64 {
        self.deleted_files.load(Ordering::Relaxed)
    }

    /// The Prometheus text format.
    pub fn render(&self) -> String {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut e = Exposition::new();
        e.counter(
            "bidsflux_uploader_spool_deleted_files_total",
            "Spool files deleted after their study was indexed or discarded.",
            load(&self.deleted_files),
        );
        e.counter(
            "bidsflux_uploader_spool_kept_different_files_total",
            "Spool files kept because they differ from the indexed manifest.",
            load(&self.kept_different_files),
        );
        e.counter(
            "bidsflux_uploader_spool_kept_by_config_files_total",
            "Spool files not deleted because BIDSFLUX_SPOOL_KEEP is set.",
            load(&self.kept_by_config_files),
        );
        e.gauge(
            "bidsflux_uploader_spool_stale_studies",
            "Studies whose newest spool file is older than BIDSFLUX_SPOOL_STALE_AFTER (last janitor pass).",
            load(&self.stale_studies),
        );
        e.gauge("bidsflux_uploader_spool_stale_files", "Spool files of the stale studies.", load(&self.stale_files));
        e.gauge(
            "bidsflux_uploader_spool_oldest_stale_age_seconds",
            "Age of the newest file of the oldest stale study.",
            load(&self.oldest_stale_age_seconds),
        );
        e.counter("bidsflux_uploader_spool_janitor_runs_total", "Janitor passes completed.", load(&self.janitor_runs));
        e.finish()
    }
}

impl bidsflux_service::metrics::MetricsText for Metrics {
    fn render(&self) -> String {
        Metrics::render(self)
    }
}
