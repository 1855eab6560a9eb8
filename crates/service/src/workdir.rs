//! A process's own scratch directory under a work directory that replicas and restarts share.
//!
//! A service killed with SIGKILL (the OOM killer, a node failure, `docker kill`) cannot remove
//! its temporary files, and the work directory may be shared with other replicas whose files
//! are in use. So each process claims `<work>/<service>.<random>/` and holds an exclusive lock
//! on its `.lock` file for as long as it lives; the kernel releases the lock when the process
//! dies, however it dies. At start a process removes every claim of the same service whose
//! lock it can take: what a dead process left, never a live replica's files.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

/// The lock file inside a claimed directory.
const LOCK: &str = ".lock";

/// A claimed scratch directory; its lock is held until this is dropped.
#[derive(Debug)]
pub struct WorkDir {
    path: PathBuf,
    /// Held open and locked: the claim.
    _lock: File,
}

impl WorkDir {
    /// [`Self::claim`] at a service's start: the error names `BIDSFLUX_WORK_DIR`, and the
    /// removal of what stopped processes of `service` left is logged.
    pub fn claim_at_start(root: &Path, service: &str) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let (work, reaped) = Self::claim(root, service)
            .with_context(|| format!("claim a work directory in {} (BIDSFLUX_WORK_DIR)", root.display()))?;
        if reaped > 0 {
            tracing::info!(reaped, service, "removed the work files of stopped processes");
        }
        Ok(work)
    }

    /// Removes the claims of `service` under `root` that no live process holds, then claims a
    /// new directory. Returns it and how many stale claims were removed.
    pub fn claim(root: &Path, service: &str) -> io::Result<(Self, usize)> {
        std::fs::create_dir_all(root)?;
        let prefix = format!("{service}.");
        let mut reaped = 0;
        for entry in std::fs::read_dir(root)? {
            let entry = entry?;
            let name = entry.file_name();
            if !name.to_string_lossy().starts_with(&prefix) || !entry.file_type()?.is_dir() {
                continue;
            }
            let dir = entry.path();
            let stale = match OpenOptions::new().write(true).open(dir.join(LOCK)) {
                Ok(f) => f.try_lock().is_ok(),
                // Not a claim this module made (claims get their lock before their name).
                Err(e) if e.kind() == io::ErrorKind::NotFound => false,
                Err(e) => return Err(e),
            };
            if stale {
                std::fs::remove_dir_all(&dir)?;
                reaped += 1;
            }
        }
        let random = std::collections::hash_map::RandomState::new();
        let suffix = std::hash::BuildHasher::hash_one(&random, std::process::id());
        let name = format!("{prefix}{}.{suffix:016x}", std::process::id());
        // Made and locked under a name no claim matches, then renamed: another process
        // starting meanwhile never sees a claim without its lock (the lock follows the file).
        let making = root.join(format!(".{name}"));
        std::fs::create_dir(&making)?;
        let lock = OpenOptions::new().write(true).create_new(true).open(making.join(LOCK))?;
        lock.try_lock().map_err(|e| io::Error::other(format!("lock {}: {e}", making.display())))?;
        let path = root.join(name);
        std::fs::rename(&making, &path)?;
        Ok((Self { path, _lock: lock }, reaped))
    }

    /// The claimed directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_claim_is_removed_and_a_live_one_kept() {
        let root = tempfile::tempdir().unwrap();
        let (live, reaped) = WorkDir::claim(root.path(), "uploader").unwrap();
        assert_eq!(reaped, 0);
        std::fs::write(live.path().join("archive.7z"), b"in use").unwrap();
        // What a killed process left: its lock file is no longer locked.
        let dead = root.path().join("uploader.1.dead");
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(dead.join(LOCK), b"").unwrap();
        std::fs::write(dead.join("partial.7z"), b"half").unwrap();
        // Another service's claim is not ours to judge.
        std::fs::create_dir(root.path().join("indexer.1.x")).unwrap();
        let (second, reaped) = WorkDir::claim(root.path(), "uploader").unwrap();
        assert_eq!(reaped, 1);
        assert!(!dead.exists());
        assert!(live.path().join("archive.7z").exists(), "a live replica's files stay");
        assert!(root.path().join("indexer.1.x").exists());
        assert_ne!(second.path(), live.path());
        // Once dropped (the process died), the next start removes it.
        let gone = live.path().to_owned();
        drop(live);
        let (_third, reaped) = WorkDir::claim(root.path(), "uploader").unwrap();
        assert_eq!(reaped, 1);
        assert!(!gone.exists());
    }
}
