//! `bidsflux-study-completion`: decides, by the completion rules, when a study is complete.

use std::process::ExitCode;

use bidsflux_messaging::HealthProbe;
use bidsflux_study_completion::{Config, DEFAULT_HTTP_BIND, HTTP_BIND_VAR, REQUIRES, run};

#[tokio::main]
async fn main() -> ExitCode {
    bidsflux_messaging::service_main(
        "study-completion",
        HealthProbe { var: HTTP_BIND_VAR, default: DEFAULT_HTTP_BIND },
        REQUIRES,
        Config::from_env,
        |c| &c.nats_url,
        run,
    )
    .await
}
