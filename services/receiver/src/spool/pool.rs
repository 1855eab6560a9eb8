//! Empty temp files created ahead of need by a background thread.
//!
//! Creating a file costs far more than writing 100 KiB into one on some file systems (ext4
//! without a journal scans past recently freed inodes for every new one, which after a busy
//! hour of stores and deletions takes most of a store's CPU). A store takes a ready file from
//! the pool instead; the thread refills the pool while the receiver waits for the network.
//! The files live in the spool's temp directory, emptied at start like every temp file.

use std::fs::{self, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

/// Files kept ready.
const READY: usize = 64;

/// The pool (the thread stops when the last handle is dropped).
#[derive(Debug)]
pub struct TempPool {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct State {
    ready: Vec<PathBuf>,
    closed: bool,
}

impl TempPool {
    /// Starts the thread that keeps files ready in `dir`.
    pub fn start(dir: &Path) -> io::Result<Self> {
        let shared = Arc::new(Shared { dir: dir.to_path_buf(), state: Mutex::default(), wake: Condvar::new() });
        let s = shared.clone();
        std::thread::Builder::new().name("spool-prealloc".into()).spawn(move || fill(&s))?;
        Ok(Self { shared })
    }

    /// Opens an empty temp file for writing: a ready one, or a new one if none is ready.
    pub fn take(&self) -> io::Result<(PathBuf, fs::File)> {
        let ready = {
            let mut state = self.shared.state.lock().unwrap_or_else(PoisonError::into_inner);
            let ready = state.ready.pop();
            if state.ready.len() < READY / 2 {
                self.shared.wake.notify_one();
            }
            ready
        };
        if let Some(path) = ready {
            // Created empty by the pool and never handed out before.
            match OpenOptions::new().write(true).open(&path) {
                Ok(file) => return Ok((path, file)),
                Err(e) => tracing::warn!(error = %format!("{e:#}"), path = %path.display(), "ready temp file unusable"),
            }
        }
        let path = new_name(&self.shared.dir);
        let file = OpenOptions::new().write(true).create_new(true).open(&path)?;
        Ok((path, file))
    }
}

impl Drop for TempPool {
    fn drop(&mut self) {
        self.shared.state.lock().unwrap_or_else(PoisonError::into_inner).closed = true;
        self.shared.wake.notify_one();
    }
}

/// Name prefix of the pool's files (a test or an operator can tell them from leftovers).
pub const PREFIX: &str = "ready-";

fn new_name(dir: &Path) -> PathBuf {
    dir.join(format!("{PREFIX}{}.part", uuid::Uuid::new_v4().simple()))
}

/// The thread: tops the pool up whenever it runs low; removes what is left when closing.
fn fill(shared: &Shared) {
    loop {
        let missing = {
            let mut state = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
            while !state.closed && state.ready.len() >= READY / 2 {
                state = shared.wake.wait(state).unwrap_or_else(PoisonError::into_inner);
            }
            if state.closed {
                for path in state.ready.drain(..) {
                    let _ = fs::remove_file(path);
                }
                return;
            }
            READY - state.ready.len()
        };
        for _ in 0..missing {
            let path = new_name(&shared.dir);
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(_) => shared.state.lock().unwrap_or_else(PoisonError::into_inner).ready.push(path),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "cannot create a temp file ahead of need");
                    std::thread::sleep(std::time::Duration::from_secs(1));
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    #[test]
    fn hands_out_distinct_empty_files_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let pool = TempPool::start(dir.path()).unwrap();
        let mut seen = std::collections::HashSet::new();
        for i in 0..3 * READY {
            let (path, mut file) = pool.take().unwrap();
            assert_eq!(file.metadata().unwrap().len(), 0);
            file.write_all(format!("{i}").as_bytes()).unwrap();
            assert!(seen.insert(path.clone()), "{} handed out twice", path.display());
            fs::remove_file(path).unwrap();
        }
        let shared = pool.shared.clone();
        drop(pool);
        for _ in 0..100 {
            if Arc::strong_count(&shared) == 1 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(Arc::strong_count(&shared), 1, "the thread stopped");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0, "ready files removed");
    }
}
