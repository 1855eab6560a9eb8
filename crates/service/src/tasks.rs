//! Tracked background tasks and a graceful shutdown, the same in every service.
//!
//! A service's `run` makes one [`Tasks`] from its shutdown token and spawns through it
//! everything that runs beside its main loop (associations, the admin API, the janitor, the
//! health listener). When the main loop returns, [`Tasks::stop`] waits for every task, lets
//! work in progress finish for a grace period, then cancels [`Tasks::abort_token`] so what is
//! left can stop at a safe point, and finally stops the tasks spawned with
//! [`Tasks::spawn_final`] (the health listener answers 503 until then). Like mini-redis'
//! `server.rs`, nothing is left running when `run` returns.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

/// How long a service without a setting of its own lets work in progress finish at shutdown
/// (swarm's default stop grace period is 10 s; the stack gives more).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How long [`Tasks::stop`] waits for tasks once they were told to abort.
pub const ABORT_WAIT: Duration = Duration::from_secs(5);

/// The background tasks of one service.
#[derive(Debug, Clone)]
pub struct Tasks {
    /// Cancelled when the service is asked to stop (a signal, or a test).
    shutdown: CancellationToken,
    /// Cancelled when the grace period is over: tasks still running abort.
    abort: CancellationToken,
    /// Cancelled once every other task ended.
    last: CancellationToken,
    /// Tasks stopped by `shutdown` (and at worst `abort`).
    tracker: TaskTracker,
    /// Tasks stopped by `last`.
    final_tracker: TaskTracker,
    /// Cancels `shutdown` and `last` when the last copy is dropped without [`Tasks::stop`]
    /// (a start-up step failed after some tasks were spawned): nothing outlives the service.
    _on_drop: Arc<CancelOnDrop>,
}

/// Cancels its tokens when dropped.
#[derive(Debug)]
struct CancelOnDrop([CancellationToken; 2]);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.cancel();
        }
    }
}

impl Tasks {
    /// Tasks of a service that stops when `shutdown` is cancelled (or when its main loop ends
    /// and [`Tasks::stop`] is called: that cancels a child of `shutdown`, never `shutdown`).
    pub fn new(shutdown: &CancellationToken) -> Self {
        let (shutdown, last) = (shutdown.child_token(), CancellationToken::new());
        Self {
            _on_drop: Arc::new(CancelOnDrop([shutdown.clone(), last.clone()])),
            shutdown,
            abort: CancellationToken::new(),
            last,
            tracker: TaskTracker::new(),
            final_tracker: TaskTracker::new(),
        }
    }

    /// The token the tasks stop on: cancelled with the service's, or by [`Tasks::stop`].
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// A token cancelled when the grace period of [`Tasks::stop`] is over.
    pub fn abort_token(&self) -> CancellationToken {
        self.abort.clone()
    }

    /// Tasks running now.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    /// Whether no task is running.
    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }

    /// Runs `task` in the background; its error, if any, is logged here, once.
    pub fn spawn<F>(&self, what: &'static str, task: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.tracker.spawn(log_failure(what, task));
    }

    /// Runs `task`, which must end when the token passed to it is cancelled: after every
    /// other task has ended.
    pub fn spawn_final<F, Fut>(&self, what: &'static str, task: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.final_tracker.spawn(log_failure(what, task(self.last.clone())));
    }

    /// Waits for every task: up to `grace` for them to finish their work, then cancels the
    /// abort token and waits up to [`ABORT_WAIT`] for them to stop (a task still running then is
    /// left to end with the process, and said so); then stops the final tasks.
    pub async fn stop(self, grace: Duration) {
        self.shutdown.cancel();
        self.tracker.close();
        if !self.tracker.is_empty() {
            info!(open = self.tracker.len(), grace = ?grace, "waiting for tasks in progress");
        }
        if tokio::time::timeout(grace, self.tracker.wait()).await.is_err() {
            warn!(open = self.tracker.len(), "grace period over, aborting tasks in progress");
            self.abort.cancel();
            if tokio::time::timeout(ABORT_WAIT, self.tracker.wait()).await.is_err() {
                warn!(open = self.tracker.len(), "tasks did not stop when aborted, leaving them");
            }
        }
        self.last.cancel();
        self.final_tracker.close();
        self.final_tracker.wait().await;
    }
}

/// A periodic task's clock: ticks at once, then every `period` (a late tick delays the next
/// one instead of bursting), until `shutdown`.
#[derive(Debug)]
pub struct Every {
    tick: tokio::time::Interval,
    shutdown: CancellationToken,
}

impl Every {
    /// Ticks every `period` until `shutdown` is cancelled.
    pub fn new(period: Duration, shutdown: CancellationToken) -> Self {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self { tick, shutdown }
    }

    /// Waits for the next tick: `true`, or `false` once the service is stopping.
    pub async fn tick(&mut self) -> bool {
        tokio::select! {
            _ = self.shutdown.cancelled() => false,
            _ = self.tick.tick() => true,
        }
    }
}

async fn log_failure<F: Future<Output = anyhow::Result<()>>>(what: &'static str, task: F) {
    if let Err(e) = task.await {
        error!(task = what, error = %format!("{e:#}"), "background task failed");
    }
}

/// A token cancelled on SIGINT or SIGTERM (for service `main`s).
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
        info!("shutdown requested");
        t.cancel();
    });
    token
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn every_ticks_at_once_then_each_period_until_shutdown() {
        let stop = CancellationToken::new();
        let mut every = Every::new(Duration::from_secs(60), stop.clone());
        let start = tokio::time::Instant::now();
        assert!(every.tick().await);
        assert!(every.tick().await);
        assert_eq!(start.elapsed(), Duration::from_secs(60));
        stop.cancel();
        assert!(!every.tick().await);
    }

    #[tokio::test]
    async fn dropping_the_tasks_without_stop_stops_them_all() {
        let service = CancellationToken::new();
        let tasks = Tasks::new(&service);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let (t, s) = (tx.clone(), tasks.shutdown().clone());
        tasks.spawn("worker", async move {
            s.cancelled().await;
            t.send("worker")?;
            Ok(())
        });
        tasks.spawn_final("listener", |last| async move {
            last.cancelled().await;
            tx.send("listener")?;
            Ok(())
        });
        // A start-up step failed: `run` returns without calling stop.
        drop(tasks);
        let mut got = vec![rx.recv().await.unwrap(), rx.recv().await.unwrap()];
        got.sort_unstable();
        assert_eq!(got, ["listener", "worker"]);
        assert!(!service.is_cancelled(), "the service's own token is not the tasks' to cancel");
    }

    #[tokio::test]
    async fn stop_waits_for_work_then_aborts_then_stops_final_tasks() {
        let tasks = Tasks::new(&CancellationToken::new());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        // Finishes within the grace period.
        let (t, s) = (tx.clone(), tasks.shutdown().clone());
        tasks.spawn("quick", async move {
            s.cancelled().await;
            t.send("quick")?;
            Ok(())
        });
        // Stops only when aborted.
        let (t, abort) = (tx.clone(), tasks.abort_token());
        tasks.spawn("slow", async move {
            abort.cancelled().await;
            t.send("slow")?;
            Ok(())
        });
        tasks.spawn_final("final", |last| async move {
            last.cancelled().await;
            tx.send("final")?;
            Ok(())
        });
        tasks.clone().stop(Duration::from_millis(200)).await;
        let mut order = Vec::new();
        while let Ok(m) = rx.try_recv() {
            order.push(m);
        }
        assert_eq!(order, ["quick", "slow", "final"]);
        assert!(tasks.is_empty());
    }
}
