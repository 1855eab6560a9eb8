//! The whole pipeline in one process, for `make dev` and the end-to-end tests.
//!
//! [`Pipeline::start`] provisions the bus, then runs the five services
//! in-process through the same functions their binaries call, each with
//! its configuration parsed from one [`Env`] — exactly what the swarm
//! services get from their environment.
//!
//! Listeners: every HTTP or gRPC listener whose variable `env` leaves unset
//! ([`LISTENER_VARS`]) gets a free loopback port instead of the service's
//! fixed default, so that tests never collide with `make dev` (which sets
//! fixed ports itself) or with each other.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context as _;
use bidsflux_config::Env;
use bidsflux_messaging::Bus;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The receiver's `/metrics` + `/healthz` listener.
pub const RECEIVER_HTTP_BIND_VAR: &str = bidsflux_receiver::config::HTTP_BIND_VAR;
/// Study-completion's `/metrics` + `/healthz` listener.
pub const COMPLETION_HTTP_BIND_VAR: &str = bidsflux_study_completion::HTTP_BIND_VAR;
/// Study-completion's admin API (gRPC), what `bidsflux-ctl` talks to.
pub const COMPLETION_GRPC_BIND_VAR: &str = bidsflux_study_completion::GRPC_BIND_VAR;
/// The uploader's `/metrics` + `/healthz` listener.
pub const UPLOADER_HTTP_BIND_VAR: &str = bidsflux_uploader::config::HTTP_BIND_VAR;
/// The indexer's `/metrics` + `/healthz` listener.
pub const INDEXER_HTTP_BIND_VAR: &str = bidsflux_indexer::config::HTTP_BIND_VAR;
/// Listener variables set to `127.0.0.1:0` (a free loopback port) when unset.
pub const LISTENER_VARS: [&str; 5] = [
    RECEIVER_HTTP_BIND_VAR,
    COMPLETION_HTTP_BIND_VAR,
    COMPLETION_GRPC_BIND_VAR,
    UPLOADER_HTTP_BIND_VAR,
    INDEXER_HTTP_BIND_VAR,
];

/// Running services.
#[derive(Debug)]
pub struct Pipeline {
    env: Env,
    nats_url: String,
    stop: CancellationToken,
    /// The study-completion service, separately so tests can restart it.
    completion: Completion,
    others: Vec<(&'static str, JoinHandle<anyhow::Result<()>>)>,
}

/// The running study-completion service and where it listens.
#[derive(Debug)]
struct Completion {
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
    grpc: Option<SocketAddr>,
    http: Option<SocketAddr>,
}

async fn connect(url: &str, service: &str) -> anyhow::Result<Bus> {
    Bus::connect(url, service, Duration::from_secs(30)).await
}

impl Pipeline {
    /// Provisions the bus and starts every service. `dicom` is the receiver's listener.
    ///
    /// Study-completion starts first and binds its listeners before anything else runs, so a port
    /// in use is an error of this call, naming its variable.
    pub async fn start(mut env: Env, dicom: TcpListener) -> anyhow::Result<Self> {
        for var in LISTENER_VARS {
            if env.get(var).is_none() {
                env.set(var, "127.0.0.1:0");
            }
        }
        let nats_url = env.get_or("NATS_URL", "nats://127.0.0.1:4222").to_owned();
        let prov = bidsflux_provisioner::Config::from_env(&env)?;
        bidsflux_provisioner::run(&prov, &connect(&nats_url, "provisioner").await?)
            .await
            .context("provision the bus")?;

        let stop = CancellationToken::new();
        // Stops what already runs if a later service fails to start.
        let started = stop.clone().drop_guard();
        let completion = start_completion(&env, &nats_url, &stop).await?;
        // A restart listens where the first start did (a free port is chosen once).
        for (var, addr) in [(COMPLETION_GRPC_BIND_VAR, completion.grpc), (COMPLETION_HTTP_BIND_VAR, completion.http)] {
            if let Some(addr) = addr {
                env.set(var, addr.to_string());
            }
        }
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

        started.disarm();
        Ok(Self { env, nats_url, stop, completion, others })
    }

    /// Where study-completion's admin API (gRPC) listens, `None` when it is `off`.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.completion.grpc
    }

    /// Where study-completion's `/metrics` and `/healthz` listen, `None` when `off`.
    pub fn completion_http_addr(&self) -> Option<SocketAddr> {
        self.completion.http
    }

    /// Stops and starts the study-completion service (its state is in JetStream). The new one
    /// listens on the same ports, bound once the old one has let go of them.
    pub async fn restart_study_completion(&mut self) -> anyhow::Result<()> {
        self.completion.stop.cancel();
        let old = std::mem::replace(&mut self.completion.task, tokio::spawn(async { Ok(()) }));
        old.await.context("join study-completion")??;
        self.completion = start_completion(&self.env, &self.nats_url, &self.stop).await?;
        Ok(())
    }

    /// Whether a service task has ended (it should not before [`Pipeline::stop`]).
    pub fn finished(&self) -> Vec<&'static str> {
        let mut done: Vec<&'static str> =
            self.others.iter().filter(|(_, h)| h.is_finished()).map(|(n, _)| *n).collect();
        if self.completion.task.is_finished() {
            done.push("study-completion");
        }
        done
    }

    /// Stops every service and waits for them (bounded).
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        let mut all = self.others;
        all.push(("study-completion", self.completion.task));
        for (name, handle) in all {
            match tokio::time::timeout(Duration::from_secs(15), handle).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => {
                    tracing::error!(service = name, error = %format!("{e:#}"), "service ended with an error")
                }
                Ok(Err(e)) => tracing::error!(service = name, error = %format!("{e:#}"), "service task failed"),
                Err(_) => tracing::warn!(service = name, "service did not stop in time"),
            }
        }
        Ok(())
    }
}

/// Reads study-completion's configuration (the rules file included), binds its listeners and
/// starts it.
async fn start_completion(env: &Env, nats_url: &str, stop: &CancellationToken) -> anyhow::Result<Completion> {
    let cfg = bidsflux_study_completion::Config::from_env(env)?;
    let listeners = bidsflux_study_completion::Listeners::bind(&cfg).await?;
    let grpc = listeners.grpc.as_ref().map(TcpListener::local_addr).transpose()?;
    let http = listeners.http.as_ref().map(TcpListener::local_addr).transpose()?;
    let bus = connect(nats_url, "study-completion").await?;
    let token = stop.child_token();
    let task = tokio::spawn(bidsflux_study_completion::serve(cfg, bus, listeners, token.clone()));
    Ok(Completion { stop: token, task, grpc, http })
}

/// The URL a client uses for a listener bound to `addr`: a wildcard address (`0.0.0.0`, `::`)
/// is reached on loopback.
pub fn client_url(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn clients_reach_wildcard_listeners_on_loopback() {
        assert_eq!(client_url("127.0.0.1:50051".parse().unwrap()), "http://127.0.0.1:50051");
        assert_eq!(client_url("0.0.0.0:50051".parse().unwrap()), "http://127.0.0.1:50051");
        assert_eq!(client_url("[::]:7000".parse().unwrap()), "http://[::1]:7000");
        assert_eq!(client_url("10.1.2.3:9".parse().unwrap()), "http://10.1.2.3:9");
    }

    /// stack/completion-rules.toml is mounted into the swarm service as shipped: it must be a
    /// valid rules file that does what the built-in rule does (one rule, named like the built-in
    /// one, every study, indexed after 60 s).
    #[test]
    fn the_stack_rules_file_is_valid_and_behaves_like_the_built_in_rule() {
        use bidsflux_study_completion::rules::{Action, RuleSet};
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../stack/completion-rules.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let shipped = RuleSet::parse(&text).unwrap();
        let builtin = RuleSet::builtin("default", Duration::from_secs(60));
        let [rule] = shipped.rules() else { panic!("one rule in {path}") };
        let [expected] = builtin.rules() else { unreachable!() };
        assert_eq!(rule.name(), expected.name());
        assert_eq!(rule.action(), Action::Index);
        assert_eq!(rule.completion().quiet_period, expected.completion().quiet_period);
        assert!(rule.completion().series_received.is_none() && !rule.completion().expected_counts);
        assert!(rule.completion().force.is_none());
        assert!(shipped.attribute_keywords().is_empty(), "selects every study");
    }
}
