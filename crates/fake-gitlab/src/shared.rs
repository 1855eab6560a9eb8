//! What the request handlers share: the state behind its lock, and where the
//! server and its repositories are.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use crate::repos::Env;
use crate::state::State;

/// The server's URL, its repositories, the `HOME` of the git it runs, and the state.
#[derive(Debug)]
pub(crate) struct Shared {
    /// `http://127.0.0.1:PORT`.
    pub(crate) url: String,
    /// Root of the bare repositories.
    pub(crate) repos: PathBuf,
    /// `HOME` of `git http-backend`.
    pub(crate) home: PathBuf,
    /// Everything GitLab would keep in its database.
    pub(crate) state: Mutex<State>,
}

impl Shared {
    /// Where the repositories are, for handlers that hold the state's lock.
    pub(crate) fn env(&self) -> Env {
        Env { repos: self.repos.clone() }
    }
}

/// Locks `m`, even if a thread panicked while holding it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
