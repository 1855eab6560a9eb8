//! `bidsflux-indexer`: indexes archived studies as DataLad datasets in the forge.

use std::process::ExitCode;
use std::time::Duration;

use bidsflux_config::Env;
use bidsflux_indexer::{Config, REQUIRES, run};
use bidsflux_messaging::Bus;
use bidsflux_service::shutdown_on_signals;

#[tokio::main]
async fn main() -> ExitCode {
    bidsflux_telemetry::service_main("bidsflux-indexer", start).await
}

async fn start() -> anyhow::Result<()> {
    let config = Config::from_env(&Env::from_process())?;
    let bus = Bus::connect(&config.nats_url, "indexer", Duration::from_secs(30)).await?;
    bus.require(REQUIRES).await?;
    run(config, bus, shutdown_on_signals()).await
}
