//! Configuration of the indexer.

use std::path::PathBuf;
use std::time::Duration;

use bidsflux_config::{ConfigError, Env};
use bidsflux_session::Template;

/// The group template the original BIDS-flux deployments use.
pub const DEFAULT_GROUP_TEMPLATE: &str = "{ReferringPhysicianName}/{StudyDescriptionPath[1]}";

/// Where session datasets are pushed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForgeConfig {
    /// Bare repositories under a directory (`BIDSFLUX_FORGE=local`): development,
    /// tests and sites without GitLab.
    Local {
        /// Root of the bare repositories (`BIDSFLUX_FORGE_DIR`).
        dir: PathBuf,
    },
}

/// Indexer settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// NATS server(s) (`NATS_URL`).
    pub nats_url: String,
    /// Scratch space for building datasets (`BIDSFLUX_WORK_DIR`, default
    /// `/var/lib/bidsflux/work`); each message gets a fresh directory that is
    /// removed afterwards, so nothing here needs backing up.
    pub work_dir: PathBuf,
    /// The forge that hosts session datasets (`BIDSFLUX_FORGE`, default `local`).
    pub forge: ForgeConfig,
    /// Group of a study's projects (`GITLAB_INDEXER_GROUP_TEMPLATE`, default
    /// `{ReferringPhysicianName}/{StudyDescriptionPath[1]}` like the original);
    /// the session project is `<group>/sourcedata/dicoms/<StudyInstanceUID>`.
    pub group_template: Template,
    /// Author and committer name of dataset commits (`GITLAB_BOT_USERNAME`,
    /// default `dicom_bot`), so history shows the bot like the original did.
    pub bot_username: String,
    /// Author and committer e-mail (`GITLAB_BOT_EMAIL`, default `dicom_bot@localhost`).
    pub bot_email: String,
    /// The git program (`BIDSFLUX_GIT`, default `git`); git-annex is run as
    /// `<git> annex`, so it must be on that git's exec path.
    pub git: PathBuf,
    /// Longest a single git or git-annex command may run before it is killed
    /// and the message retried (`BIDSFLUX_GIT_TIMEOUT`, default 10m): a hung
    /// push must not hold a message for ever.
    pub git_timeout: Duration,
    /// Messages indexed at once by one replica (`BIDSFLUX_INDEXER_CONCURRENCY`,
    /// default 2): indexing is mostly waiting on git processes and the forge.
    pub concurrency: usize,
}

impl Config {
    /// Reads the configuration.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let forge = match env.get_or("BIDSFLUX_FORGE", "local") {
            "local" => ForgeConfig::Local { dir: env.path_or("BIDSFLUX_FORGE_DIR", "/var/lib/bidsflux/forge") },
            other => {
                return Err(ConfigError::invalid(
                    "BIDSFLUX_FORGE",
                    format!("{other:?} is not a supported forge (supported: local)"),
                ));
            }
        };
        let template_text = env.get_or("GITLAB_INDEXER_GROUP_TEMPLATE", DEFAULT_GROUP_TEMPLATE);
        let group_template = Template::parse(template_text)
            .map_err(|e| ConfigError::invalid("GITLAB_INDEXER_GROUP_TEMPLATE", e.to_string()))?;
        let concurrency = env.parse_or("BIDSFLUX_INDEXER_CONCURRENCY", 2usize)?;
        if concurrency == 0 {
            return Err(ConfigError::invalid("BIDSFLUX_INDEXER_CONCURRENCY", "must be at least 1"));
        }
        let git_timeout = env.duration_or("BIDSFLUX_GIT_TIMEOUT", Duration::from_secs(600))?;
        if git_timeout.is_zero() {
            return Err(ConfigError::invalid("BIDSFLUX_GIT_TIMEOUT", "must be greater than zero"));
        }
        let bot_email = env.get_or("GITLAB_BOT_EMAIL", "dicom_bot@localhost").to_owned();
        if bot_email.contains(['<', '>', '\n']) {
            return Err(ConfigError::invalid("GITLAB_BOT_EMAIL", "must not contain '<', '>' or newlines"));
        }
        let bot_username = env.get_or("GITLAB_BOT_USERNAME", "dicom_bot").to_owned();
        if bot_username.contains(['<', '>', '\n']) {
            return Err(ConfigError::invalid("GITLAB_BOT_USERNAME", "must not contain '<', '>' or newlines"));
        }
        Ok(Self {
            nats_url: env.get_or("NATS_URL", "nats://127.0.0.1:4222").to_owned(),
            work_dir: env.path_or("BIDSFLUX_WORK_DIR", "/var/lib/bidsflux/work"),
            forge,
            group_template,
            bot_username,
            bot_email,
            git: env.path_or("BIDSFLUX_GIT", "git"),
            git_timeout,
            concurrency,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = Config::from_env(&Env::default()).unwrap();
        assert_eq!(c.forge, ForgeConfig::Local { dir: "/var/lib/bidsflux/forge".into() });
        assert_eq!(c.work_dir, PathBuf::from("/var/lib/bidsflux/work"));
        assert_eq!(c.group_template.as_str(), DEFAULT_GROUP_TEMPLATE);
        assert_eq!((c.bot_username.as_str(), c.bot_email.as_str()), ("dicom_bot", "dicom_bot@localhost"));
        assert_eq!(c.git, PathBuf::from("git"));
    }

    #[test]
    fn errors_name_the_variable() {
        for (var, value) in [
            ("BIDSFLUX_FORGE", "github"),
            ("GITLAB_INDEXER_GROUP_TEMPLATE", "{Nope}"),
            ("BIDSFLUX_INDEXER_CONCURRENCY", "0"),
            ("BIDSFLUX_INDEXER_CONCURRENCY", "many"),
            ("GITLAB_BOT_EMAIL", "a>b"),
            ("BIDSFLUX_GIT_TIMEOUT", "0"),
        ] {
            let e = Config::from_env(&Env::from_pairs([(var, value)])).unwrap_err().to_string();
            assert!(e.contains(var), "{e}");
        }
    }
}
