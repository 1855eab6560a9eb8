//! Group commit: one `syncfs(2)` makes the writes of every store waiting durable at once.
//!
//! Each store calls [`GroupCommit::sync`] after its writes; a dedicated thread runs waves: it
//! takes every waiter registered so far, calls `syncfs` on the spool's file system (all dirty
//! data and metadata written and the device cache flushed, one journal commit), and answers each
//! waiter with the wave's result. A waiter registered while a wave runs joins the next one, so a
//! wave always *starts* after the writes of every store it answers: its success means those
//! writes are durable. Stores arriving together (several associations) share one flush instead
//! of paying one each; a lone store pays one, like an `fsync`.
//!
//! `syncfs` reports write-back errors (Linux ≥ 5.8, through the file descriptor's error cursor):
//! a failed wave fails every store it answers, each of which then answers a failure status.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use tokio::sync::oneshot;

/// What a waiter gets: `Ok` once its writes are durable, the OS error number otherwise.
type WaveResult = Result<(), i32>;

/// The handle stores use; the sync thread stops when the last handle is dropped.
#[derive(Debug)]
pub struct GroupCommit {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when a waiter arrives or the handle is dropped.
    wake: Condvar,
}

#[derive(Debug, Default)]
struct Queue {
    /// Stores waiting for the next wave.
    waiting: Vec<oneshot::Sender<WaveResult>>,
    /// The handle is gone: finish the waves asked for, then stop.
    closed: bool,
}

impl GroupCommit {
    /// Starts the sync thread for the file system holding `dir`.
    pub fn start(dir: &Path) -> io::Result<Self> {
        let fs = File::open(dir)?;
        let shared = Arc::new(Shared { queue: Mutex::new(Queue::default()), wake: Condvar::new() });
        let thread_shared = shared.clone();
        std::thread::Builder::new().name("spool-sync".into()).spawn(move || run(&thread_shared, &fs))?;
        Ok(Self { shared })
    }

    /// Waits until everything written before this call is durable on the spool's file system.
    pub async fn sync(&self) -> io::Result<()> {
        let (tx, rx) = oneshot::channel();
        {
            let mut queue = self.shared.queue.lock().unwrap_or_else(PoisonError::into_inner);
            queue.waiting.push(tx);
        }
        self.shared.wake.notify_one();
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(errno)) => Err(io::Error::from_raw_os_error(errno)),
            Err(_) => Err(io::Error::other("the spool sync thread stopped")),
        }
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        self.shared.queue.lock().unwrap_or_else(PoisonError::into_inner).closed = true;
        self.shared.wake.notify_one();
    }
}

/// The sync thread: waves until the handle is dropped and nobody waits.
fn run(shared: &Shared, fs: &File) {
    let mut waves = 0_u64;
    loop {
        let batch = {
            let mut queue = shared.queue.lock().unwrap_or_else(PoisonError::into_inner);
            while queue.waiting.is_empty() && !queue.closed {
                queue = shared.wake.wait(queue).unwrap_or_else(PoisonError::into_inner);
            }
            if queue.waiting.is_empty() {
                tracing::debug!(waves, "spool sync thread stopped");
                return;
            }
            std::mem::take(&mut queue.waiting)
        };
        let started = std::time::Instant::now();
        let result = rustix::fs::syncfs(fs).map_err(|e| e.raw_os_error());
        waves += 1;
        tracing::trace!(stores = batch.len(), micros = started.elapsed().as_micros() as u64, "spool sync wave");
        if let Err(errno) = result {
            tracing::error!(
                error = %io::Error::from_raw_os_error(errno),
                stores = batch.len(),
                "failed to sync the spool file system"
            );
        }
        for waiter in batch {
            // A waiter that went away (its association was aborted) needs no answer.
            let _ = waiter.send(result);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_waiters_are_all_answered() {
        let dir = tempfile::tempdir().unwrap();
        let commit = Arc::new(GroupCommit::start(dir.path()).unwrap());
        let mut tasks = Vec::new();
        for i in 0..32 {
            let commit = commit.clone();
            let path = dir.path().join(format!("f{i}"));
            tasks.push(tokio::spawn(async move {
                std::fs::write(&path, b"data").unwrap();
                commit.sync().await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
    }

    #[tokio::test]
    async fn dropping_the_handle_stops_the_thread_after_pending_waves() {
        let dir = tempfile::tempdir().unwrap();
        let commit = GroupCommit::start(dir.path()).unwrap();
        commit.sync().await.unwrap();
        let shared = commit.shared.clone();
        drop(commit);
        // The thread holds the other reference until it returns.
        bidsflux_testsupport::wait_until("the sync thread to stop", std::time::Duration::from_secs(10), || {
            let n = Arc::strong_count(&shared);
            async move { (n == 1).then_some(()) }
        })
        .await
        .unwrap();
    }
}
