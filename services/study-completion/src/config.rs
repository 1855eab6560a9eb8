//! Configuration of the study-completion service.

use std::time::Duration;

use bidsflux_config::{ConfigError, Env};

/// Study-completion settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// NATS server(s) (`NATS_URL`).
    pub nats_url: String,
    /// A study is complete when no instance arrived for this long
    /// (`BIDSFLUX_QUIET_PERIOD`, default 60 s like the original `--eostudy-timeout 60`).
    pub quiet_period: Duration,
    /// Name of the rule recorded in the completion reason (`BIDSFLUX_COMPLETION_RULE`, default `default`);
    /// rules files come with the study-completion issue.
    pub rule_name: String,
}

impl Config {
    /// Reads the configuration.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let quiet_period = env.duration_or("BIDSFLUX_QUIET_PERIOD", Duration::from_secs(60))?;
        if quiet_period.is_zero() {
            return Err(ConfigError::invalid("BIDSFLUX_QUIET_PERIOD", "must be greater than zero"));
        }
        Ok(Self {
            nats_url: env.get_or("NATS_URL", "nats://127.0.0.1:4222").to_owned(),
            quiet_period,
            rule_name: env.get_or("BIDSFLUX_COMPLETION_RULE", "default").to_owned(),
        })
    }
}
