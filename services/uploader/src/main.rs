//! `bidsflux-uploader`: archives completed studies into S3.

use std::process::ExitCode;
use std::time::Duration;

use bidsflux_config::Env;
use bidsflux_messaging::Bus;
use bidsflux_service::shutdown_on_signals;
use bidsflux_uploader::{Config, REQUIRES, run};

#[tokio::main]
async fn main() -> ExitCode {
    bidsflux_telemetry::service_main("bidsflux-uploader", start).await
}

async fn start() -> anyhow::Result<()> {
    let config = Config::from_env(&Env::from_process())?;
    let bus = Bus::connect(&config.nats_url, "uploader", Duration::from_secs(30)).await?;
    bus.require(REQUIRES).await?;
    run(config, bus, shutdown_on_signals()).await
}
