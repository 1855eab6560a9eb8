//! `bidsflux-provisioner`: declares the JetStream topology, then exits.

use std::process::ExitCode;
use std::time::Duration;

use bidsflux_config::Env;
use bidsflux_messaging::Bus;
use bidsflux_provisioner::{Config, run};

#[tokio::main]
async fn main() -> ExitCode {
    let _telemetry = match bidsflux_telemetry::init_telemetry("bidsflux-provisioner") {
        Ok(g) => g,
        Err(e) => {
            eprintln!("cannot initialise telemetry: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let result = async {
        let config = Config::from_env(&Env::from_process())?;
        let bus = Bus::connect(&config.nats_url, "provisioner", Duration::from_secs(60)).await?;
        run(&config, &bus).await
    }
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "provisioning failed");
            ExitCode::FAILURE
        }
    }
}
