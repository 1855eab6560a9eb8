//! `bidsflux-study-completion`: decides, by the completion rules, when a study is complete.

use std::process::ExitCode;

use bidsflux_study_completion::{Config, REQUIRES, run};

#[tokio::main]
async fn main() -> ExitCode {
    bidsflux_messaging::service_main("study-completion", REQUIRES, Config::from_env, |c| &c.nats_url, run).await
}
