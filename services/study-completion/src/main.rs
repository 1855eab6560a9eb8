//! `bidsflux-study-completion`: fires *study completed* after a quiet period.

use std::process::ExitCode;
use std::time::Duration;

use bidsflux_config::Env;
use bidsflux_messaging::{Bus, shutdown_on_signals};
use bidsflux_study_completion::{Config, REQUIRES, run};

#[tokio::main]
async fn main() -> ExitCode {
    let _telemetry = match bidsflux_telemetry::init_telemetry("bidsflux-study-completion") {
        Ok(g) => g,
        Err(e) => {
            eprintln!("cannot initialise telemetry: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    match start().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "study-completion stopped");
            ExitCode::FAILURE
        }
    }
}

async fn start() -> anyhow::Result<()> {
    let config = Config::from_env(&Env::from_process())?;
    let bus = Bus::connect(&config.nats_url, "study-completion", Duration::from_secs(30)).await?;
    bus.require(REQUIRES).await?;
    run(config, bus, shutdown_on_signals()).await
}
