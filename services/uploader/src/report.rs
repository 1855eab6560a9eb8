//! What the spool lifecycle and the janitor did, as plain values: the
//! lifecycle's [`Outcome`] per event and the janitor's [`Report`] per pass.
//!
//! A leaf module (it imports none of its siblings), so that `metrics` can
//! count them without depending on the modules that produce them.

use std::time::Duration;

/// What one lifecycle event (indexed or discarded) did to the spool.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Files deleted now.
    pub deleted: u64,
    /// Files already gone (a redelivery, or an operator).
    pub gone: u64,
    /// Files kept because they differ from the manifest (or are newer than a discard).
    pub kept: u64,
    /// Files that would have been deleted (`BIDSFLUX_SPOOL_KEEP`).
    pub would_delete: u64,
}

/// A study reported stale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleStudy {
    /// StudyInstanceUID (its directory name).
    pub study: String,
    /// Files under its series directories.
    pub files: u64,
    /// Age of its newest file.
    pub age: Duration,
}

/// One janitor pass.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Stale studies, sorted by UID.
    pub stale: Vec<StaleStudy>,
    /// Empty directories removed.
    pub removed_dirs: u64,
}
