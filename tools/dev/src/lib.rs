//! The whole pipeline in one process, for `make dev` and the end-to-end tests.
//!
//! [`Pipeline::start`] provisions the bus, then runs the five services
//! in-process through the same `run` functions their binaries call, each with
//! its configuration parsed from one [`Env`] — exactly what the swarm
//! services get from their environment.

use std::time::Duration;

use anyhow::Context as _;
use bidsflux_config::Env;
use bidsflux_messaging::Bus;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Running services.
#[derive(Debug)]
pub struct Pipeline {
    env: Env,
    nats_url: String,
    stop: CancellationToken,
    /// The study-completion service, separately so tests can restart it.
    completion: (CancellationToken, JoinHandle<anyhow::Result<()>>),
    others: Vec<(&'static str, JoinHandle<anyhow::Result<()>>)>,
}

async fn connect(url: &str, service: &str) -> anyhow::Result<Bus> {
    Bus::connect(url, service, Duration::from_secs(30)).await
}

impl Pipeline {
    /// Provisions the bus and starts every service. `dicom` is the receiver's listener.
    pub async fn start(env: Env, dicom: TcpListener) -> anyhow::Result<Self> {
        let nats_url = env.get_or("NATS_URL", "nats://127.0.0.1:4222").to_owned();
        let prov = bidsflux_provisioner::Config::from_env(&env)?;
        bidsflux_provisioner::run(&prov, &connect(&nats_url, "provisioner").await?)
            .await
            .context("provision the bus")?;

        let stop = CancellationToken::new();
        let mut others = Vec::new();

        let cfg = bidsflux_receiver::Config::from_env(&env)?;
        let bus = connect(&nats_url, "receiver").await?;
        others.push(("receiver", tokio::spawn(bidsflux_receiver::run(cfg, dicom, bus, stop.child_token()))));

        let cfg = bidsflux_uploader::Config::from_env(&env)?;
        let bus = connect(&nats_url, "uploader").await?;
        others.push(("uploader", tokio::spawn(bidsflux_uploader::run(cfg, bus, stop.child_token()))));

        let cfg = bidsflux_indexer::Config::from_env(&env)?;
        let bus = connect(&nats_url, "indexer").await?;
        others.push(("indexer", tokio::spawn(bidsflux_indexer::run(cfg, bus, stop.child_token()))));

        let completion = start_completion(&env, &nats_url, &stop).await?;
        Ok(Self { env, nats_url, stop, completion, others })
    }

    /// Stops and starts the study-completion service (its state is in JetStream).
    pub async fn restart_study_completion(&mut self) -> anyhow::Result<()> {
        self.completion.0.cancel();
        let (_, handle) =
            std::mem::replace(&mut self.completion, start_completion(&self.env, &self.nats_url, &self.stop).await?);
        handle.await.context("join study-completion")??;
        Ok(())
    }

    /// Whether a service task has ended (it should not before [`Pipeline::stop`]).
    pub fn finished(&self) -> Vec<&'static str> {
        let mut done: Vec<&'static str> =
            self.others.iter().filter(|(_, h)| h.is_finished()).map(|(n, _)| *n).collect();
        if self.completion.1.is_finished() {
            done.push("study-completion");
        }
        done
    }

    /// Stops every service and waits for them (bounded).
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        let mut all = self.others;
        all.push(("study-completion", self.completion.1));
        for (name, handle) in all {
            match tokio::time::timeout(Duration::from_secs(15), handle).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => {
                    tracing::error!(service = name, error = %format!("{e:#}"), "service ended with an error")
                }
                Ok(Err(e)) => tracing::error!(service = name, error = %e, "service task failed"),
                Err(_) => tracing::warn!(service = name, "service did not stop in time"),
            }
        }
        Ok(())
    }
}

async fn start_completion(
    env: &Env,
    nats_url: &str,
    stop: &CancellationToken,
) -> anyhow::Result<(CancellationToken, JoinHandle<anyhow::Result<()>>)> {
    let cfg = bidsflux_study_completion::Config::from_env(env)?;
    let bus = connect(nats_url, "study-completion").await?;
    let token = stop.child_token();
    Ok((token.clone(), tokio::spawn(bidsflux_study_completion::run(cfg, bus, token))))
}
