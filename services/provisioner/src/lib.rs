//! The provisioner: prepares what the site needs, idempotently, and says what it changes.
//!
//! `bidsflux-provisioner [COMMAND] [--dry-run]` ([`cli::USAGE`]):
//! - `bus` (the default; the stack runs it as a swarm job, `make dev` before the other
//!   services): every stream, durable consumer, KV bucket and object store of
//!   `bidsflux_messaging::topology`, created when missing, updated when its settings differ,
//!   left alone (no write) when as wanted. The services check at start that what they need
//!   exists and refuse to run otherwise.
//! - `secrets`: the secrets with random values ([`secrets`]), in the swarm of a manager or in a
//!   directory.
//! - `gitlab`: the root group and its projects, the bots, their tokens and SSH keys, GitLab's
//!   host keys and the instance CI/CD variables ([`gitlab`]), with an administrator's token.
//! - `runners`: the instance runners and the runner services' `config.toml` ([`runners`]).
//! - `up`: all four, in the order secrets, gitlab, runners, bus.
//!
//! Every command prints one line per object ([`plan::Plan`]): `create`, `update` or `keep`, never a
//! value; `--dry-run` changes nothing and exits 2 when something would change.

pub mod cli;
pub mod gitlab;
pub mod plan;
pub mod rest;
pub mod runners;
pub mod secrets;
pub mod site;

use bidsflux_config::{ConfigError, Env};
use bidsflux_messaging::{Bus, topology};

use crate::plan::Plan;

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

/// Brings the bus topology to its settings (or, dry, says what that would change).
pub async fn bus(bus: &Bus, plan: &mut Plan) -> anyhow::Result<()> {
    for item in topology::reconcile(&bus.js, plan.dry_run).await? {
        let note = (!item.differs.is_empty()).then(|| format!("differs: {}", item.differs.join(", ")));
        plan.record(item.change, item.kind, &item.name, note);
    }
    tracing::info!(changes = plan.changes(), dry_run = plan.dry_run, "bus topology reconciled");
    Ok(())
}

/// Declares the topology and returns (what `make dev` and the tests run before the services).
pub async fn run(_config: &Config, bus: &Bus) -> anyhow::Result<()> {
    topology::declare(&bus.js).await?;
    Ok(())
}
