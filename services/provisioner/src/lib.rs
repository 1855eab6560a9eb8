//! The provisioner: declares the bus topology, idempotently.
//!
//! Runs once at deployment (a swarm service with `restart_policy:
//! on-failure`) and by `make dev` before the other services. Every stream,
//! durable consumer and KV bucket in `bidsflux_messaging::topology` is created
//! or brought up to date; running it again changes nothing. The services
//! check at start that what they need exists and refuse to run otherwise.
//!
//! GitLab users, tokens, groups, CI variables and runners are not
//! provisioned here.

use bidsflux_config::{ConfigError, Env};
use bidsflux_messaging::{Bus, topology};

/// Provisioner settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// NATS server(s) whose JetStream is prepared (`NATS_URL`).
    pub nats_url: String,
}

impl Config {
    /// Reads the configuration.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        Ok(Self { nats_url: env.get_or("NATS_URL", "nats://127.0.0.1:4222").to_owned() })
    }
}

/// Declares the topology and returns.
pub async fn run(_config: &Config, bus: &Bus) -> anyhow::Result<()> {
    topology::declare(&bus.js).await?;
    let streams: Vec<String> = topology::streams().into_iter().map(|s| s.name).collect();
    let consumers: Vec<String> =
        topology::consumers().into_iter().filter_map(|(st, c)| c.durable_name.map(|n| format!("{st}/{n}"))).collect();
    let kvs: Vec<String> = topology::key_values().into_iter().map(|k| k.bucket).collect();
    tracing::info!(streams = ?streams, consumers = ?consumers, key_values = ?kvs, "bus topology declared");
    Ok(())
}
