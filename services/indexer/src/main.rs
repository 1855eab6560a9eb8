//! `bidsflux-indexer`: indexes archived studies as DataLad datasets in the forge.

use std::process::ExitCode;

use bidsflux_indexer::{Config, REQUIRES, run};

#[tokio::main]
async fn main() -> ExitCode {
    bidsflux_messaging::service_main("indexer", REQUIRES, Config::from_env, |c| &c.nats_url, run).await
}
