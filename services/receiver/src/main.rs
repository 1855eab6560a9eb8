//! `bidsflux-receiver`: the DICOM C-STORE endpoint.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use bidsflux_config::Env;
use bidsflux_messaging::Bus;
use bidsflux_receiver::{Config, REQUIRES, run};
use bidsflux_service::shutdown_on_signals;

#[tokio::main]
async fn main() -> ExitCode {
    if std::env::args().skip(1).any(|a| a == "--list-sop-classes") {
        // The conformance lists (docs/conformance.md), without starting anything.
        print!("{}", bidsflux_receiver::conformance::listing());
        return ExitCode::SUCCESS;
    }
    bidsflux_telemetry::service_main("bidsflux-receiver", start).await
}

async fn start() -> anyhow::Result<()> {
    let config = Config::from_env(&Env::from_process())?;
    let bus = Bus::connect(&config.nats_url, "receiver", Duration::from_secs(30)).await?;
    bus.require(REQUIRES).await?;
    let listener = tokio::net::TcpListener::bind(config.dicom_bind)
        .await
        .with_context(|| format!("bind BIDSFLUX_DICOM_BIND {}", config.dicom_bind))?;
    run(config, listener, bus, shutdown_on_signals()).await
}
