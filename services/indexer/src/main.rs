//! `bidsflux-indexer`: indexes archived studies as DataLad datasets in the forge.

use std::process::ExitCode;

use bidsflux_indexer::{Config, REQUIRES, config, run};
use bidsflux_messaging::HealthProbe;

#[tokio::main]
async fn main() -> ExitCode {
    bidsflux_messaging::service_main(
        "indexer",
        HealthProbe { var: config::HTTP_BIND_VAR, default: config::DEFAULT_HTTP_BIND },
        REQUIRES,
        Config::from_env,
        |c| &c.nats_url,
        run,
    )
    .await
}
