//! The spool free-space guard: stores are refused (0xA700) while the spool's file system has
//! less than `BIDSFLUX_SPOOL_MIN_FREE` bytes free, before the disk is exhausted.
//!
//! `statvfs` is called at most once per `CACHE_FOR` (1 s); in between, the last answer is reused,
//! so a check costs a mutex lock. The refusal is logged at most once per `WARN_EVERY`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing::warn;

use crate::metrics::Metrics;

/// How long a free-space reading is reused.
const CACHE_FOR: Duration = Duration::from_secs(1);
/// Least time between two warnings about a full spool.
const WARN_EVERY: Duration = Duration::from_secs(30);

/// Free space was below the threshold: the store must be refused.
#[derive(Debug, thiserror::Error)]
#[error("spool disk nearly full")]
pub struct NearlyFull;

/// Checks the spool file system's free space against a threshold.
#[derive(Debug)]
pub struct SpaceGuard {
    root: PathBuf,
    min_free: u64,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Last reading and when it was taken.
    reading: Option<(Instant, u64)>,
    /// When the last warning was logged.
    warned: Option<Instant>,
}

impl SpaceGuard {
    /// A guard for the file system holding `root`.
    pub fn new(root: PathBuf, min_free: u64, metrics: Arc<Metrics>) -> Self {
        Self { root, min_free, metrics, state: Mutex::new(State::default()) }
    }

    /// Free bytes available to us (`f_bavail * f_frsize`), re-read at most once per second.
    /// A failing `statvfs` counts as no free space: better refuse than fill a disk we cannot see.
    pub fn free(&self) -> u64 {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((at, free)) = state.reading
            && now.duration_since(at) < CACHE_FOR
        {
            return free;
        }
        let free = match rustix::fs::statvfs(&self.root) {
            Ok(st) => st.f_bavail.saturating_mul(st.f_frsize),
            Err(e) => {
                warn!(error = %format!("{e:#}"), spool = %self.root.display(), "cannot read the spool's free space");
                0
            }
        };
        state.reading = Some((now, free));
        self.metrics.set_spool_free(free);
        free
    }

    /// `Err` when the spool has less than the threshold free (logs a rate-limited warning).
    pub fn check(&self) -> Result<(), NearlyFull> {
        let free = self.free();
        if free >= self.min_free {
            return Ok(());
        }
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.warned.is_none_or(|at| now.duration_since(at) >= WARN_EVERY) {
            state.warned = Some(now);
            warn!(
                free_bytes = free,
                min_free_bytes = self.min_free,
                spool = %self.root.display(),
                "spool disk nearly full, refusing stores (0xA700)"
            );
        }
        Err(NearlyFull)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bidsflux_service::metrics::MetricsText as _;

    #[test]
    fn refuses_below_the_threshold_and_caches_the_reading() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::default());
        let ok = SpaceGuard::new(dir.path().to_path_buf(), 0, metrics.clone());
        ok.check().unwrap();
        let free = ok.free();
        assert!(free > 0);
        assert!(metrics.render().contains(&format!("bidsflux_receiver_spool_free_bytes {free}\n")));
        let full = SpaceGuard::new(dir.path().to_path_buf(), u64::MAX / 2, metrics);
        assert_eq!(full.check().unwrap_err().to_string(), "spool disk nearly full");
        assert!(full.check().is_err());
        let missing = SpaceGuard::new(dir.path().join("nowhere"), 1, Arc::new(Metrics::default()));
        assert!(missing.check().is_err());
    }
}
