//! `bidsflux-uploader`: archives completed studies into S3.

use std::process::ExitCode;

use bidsflux_uploader::{Config, REQUIRES, run};

#[tokio::main]
async fn main() -> ExitCode {
    bidsflux_messaging::service_main("uploader", REQUIRES, Config::from_env, |c| &c.nats_url, run).await
}
