//! `bidsflux-receiver`: the DICOM endpoint of bidsflux.
//!
//! A C-STORE SCP (on `dicom-ul`) that accepts associations called with our AE
//! title, answers C-ECHO, and for each C-STORE streams the data set to the
//! spool as a DICOM Part 10 file (bytes unchanged), then publishes
//! `InstanceStored` and waits for JetStream's ack before answering Success.
//!
//! - [`config`]: settings from the environment;
//! - [`association`]: negotiation and the DIMSE loop of one association;
//! - [`dimse`]: command sets;
//! - [`store`]: one C-STORE, from fragments to the published event;
//! - [`spool`]: temp files, the spool layout, atomic placement.
//!
//! Patient values never reach logs, spans or error messages: only UIDs,
//! sizes, AE titles and peer addresses do.

pub mod association;
pub mod config;
pub mod dimse;
pub mod spool;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bidsflux_messaging::topology::Requirement;
use bidsflux_messaging::{Bus, subjects};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

pub use config::Config;

use crate::spool::Spool;
use crate::store::StoreContext;

/// What must exist on the bus before the receiver starts.
pub const REQUIRES: &[Requirement] = &[Requirement::Stream(subjects::STREAM_INSTANCES)];

/// Serves DICOM associations on `listener` until `shutdown` is cancelled.
///
/// Then it stops accepting, lets open associations go on for
/// [`Config::shutdown_grace`], aborts those still open (a store being
/// acknowledged still finishes) and returns.
pub async fn run(config: Config, listener: TcpListener, bus: Bus, shutdown: CancellationToken) -> anyhow::Result<()> {
    let spool = Spool::open(&config.spool_dir)
        .await
        .with_context(|| format!("prepare spool directory {}", config.spool_dir.display()))?;
    let ctx = Arc::new(StoreContext { spool, bus });
    let options = Arc::new(association::options(&config));
    let tracker = TaskTracker::new();
    let abort = CancellationToken::new();
    let slots = Arc::new(Semaphore::new(config.max_associations));
    info!(
        addr = %listener.local_addr().context("read listener address")?,
        ae_title = %config.ae_title,
        spool = %config.spool_dir.display(),
        "receiver listening"
    );
    loop {
        let slot = tokio::select! {
            _ = shutdown.cancelled() => break,
            slot = slots.clone().acquire_owned() => slot.context("acquire association slot")?,
        };
        let (socket, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    error!(error = %e, "failed to accept connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        if let Err(e) = socket.set_nodelay(true) {
            warn!(error = %e, "cannot set TCP_NODELAY");
        }
        let fut = association::serve(options.clone(), ctx.clone(), socket, peer, abort.clone());
        tracker.spawn(async move {
            fut.await;
            drop(slot);
        });
    }
    drop(listener);
    tracker.close();
    if !tracker.is_empty() {
        info!(open = tracker.len(), grace = ?config.shutdown_grace, "stopped accepting, waiting for open associations");
    }
    if tokio::time::timeout(config.shutdown_grace, tracker.wait()).await.is_err() {
        abort.cancel();
        tracker.wait().await;
    }
    info!("receiver stopped");
    Ok(())
}
