//! What the `gitlab` and `runners` commands share: their settings, the GitLab calls (through
//! [`bidsflux_gitlab_api::Client`] with [`Rest`] requests) and the secrets store.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use bidsflux_config::{ConfigError, Env, Secret};
use bidsflux_gitlab_api::{Client, Fail};
use gitlab::api::{Pagination, ignore, paged};
use serde_json::Value;

use crate::rest::Rest;
use crate::secrets::{Labels, Store, Stored, latest_of};

/// Settings of the `gitlab` and `runners` commands.
#[derive(Debug, Clone)]
pub struct Settings {
    /// GitLab's base URL (`GITLAB_URL`, else `https://$GITLAB_HOST` or `https://$CI_SERVER_HOST`).
    pub url: String,
    /// The group of the site's pipeline projects (`NI_DATAOPS_GITLAB_ROOT`, `ni-dataops`).
    pub root_group: String,
    /// The domain of the bots' emails (`BOT_EMAIL_DOMAIN`, else the domain of `GITLAB_BOT_EMAIL`).
    pub email_domain: String,
    /// GitLab's SSH endpoint, for its host keys (`BIDSFLUX_GITLAB_SSH_HOST`, default the host of
    /// the URL; `GIT_SSH_PORT`, default 222 as the stack publishes it).
    pub ssh_host: String,
    /// See `ssh_host`.
    pub ssh_port: u16,
    /// Each GitLab request's timeout (`BIDSFLUX_GITLAB_TIMEOUT`, 30 s).
    pub timeout: Duration,
    /// Days a bot token is valid (`BIDSFLUX_BOT_TOKEN_DAYS`, 365, GitLab's maximum).
    pub token_days: u32,
    /// A token closer than this many days to its expiry is rotated (`BIDSFLUX_BOT_TOKEN_RENEW_DAYS`, 30).
    pub renew_days: u32,
    /// Jobs each runner service runs at once (`BIDSFLUX_RUNNER_CONCURRENT`, 4).
    pub runner_concurrent: u32,
}

impl Settings {
    /// Reads the settings.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let url = match (env.get("GITLAB_URL"), env.get("GITLAB_HOST"), env.get("CI_SERVER_HOST")) {
            (Some(u), _, _) if !u.trim().is_empty() => u.trim().trim_end_matches('/').to_owned(),
            (_, Some(h), _) | (_, _, Some(h)) if !h.trim().is_empty() => format!("https://{}", h.trim()),
            _ => {
                return Err(ConfigError::invalid(
                    "GITLAB_URL",
                    "required: GitLab's URL (e.g. https://gitlab.example.org; GITLAB_HOST is also accepted)",
                ));
            }
        };
        let host = url
            .strip_prefix("https://")
            .or_else(|| url.strip_prefix("http://"))
            .ok_or_else(|| ConfigError::invalid("GITLAB_URL", "must start with https:// or http://"))?
            .split(['/', ':'])
            .next()
            .unwrap_or_default()
            .to_owned();
        let root_group = env.get_or("NI_DATAOPS_GITLAB_ROOT", "ni-dataops").trim().to_owned();
        if root_group.is_empty() || !root_group.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(ConfigError::invalid(
                "NI_DATAOPS_GITLAB_ROOT",
                "must be a top-level group path such as ni-dataops",
            ));
        }
        let email_domain = match (env.get("BOT_EMAIL_DOMAIN"), env.get("GITLAB_BOT_EMAIL")) {
            (Some(d), _) if !d.trim().is_empty() => d.trim().to_owned(),
            (_, Some(e)) if e.contains('@') => e.rsplit('@').next().unwrap_or_default().trim().to_owned(),
            _ => {
                return Err(ConfigError::invalid(
                    "BOT_EMAIL_DOMAIN",
                    "required: the domain of the bots' emails (or GITLAB_BOT_EMAIL, whose domain is used)",
                ));
            }
        };
        if email_domain.is_empty() || email_domain.chars().any(|c| c.is_whitespace() || c.is_control() || c == '@') {
            return Err(ConfigError::invalid("BOT_EMAIL_DOMAIN", "must be a domain such as example.org"));
        }
        let ssh_host = env.get("BIDSFLUX_GITLAB_SSH_HOST").map_or(host, |h| h.trim().to_owned());
        Ok(Self {
            url,
            root_group,
            email_domain,
            ssh_host,
            ssh_port: env.parse_or("GIT_SSH_PORT", 222)?,
            timeout: env.duration_or("BIDSFLUX_GITLAB_TIMEOUT", Duration::from_secs(30))?,
            token_days: env.parse_or("BIDSFLUX_BOT_TOKEN_DAYS", 365)?.clamp(2, 365),
            renew_days: env.parse_or("BIDSFLUX_BOT_TOKEN_RENEW_DAYS", 30)?,
            runner_concurrent: env.parse_or("BIDSFLUX_RUNNER_CONCURRENT", 4)?.max(1),
        })
    }
}

/// Reads the administrator's token: `--gitlab-token-file`, else `GITLAB_ADMIN_TOKEN_FILE` (or
/// `GITLAB_ADMIN_TOKEN`).
pub fn admin_token(env: &Env, file: Option<&Path>) -> anyhow::Result<Secret> {
    let token = match file {
        Some(f) => Secret::new(
            std::fs::read_to_string(f)
                .with_context(|| format!("read the GitLab token file {}", f.display()))?
                .trim(),
        ),
        None => env.secret("GITLAB_ADMIN_TOKEN", None)?.ok_or_else(|| {
            anyhow::anyhow!(
                "GitLab needs an administrator's personal access token (scopes api and admin_mode): --gitlab-token-file FILE or GITLAB_ADMIN_TOKEN_FILE"
            )
        })?,
    };
    if token.expose().is_empty() || token.expose().chars().any(|c| c.is_whitespace() || c.is_control()) {
        anyhow::bail!("the GitLab token is empty or has spaces or control characters");
    }
    Ok(token)
}

/// GitLab, the secrets store and the options of a run.
#[derive(Debug)]
pub struct Site<'a> {
    /// GitLab, as the administrator.
    pub api: Client,
    /// Where secrets are kept.
    pub store: &'a Store,
    /// Where swarm secrets are mounted for this process (`--secrets-from`), if anywhere.
    pub mounted: Option<PathBuf>,
    /// Settings.
    pub settings: &'a Settings,
    /// Secrets to rotate.
    pub rotate: &'a [String],
}

/// A GitLab failure as an error naming the object.
pub fn fail(object: &str, f: Fail) -> anyhow::Error {
    anyhow::anyhow!("{object}: {f}")
}

impl Site<'_> {
    /// `GET`: `None` on 404.
    pub async fn get(&self, object: &str, r: Rest) -> anyhow::Result<Option<Value>> {
        match self.api.call(&r.what(), r).await {
            Ok(v) => Ok(Some(v)),
            Err(Fail::NotFound(_)) => Ok(None),
            Err(f) => Err(fail(object, f)),
        }
    }

    /// Every page of a list.
    pub async fn list(&self, object: &str, r: Rest) -> anyhow::Result<Vec<Value>> {
        let what = r.what();
        self.api.call(&what, paged(r, Pagination::All)).await.map_err(|f| fail(object, f))
    }

    /// A write; its answer, or the failure for the caller to sort (a duplicate is looked up
    /// again; anything else becomes an error naming the object with [`fail`]).
    pub async fn write(&self, r: Rest) -> Result<Value, Fail> {
        let what = r.what();
        self.api.call(&what, r).await
    }

    /// A write whose answer is not read (`DELETE`: 204).
    pub async fn write_ignored(&self, object: &str, r: Rest) -> anyhow::Result<()> {
        let what = r.what();
        self.api.call(&what, ignore(r)).await.map_err(|f| fail(object, f))
    }

    /// Whether `base` is to be rotated.
    pub fn rotating(&self, base: &str) -> bool {
        self.rotate.iter().any(|r| r == base)
    }

    /// The secrets kept.
    pub async fn inventory(&self) -> anyhow::Result<BTreeMap<String, Labels>> {
        self.store.inventory().await
    }

    /// The latest version of `base`.
    pub async fn latest(&self, base: &str) -> anyhow::Result<Option<Stored>> {
        Ok(latest_of(&self.inventory().await?, base))
    }

    /// The value of the latest version of `base`, if this process can read it.
    pub fn read_latest(&self, stored: Option<&Stored>, base: &str) -> anyhow::Result<Option<String>> {
        match (self.store, stored) {
            (Store::Dir(_), Some(s)) => self.store.read(&s.name, None),
            (Store::Dir(_), None) => Ok(None),
            // A swarm secret is read where it is mounted, under the name the service gives it.
            (Store::Swarm(_), _) => self.store.read(base, self.mounted.as_deref()),
        }
    }
}

/// A JSON field as text (`""` when absent).
pub fn text<'v>(v: &'v Value, field: &str) -> &'v str {
    v.get(field).and_then(Value::as_str).unwrap_or_default()
}

/// A JSON field as an id.
pub fn id(v: &Value) -> anyhow::Result<u64> {
    v.get("id").and_then(Value::as_u64).ok_or_else(|| anyhow::anyhow!("GitLab's answer has no id: {v}"))
}
