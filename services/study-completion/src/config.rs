//! Configuration of the study-completion service.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bidsflux_config::{ConfigError, Env};

use crate::rules::{RuleSet, validate_rule_name};

/// The rules file variable.
pub const RULES_VAR: &str = "BIDSFLUX_COMPLETION_RULES";
/// The variable of the `/metrics` + `/healthz` listener.
pub const HTTP_BIND_VAR: &str = "BIDSFLUX_COMPLETION_HTTP_BIND";
/// The variable of the gRPC admin API listener.
pub const GRPC_BIND_VAR: &str = "BIDSFLUX_COMPLETION_GRPC_BIND";
/// Default of [`HTTP_BIND_VAR`] (the receiver's is 9464).
pub const DEFAULT_HTTP_BIND: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 9465);
/// Default of [`GRPC_BIND_VAR`]: loopback only, the admin API has no authentication.
pub const DEFAULT_GRPC_BIND: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 50051);

/// Study-completion settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// NATS server(s) (`NATS_URL`).
    pub nats_url: String,
    /// Quiet period of the built-in rule used without a rules file (`BIDSFLUX_QUIET_PERIOD`, default
    /// 60 s like the original `--eostudy-timeout 60`). Ignored when a rules file is given.
    pub quiet_period: Duration,
    /// The completion rules: from the file named by `BIDSFLUX_COMPLETION_RULES`, validated at start,
    /// or one rule (`BIDSFLUX_COMPLETION_RULE`, default `default`) that indexes every study after
    /// the quiet period. Shared: every handler reads it.
    pub rules: Arc<RuleSet>,
    /// Where the rules came from (`None`: built in), for the start-up log.
    pub rules_path: Option<PathBuf>,
    /// `GET /metrics` and `GET /healthz` (`BIDSFLUX_COMPLETION_HTTP_BIND`, default `0.0.0.0:9465`,
    /// `off` disables it).
    pub http_bind: Option<SocketAddr>,
    /// The gRPC admin API and gRPC health (`BIDSFLUX_COMPLETION_GRPC_BIND`, default
    /// `127.0.0.1:50051`, `off` disables it). It has no authentication of its own: keep it on
    /// loopback or a private network.
    pub grpc_bind: Option<SocketAddr>,
}

impl Config {
    /// Reads the configuration; an invalid rules file is an error naming the variable, the file and
    /// every problem in it.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let quiet_period = env.duration_or("BIDSFLUX_QUIET_PERIOD", Duration::from_secs(60))?;
        if quiet_period.is_zero() {
            return Err(ConfigError::invalid("BIDSFLUX_QUIET_PERIOD", "must be greater than zero"));
        }
        let rule_name = env.get("BIDSFLUX_COMPLETION_RULE");
        let (rules, rules_path) = match env.get(RULES_VAR) {
            Some(path) => {
                if rule_name.is_some() {
                    return Err(ConfigError::invalid(
                        "BIDSFLUX_COMPLETION_RULE",
                        format!("names the built-in rule only; with {RULES_VAR} the rules file names its rules"),
                    ));
                }
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError::invalid(RULES_VAR, format!("cannot read {path}: {e}")))?;
                let rules = RuleSet::parse(&text)
                    .map_err(|e| ConfigError::invalid(RULES_VAR, format!("{path} is not a valid rules file:\n{e}")))?;
                (rules, Some(PathBuf::from(path)))
            }
            None => {
                let name = rule_name.unwrap_or("default");
                validate_rule_name(name).map_err(|e| ConfigError::invalid("BIDSFLUX_COMPLETION_RULE", e))?;
                (RuleSet::builtin(name, quiet_period), None)
            }
        };
        Ok(Self {
            nats_url: env.get_or("NATS_URL", "nats://127.0.0.1:4222").to_owned(),
            quiet_period,
            rules: Arc::new(rules),
            rules_path,
            http_bind: env.listen_addr_or(HTTP_BIND_VAR, DEFAULT_HTTP_BIND)?,
            grpc_bind: env.listen_addr_or(GRPC_BIND_VAR, DEFAULT_GRPC_BIND)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rules_file_replaces_the_built_in_rule_and_an_invalid_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("rules.toml");
        std::fs::write(&good, "[[rule]]\nname = \"mr\"\nselect = 'Modality == \"MR\"'\naction = \"index\"\n").unwrap();
        let c = Config::from_env(&Env::from_pairs([(RULES_VAR, good.to_str().unwrap())])).unwrap();
        assert_eq!(c.rules.rules().iter().map(|r| r.name()).collect::<Vec<_>>(), ["mr"]);
        assert_eq!(c.rules_path.as_deref(), Some(good.as_path()));

        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "[[rule]]\nname = \"mr\"\naction = \"indx\"\n").unwrap();
        let e = Config::from_env(&Env::from_pairs([(RULES_VAR, bad.to_str().unwrap())])).unwrap_err().to_string();
        assert!(e.contains(RULES_VAR) && e.contains("rule \"mr\": field \"action\""), "{e}");
        let e = Config::from_env(&Env::from_pairs([(RULES_VAR, "/nonexistent/rules.toml")])).unwrap_err().to_string();
        assert!(e.contains(RULES_VAR) && e.contains("cannot read"), "{e}");
        let e = Config::from_env(&Env::from_pairs([
            (RULES_VAR, good.to_str().unwrap()),
            ("BIDSFLUX_COMPLETION_RULE", "x"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(e.contains("BIDSFLUX_COMPLETION_RULE"), "{e}");
    }

    #[test]
    fn without_a_file_one_rule_indexes_after_the_quiet_period() {
        let c = Config::from_env(&Env::from_pairs([("BIDSFLUX_QUIET_PERIOD", "2s")])).unwrap();
        let [rule] = c.rules.rules() else { panic!("one rule") };
        assert_eq!((rule.name(), rule.completion().quiet_period), ("default", Some(Duration::from_secs(2))));
        let c = Config::from_env(&Env::from_pairs([("BIDSFLUX_COMPLETION_RULE", "site")])).unwrap();
        assert_eq!(c.rules.rules()[0].name(), "site");
        assert!(Config::from_env(&Env::from_pairs([("BIDSFLUX_COMPLETION_RULE", "a b")])).is_err());
        assert_eq!((c.http_bind, c.grpc_bind), (Some(DEFAULT_HTTP_BIND), Some(DEFAULT_GRPC_BIND)));
    }

    #[test]
    fn listeners_can_be_moved_or_turned_off() {
        let c = Config::from_env(&Env::from_pairs([(HTTP_BIND_VAR, "off"), (GRPC_BIND_VAR, "OFF")])).unwrap();
        assert_eq!((c.http_bind, c.grpc_bind), (None, None));
        let e = Config::from_env(&Env::from_pairs([(GRPC_BIND_VAR, "localhost")])).unwrap_err().to_string();
        assert!(e.contains(GRPC_BIND_VAR), "{e}");
        let c = Config::from_env(&Env::from_pairs([(HTTP_BIND_VAR, "127.0.0.1:6000")])).unwrap();
        assert_eq!(c.http_bind, Some("127.0.0.1:6000".parse().unwrap()));
        let e = Config::from_env(&Env::from_pairs([(HTTP_BIND_VAR, "nowhere")])).unwrap_err().to_string();
        assert!(e.contains(HTTP_BIND_VAR), "{e}");
    }
}
