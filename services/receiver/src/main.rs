//! `bidsflux-receiver`: the DICOM C-STORE endpoint.

use std::process::ExitCode;

use bidsflux_messaging::HealthProbe;
use bidsflux_receiver::config::{DEFAULT_HTTP_BIND, DICOM_BIND_VAR, HTTP_BIND_VAR};
use bidsflux_receiver::{Config, REQUIRES, run};
use bidsflux_service::listen;

#[tokio::main]
async fn main() -> ExitCode {
    if std::env::args().skip(1).any(|a| a == "--list-sop-classes") {
        // The conformance lists (docs/conformance.md), without starting anything.
        print!("{}", bidsflux_receiver::conformance::listing());
        return ExitCode::SUCCESS;
    }
    bidsflux_messaging::service_main(
        "receiver",
        HealthProbe { var: HTTP_BIND_VAR, default: DEFAULT_HTTP_BIND },
        REQUIRES,
        Config::from_env,
        |c| &c.nats_url,
        |config, bus, shutdown| async move {
            let dicom = listen::bind(config.dicom_bind, DICOM_BIND_VAR).await?;
            run(config, dicom, bus, shutdown).await
        },
    )
    .await
}
