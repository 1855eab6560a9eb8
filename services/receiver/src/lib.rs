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
//! - [`metrics`]: Prometheus metrics, served with `/healthz` by [`bidsflux_service::http`].
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
use bidsflux_service::tasks::Every;
use bidsflux_service::{Tasks, listen};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

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
    let http = listen::bind_optional(config.http_bind, config::HTTP_BIND_VAR).await?;
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
    let tasks = Tasks::new(&shutdown);
    bidsflux_service::http::spawn(&tasks, http, Arc::new(bus.clone()), metrics.clone());
    let recovered = spool.take_recovered();
    if !recovered.is_empty() {
        // Announced again: JetStream de-duplicates what was published before the crash.
        let (bus, abort) = (bus.clone(), tasks.abort_token());
        let announce = async move {
            let n = recovered.len();
            let mut failed = 0_usize;
            for r in recovered {
                if let Err(e) = cstore::announce(&bus, &r.event, r.existing.as_ref()).await {
                    failed += 1;
                    warn!(error = %format!("{e:#}"), spool_path = %r.event.spool_path, "cannot announce a restored instance");
                }
            }
            info!(instances = n, failed, "restored instances announced");
        };
        // Given up, like the associations, when the grace period is over.
        tasks.spawn("announce restored instances", async move {
            tokio::select! {
                _ = abort.cancelled() => {}
                _ = announce => {}
            }
            Ok(())
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
    let abort = tasks.abort_token();
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
        let reload = reload_certificate(tls.cert.clone(), tls.reload_interval, tasks.shutdown().clone());
        tasks.spawn("reload the TLS certificate", async move {
            reload.await;
            Ok(())
        });
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
    while let Some((socket, peer)) = listen::accept(&listener, &shutdown).await {
        if let Err(e) = socket.set_nodelay(true) {
            warn!(error = %format!("{e:#}"), "cannot set TCP_NODELAY");
        }
        match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                let fut = association::serve(acceptor.clone(), ctx.clone(), socket, peer, abort.clone());
                tasks.spawn("association", async move {
                    fut.await;
                    drop(slot);
                    Ok(())
                });
            }
            Err(_) => match rejecting.clone().try_acquire_owned() {
                Ok(permit) => {
                    metrics.reject(RejectReason::Limit);
                    let fut = association::reject_busy(acceptor.clone(), socket, peer);
                    tasks.spawn("association rejection", async move {
                        fut.await;
                        drop(permit);
                        Ok(())
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
    info!(open = tasks.len(), "stopped accepting associations");
    tasks.stop(config.shutdown_grace).await;
    info!("receiver stopped");
    Ok(())
}

/// Serves a renewed TLS certificate without a restart: checks the files every `interval`.
async fn reload_certificate(cert: Arc<tls::ReloadingCert>, interval: Duration, shutdown: CancellationToken) {
    let mut every = Every::new(interval, shutdown);
    while every.tick().await {
        let c = cert.clone();
        match tokio::task::spawn_blocking(move || c.reload_if_changed()).await {
            Ok(Ok(true)) => info!(cert = ?cert, "TLS certificate files changed: serving the new certificate"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => {
                warn!(error = %format!("{e:#}"), "TLS certificate files changed but do not load: keeping the previous certificate")
            }
            Err(e) => warn!(error = %format!("{e:#}"), "TLS certificate check failed"),
        }
    }
}
