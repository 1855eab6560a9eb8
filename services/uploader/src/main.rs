//! `bidsflux-uploader`: archives completed studies into S3.

use std::time::Duration;

use anyhow::Context as _;
use bidsflux_config::Env;
use bidsflux_messaging::topology::Requirement;
use bidsflux_messaging::{Bus, shutdown_on_signals, subjects};
use bidsflux_uploader::{Config, run};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::from_env(&Env::from_process()).context("read configuration")?;
    let _telemetry = bidsflux_telemetry::init_telemetry("bidsflux-uploader")?;
    let bus = Bus::connect(&config.nats_url, "uploader", Duration::from_secs(30)).await?;
    bus.require(&[
        Requirement::Consumer { stream: subjects::STREAM_STUDIES, name: subjects::CONSUMER_UPLOADER },
        Requirement::Stream(subjects::STREAM_ARCHIVES),
        Requirement::ObjectStore(subjects::OBJ_MANIFESTS),
    ])
    .await
    .context("check JetStream topology")?;
    let shutdown = shutdown_on_signals();
    run(config, bus, shutdown).await
}
