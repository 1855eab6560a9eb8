//! `bidsflux-provisioner`: declares the JetStream topology, then exits.

use std::process::ExitCode;
use std::time::Duration;

use bidsflux_config::Env;
use bidsflux_messaging::Bus;
use bidsflux_provisioner::{Config, run};

#[tokio::main]
async fn main() -> ExitCode {
    bidsflux_telemetry::service_main("bidsflux-provisioner", start).await
}

async fn start() -> anyhow::Result<()> {
    let config = Config::from_env(&Env::from_process())?;
    let bus = Bus::connect(&config.nats_url, "provisioner", Duration::from_secs(60)).await?;
    run(&config, &bus).await
}
