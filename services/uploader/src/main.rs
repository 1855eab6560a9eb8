//! `bidsflux-uploader`: archives completed studies into S3.

use std::process::ExitCode;

use bidsflux_messaging::HealthProbe;
use bidsflux_uploader::{Config, REQUIRES, config, run};

#[tokio::main]
async fn main() -> ExitCode {
    bidsflux_messaging::service_main(
        "uploader",
        HealthProbe { var: config::HTTP_BIND_VAR, default: config::DEFAULT_HTTP_BIND },
        REQUIRES,
        Config::from_env,
        |c| &c.nats_url,
        run,
    )
    .await
}
