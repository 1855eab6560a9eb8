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
use crate::secrets::{Labels, SHA256_LABEL, Store, Stored, latest_of};

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
    /// More volumes of the processing server's runners' job containers
    /// (`BIDSFLUX_RUNNER_PROC_VOLUMES`, comma-separated docker volume specs, e.g. the original's
    /// `/mnt/data/mri:/data`); none by default.
    pub runner_proc_volumes: Vec<String>,
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
        let token_days: u32 = env.parse_or("BIDSFLUX_BOT_TOKEN_DAYS", 365)?;
        let renew_days: u32 = env.parse_or("BIDSFLUX_BOT_TOKEN_RENEW_DAYS", 30)?;
        if !(2..=365).contains(&token_days) {
            return Err(ConfigError::invalid("BIDSFLUX_BOT_TOKEN_DAYS", "must be 2 to 365 (GitLab's maximum)"));
        }
        // Renewing as early as the token's life would rotate it at every run.
        if renew_days + 1 >= token_days {
            return Err(ConfigError::invalid(
                "BIDSFLUX_BOT_TOKEN_RENEW_DAYS",
                "must be less than BIDSFLUX_BOT_TOKEN_DAYS - 1 (else every run rotates the tokens)",
            ));
        }
        Ok(Self {
            url,
            root_group,
            email_domain,
            ssh_host,
            ssh_port: env.parse_or("GIT_SSH_PORT", 222)?,
            timeout: env.duration_or("BIDSFLUX_GITLAB_TIMEOUT", Duration::from_secs(30))?,
            token_days,
            renew_days,
            runner_concurrent: env.parse_or("BIDSFLUX_RUNNER_CONCURRENT", 4)?.max(1),
            runner_proc_volumes: volumes(env.get_or("BIDSFLUX_RUNNER_PROC_VOLUMES", ""))?,
        })
    }
}

/// Docker volume specs (`/host:/container[:ro]` or `/path`), comma-separated.
fn volumes(text: &str) -> Result<Vec<String>, ConfigError> {
    let list: Vec<String> = text.split(',').map(str::trim).filter(|v| !v.is_empty()).map(str::to_owned).collect();
    for v in &list {
        let parts: Vec<&str> = v.split(':').collect();
        let ok = parts.len() <= 3
            && parts.iter().take(2).all(|p| p.starts_with('/') && !p.split('/').any(|c| c == ".."))
            && parts.get(2).is_none_or(|m| matches!(*m, "ro" | "rw"))
            && !v.chars().any(|c| c.is_control() || c.is_whitespace() || c == '"');
        if !ok {
            return Err(ConfigError::invalid(
                "BIDSFLUX_RUNNER_PROC_VOLUMES",
                format!("{v:?} is not a volume such as /mnt/data/mri:/data or /mnt/data/mri:/data:ro"),
            ));
        }
    }
    Ok(list)
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
    /// Values of secrets made earlier in this run (`up`'s `secrets`), by secret name.
    pub made: BTreeMap<String, String>,
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
    ///
    /// A mounted swarm secret is trusted only when it is the latest version: its SHA-256 is the
    /// latest version's label (or, for a secret made before labels, the latest is version 1).
    /// Values made earlier in this run (`up`) are known without reading.
    pub fn read_latest(&self, stored: Option<&Stored>, base: &str) -> anyhow::Result<Option<String>> {
        if let Some(s) = stored
            && let Some(v) = self.made.get(&s.name)
        {
            return Ok(Some(v.clone()));
        }
        match (self.store, stored) {
            (Store::Dir(_), Some(s)) => self.store.read(&s.name, None),
            (_, None) => Ok(None),
            // A swarm secret is read where it is mounted, under the name the service gives it.
            (Store::Swarm(_), Some(s)) => {
                let Some(v) = self.store.read(base, self.mounted.as_deref())? else { return Ok(None) };
                let latest = match s.labels.get(SHA256_LABEL) {
                    Some(sha) => *sha == sha256_hex(&v),
                    None => s.version == 1,
                };
                Ok(latest.then_some(v))
            }
        }
    }
}

/// A JSON field as text (`""` when absent).
pub fn text<'v>(v: &'v Value, field: &str) -> &'v str {
    v.get(field).and_then(Value::as_str).unwrap_or_default()
}

/// A JSON field as an id.
pub fn id(v: &Value) -> anyhow::Result<u64> {
    // Never the answer itself: a token's holds the token.
    v.get("id").and_then(Value::as_u64).ok_or_else(|| {
        let fields: Vec<&str> = v.as_object().map(|o| o.keys().map(String::as_str).collect()).unwrap_or_default();
        anyhow::anyhow!("GitLab's answer has no id (fields: {})", fields.join(", "))
    })
}

/// SHA-256 of a value, in hex: the label that identifies a stored value without showing it.
pub fn sha256_hex(value: &str) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(value.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Env {
        Env::from_pairs(pairs.iter().copied())
    }

    #[test]
    fn settings_follow_the_stack_env() {
        let s = Settings::from_env(&env(&[
            ("GITLAB_HOST", "gitlab.example.org"),
            ("GITLAB_BOT_EMAIL", "dicom_bot@example.org"),
        ]))
        .unwrap();
        assert_eq!(
            (s.url.as_str(), s.ssh_host.as_str(), s.ssh_port),
            ("https://gitlab.example.org", "gitlab.example.org", 222)
        );
        assert_eq!((s.email_domain.as_str(), s.root_group.as_str()), ("example.org", "ni-dataops"));
        assert!(s.runner_proc_volumes.is_empty());
        let base = [("GITLAB_URL", "http://127.0.0.1:8080/"), ("BOT_EMAIL_DOMAIN", "x.org")];
        assert_eq!(Settings::from_env(&env(&base)).unwrap().url, "http://127.0.0.1:8080");
        let with = |extra: (&'static str, &'static str)| {
            let mut pairs = base.to_vec();
            pairs.push(extra);
            Settings::from_env(&env(&pairs))
        };
        assert!(with(("BIDSFLUX_BOT_TOKEN_DAYS", "30")).is_err(), "renewal as long as the token's life");
        assert!(with(("BIDSFLUX_BOT_TOKEN_DAYS", "400")).is_err());
        assert!(with(("NI_DATAOPS_GITLAB_ROOT", "a/../b")).is_err());
        let v = with(("BIDSFLUX_RUNNER_PROC_VOLUMES", "/mnt/data/mri:/data, /ria:/data/ria:ro")).unwrap();
        assert_eq!(v.runner_proc_volumes, ["/mnt/data/mri:/data", "/ria:/data/ria:ro"]);
        for bad in ["data:/data", "/a/../b:/c", "/a:/b:rx", "/a:/b\"]"] {
            assert!(with(("BIDSFLUX_RUNNER_PROC_VOLUMES", bad)).is_err(), "{bad}");
        }
        assert!(Settings::from_env(&env(&[("BOT_EMAIL_DOMAIN", "x.org")])).is_err(), "no GitLab URL");
        assert!(Settings::from_env(&env(&[("GITLAB_URL", "https://g")])).is_err(), "no email domain");
    }
}
