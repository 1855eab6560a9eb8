//! The `main` of every long-running service on the bus, written once.
//!
//! A service's `main.rs` names itself, the JetStream objects it needs, how it reads its
//! configuration and its `run`; [`service_main`] does the rest in the same order everywhere:
//! telemetry, configuration from the process environment (an invalid value stops the start,
//! naming the variable), the NATS connection (waited for up to [`CONNECT_WAIT`]), the topology
//! check, then `run` until SIGINT or SIGTERM. The result is the exit code; a failure is logged
//! once, by `bidsflux_telemetry::service_main`.

use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;

use bidsflux_config::{ConfigError, Env};
use tokio_util::sync::CancellationToken;

use crate::Bus;
use crate::topology::Requirement;

/// How long a starting service waits for NATS (in a swarm, it may start first).
pub const CONNECT_WAIT: Duration = Duration::from_secs(30);

/// Runs the service `name` (e.g. `uploader`: `bidsflux-uploader` in telemetry): see the module docs.
pub async fn service_main<C, F, Fut>(
    name: &'static str,
    requires: &'static [Requirement],
    config: fn(&Env) -> Result<C, ConfigError>,
    nats_url: fn(&C) -> &str,
    run: F,
) -> ExitCode
where
    F: FnOnce(C, Bus, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let program = format!("bidsflux-{name}");
    bidsflux_telemetry::service_main(&program, || async move {
        let config = config(&Env::from_process())?;
        let bus = Bus::connect(nats_url(&config), name, CONNECT_WAIT).await?;
        bus.require(requires).await?;
        run(config, bus, bidsflux_service::shutdown_on_signals()).await
    })
    .await
}
