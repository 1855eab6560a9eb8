//! `bidsflux-receiver`: the DICOM endpoint of bidsflux.
//!
//! A C-STORE SCP (on `dicom-ul`) that accepts associations called with our AE
//! title, answers C-ECHO, and for each C-STORE streams the data set to the
//! spool as a DICOM Part 10 file (bytes unchanged), then publishes
//! `InstanceStored` and waits for JetStream's ack before answering Success.
//!
//! - [`config`]: settings from the environment;
//! - [`access`]: the scanner allow-list (deny by default);
//! - [`conformance`]: the SOP classes and transfer syntaxes we accept (the storage SOP classes
//!   of the standard are listed in the private `sop_classes`);
//! - [`tls`]: DICOM TLS from PEM files;
//! - [`association`]: negotiation and the DIMSE loop of one association;
//! - [`dimse`]: command sets;
//! - [`cstore`]: one C-STORE, from fragments to the published event;
//! - [`header`]: walks a data set's header up to the UIDs, checking every declared length;
//! - [`rule_attributes`]: which data set attributes `InstanceStored` carries for completion rules;
//! - [`spool`]: temp files, the spool journal, atomic placement (the layout is
//!   [`bidsflux_session::SpoolPath`]);
//! - [`space`]: refuses stores while the spool's disk is nearly full;
//! - [`metrics`]: Prometheus metrics, served with `/healthz` by [`bidsflux_messaging::http`].
//!
//! Patient values never reach logs, spans or error messages: only UIDs,
//! sizes, AE titles and peer addresses do.

pub mod access;
pub mod association;
pub mod config;
pub mod conformance;
pub mod cstore;
pub mod dimse;
pub mod header;
pub mod metrics;
pub mod rule_attributes;
mod sop_classes;
pub mod space;
pub mod spool;
pub mod tls;

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

use crate::access::Policy;
use crate::cstore::StoreContext;
use crate::metrics::{Metrics, RejectReason};
use crate::space::SpaceGuard;
use crate::spool::Spool;

/// What must exist on the bus before the receiver starts.
pub const REQUIRES: &[Requirement] =
    &[Requirement::Stream(subjects::STREAM_INSTANCES), Requirement::Stream(subjects::STREAM_CONFLICTS)];

/// Connections beyond `BIDSFLUX_MAX_ASSOCIATIONS` answered with an A-ASSOCIATE-RJ at once;
/// past this many more, they are closed without an answer (a flood must not cost tasks).
const MAX_REJECTING: usize = 16;

/// The sockets the receiver serves.
#[derive(Debug)]
pub struct Listeners {
    /// DICOM associations.
    pub dicom: TcpListener,
    /// `/healthz` and `/metrics`; `None`: not served.
    pub http: Option<TcpListener>,
}

/// Binds [`Config::http_bind`] (if set) and calls [`run_with`].
pub async fn run(config: Config, listener: TcpListener, bus: Bus, shutdown: CancellationToken) -> anyhow::Result<()> {
    let http = match config.http_bind {
        Some(addr) => {
            Some(TcpListener::bind(addr).await.with_context(|| format!("bind {} {addr}", config::HTTP_BIND_VAR))?)
        }
        None => None,
    };
    run_with(config, Listeners { dicom: listener, http }, bus, shutdown).await
}

/// Serves DICOM associations on `listeners.dicom` (and health and metrics on
/// `listeners.http`) until `shutdown` is cancelled.
///
/// At most [`Config::max_associations`] are served at once; a connection beyond that is
/// rejected (A-ASSOCIATE-RJ rejected-transient, local-limit-exceeded), not left waiting.
///
/// Then it stops accepting, lets open associations go on for
/// [`Config::shutdown_grace`], aborts those still open (a store being
/// acknowledged still finishes) and returns.
pub async fn run_with(
    config: Config,
    listeners: Listeners,
    bus: Bus,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let Listeners { dicom: listener, http } = listeners;
    let spool = Spool::open(&config.spool_dir)
        .await
        .with_context(|| format!("prepare spool directory {}", config.spool_dir.display()))?;
    let metrics = Arc::new(Metrics::default());
    let space = SpaceGuard::new(config.spool_dir.clone(), config.spool_min_free, metrics.clone());
    let free = space.free();
    if space.check().is_err() {
        warn!(
            free_bytes = free,
            min_free_bytes = config.spool_min_free,
            "the spool starts below its free-space threshold"
        );
    }
    let http_stop = CancellationToken::new();
    let http_task = http.map(|http| {
        if let Ok(addr) = http.local_addr() {
            info!(addr = %addr, "health and metrics listening");
        }
        let health =
            bidsflux_messaging::http::Health { bus: bus.clone(), metrics: metrics.clone(), shutdown: shutdown.clone() };
        tokio::spawn(bidsflux_messaging::http::serve(http, health, http_stop.clone()))
    });
    let recovered = spool.take_recovered();
    if !recovered.is_empty() {
        // Announced again: JetStream de-duplicates what was published before the crash.
        let bus = bus.clone();
        tokio::spawn(async move {
            let n = recovered.len();
            let mut failed = 0_usize;
            for r in recovered {
                if let Err(e) = cstore::announce(&bus, &r.event, r.existing.as_ref()).await {
                    failed += 1;
                    warn!(error = %format!("{e:#}"), spool_path = %r.event.spool_path, "cannot announce a restored instance");
                }
            }
            info!(instances = n, failed, "restored instances announced");
        });
    }
    if !config.rule_attributes.is_empty() {
        info!(
            keywords = %config.rule_attributes.keywords().collect::<Vec<_>>().join(","),
            "data set attributes copied into events for completion rules"
        );
    }
    let rule_attributes = Arc::new(config.rule_attributes.clone());
    let ctx = Arc::new(StoreContext { spool, bus, space, metrics: metrics.clone(), rule_attributes });
    let acceptor = Arc::new(association::Acceptor::new(&config));
    let tracker = TaskTracker::new();
    let abort = CancellationToken::new();
    let slots = Arc::new(Semaphore::new(config.max_associations));
    let rejecting = Arc::new(Semaphore::new(MAX_REJECTING));
    match &config.access {
        Policy::AcceptAny { .. } => warn!(
            "{} is on: any calling AE title is accepted from any address; for development only",
            config::ACCEPT_ANY_VAR
        ),
        Policy::AllowList(entries) => info!(entries = entries.len(), "scanner allow-list loaded"),
    }
    if let Some(tls) = &config.tls {
        tokio::spawn(reload_certificate(tls.cert.clone(), tls.reload_interval, shutdown.clone()));
    }
    info!(
        addr = %listener.local_addr().context("read listener address")?,
        ae_title = %config.ae_title,
        spool = %config.spool_dir.display(),
        tls = config.tls.is_some(),
        mutual_tls = config.tls.as_ref().is_some_and(|t| t.client_ca_file.is_some()),
        max_associations = config.max_associations,
        "receiver listening"
    );
    loop {
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
        match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                let fut = association::serve(acceptor.clone(), ctx.clone(), socket, peer, abort.clone());
                tracker.spawn(async move {
                    fut.await;
                    drop(slot);
                });
            }
            Err(_) => match rejecting.clone().try_acquire_owned() {
                Ok(permit) => {
                    metrics.reject(RejectReason::Limit);
                    let fut = association::reject_busy(acceptor.clone(), socket, peer);
                    tracker.spawn(async move {
                        fut.await;
                        drop(permit);
                    });
                }
                Err(_) => {
                    metrics.reject(RejectReason::Limit);
                    warn!(peer = %peer, "too many associations and rejections at once, connection closed");
                }
            },
        }
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
    http_stop.cancel();
    if let Some(task) = http_task
        && let Err(e) = task.await
    {
        warn!(error = %e, "http listener task failed");
    }
    info!("receiver stopped");
    Ok(())
}

/// Serves a renewed TLS certificate without a restart: checks the files every `interval`.
async fn reload_certificate(cert: Arc<tls::ReloadingCert>, interval: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let c = cert.clone();
        match tokio::task::spawn_blocking(move || c.reload_if_changed()).await {
            Ok(Ok(true)) => info!(cert = ?cert, "TLS certificate files changed: serving the new certificate"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => {
                warn!(error = %e, "TLS certificate files changed but do not load: keeping the previous certificate")
            }
            Err(e) => warn!(error = %e, "TLS certificate check failed"),
        }
    }
}
