//! The `main` of every long-running service on the bus, written once.
//!
//! A service's `main.rs` names itself, the JetStream objects it needs, how it reads its
//! configuration and its `run`; [`service_main`] does the rest in the same order everywhere:
//! telemetry, configuration from the process environment (an invalid value stops the start,
//! naming the variable), the NATS connection (waited for up to [`CONNECT_WAIT`]), the topology
//! check (missing objects waited for as long), then `run` until SIGINT or SIGTERM. The result is the exit code; a failure is logged
//! once, by `bidsflux_telemetry::service_main`.
//!
//! `bidsflux-<service> health` instead probes the running service's `/healthz` ([`HealthProbe`])
//! and exits 0 when it answers 200: the container healthcheck of the swarm stack (the images have
//! no curl).

use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;

use bidsflux_config::{ConfigError, Env};
use tokio_util::sync::CancellationToken;

use crate::Bus;
use crate::topology::Requirement;

/// How long a starting service waits for NATS (in a swarm, it may start first).
pub const CONNECT_WAIT: Duration = Duration::from_secs(30);

/// Where a service serves `/healthz`: the variable naming its HTTP listener and its default.
#[derive(Debug, Clone, Copy)]
pub struct HealthProbe {
    /// E.g. `BIDSFLUX_UPLOADER_HTTP_BIND`.
    pub var: &'static str,
    /// The address used when the variable is unset.
    pub default: std::net::SocketAddr,
}

/// How long `health` waits for the service's answer (docker's healthcheck timeout is longer).
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// `bidsflux-<name> health`: the exit code of a probe of the running service's `/healthz`.
fn health(name: &str, probe: HealthProbe) -> ExitCode {
    let bind = match Env::from_process().listen_addr_or(probe.var, probe.default) {
        Ok(Some(bind)) => bind,
        Ok(None) => {
            eprintln!("bidsflux-{name} health: {}=off, there is no /healthz to probe", probe.var);
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("bidsflux-{name} health: {e}");
            return ExitCode::FAILURE;
        }
    };
    match bidsflux_service::http::probe(bind, PROBE_TIMEOUT) {
        Ok(()) => {
            println!("bidsflux-{name}: healthy");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bidsflux-{name}: unhealthy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The topology check, waiting up to `wait` for objects that are missing: in a swarm every
/// service starts at once, the provisioner job among them, so a service may look before the
/// provisioner has declared what it needs. Still missing after `wait`: the error names it.
async fn require(bus: &Bus, requires: &[Requirement], wait: Duration) -> Result<(), crate::topology::TopologyError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut said = false;
    loop {
        match bus.require(requires).await {
            Err(crate::topology::TopologyError::Missing { what }) if tokio::time::Instant::now() < deadline => {
                if !said {
                    tracing::info!(missing = %what, "waiting for bidsflux-provisioner to declare the JetStream topology");
                    said = true;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => return other,
        }
    }
}

/// Runs the service `name` (e.g. `uploader`: `bidsflux-uploader` in telemetry): see the module docs.
pub async fn service_main<C, F, Fut>(
    name: &'static str,
    probe: HealthProbe,
    requires: &'static [Requirement],
    config: fn(&Env) -> Result<C, ConfigError>,
    nats_url: fn(&C) -> &str,
    run: F,
) -> ExitCode
where
    F: FnOnce(C, Bus, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    if std::env::args().nth(1).as_deref() == Some("health") {
        return health(name, probe);
    }
    let program = format!("bidsflux-{name}");
    bidsflux_telemetry::service_main(&program, || async move {
        let config = config(&Env::from_process())?;
        let bus = Bus::connect(nats_url(&config), name, CONNECT_WAIT).await?;
        require(&bus, requires, CONNECT_WAIT).await?;
        run(config, bus, bidsflux_service::shutdown_on_signals()).await
    })
    .await
}
