//! Configuration of the indexer.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bidsflux_config::{ConfigError, Env, Secret, secrets};
use bidsflux_session::Template;

use crate::templates::Templates;

/// Where each session is a subdataset of the study superdataset, like the original.
pub const DEFAULT_SESSION_NAME_TEMPLATE: &str = "{PatientName}";

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
    /// Projects in GitLab (`BIDSFLUX_FORGE=gitlab`).
    Gitlab(GitlabConfig),
}

/// Visibility of the groups and projects the indexer creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visibility {
    /// Only members see them (the default).
    Private,
    /// Every signed-in user sees them.
    Internal,
    /// Everyone sees them.
    Public,
}

impl Visibility {
    /// GitLab's name of the level.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Private => "private",
            Self::Internal => "internal",
            Self::Public => "public",
        }
    }
}

/// How git reaches GitLab's repositories (the API always uses the token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GitTransport {
    /// HTTPS at `GITLAB_URL`, the token in an `http.extraHeader` (the default).
    Https,
    /// SSH (`BIDSFLUX_GITLAB_GIT_TRANSPORT=ssh`), as the original on `GIT_SSH_PORT`.
    Ssh(SshTransport),
}

/// git over SSH to GitLab: `ssh://<user>@<host>:<port>/<project>.git`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshTransport {
    /// SSH host (`BIDSFLUX_GITLAB_SSH_HOST`, default the host of `GITLAB_URL`).
    pub host: String,
    /// SSH port (`GIT_SSH_PORT`, default 222 as the original deployments).
    pub port: u16,
    /// SSH user (`BIDSFLUX_GITLAB_SSH_USER`, default `git`, GitLab's).
    pub user: String,
    /// The bot's private key (`GITLAB_SSH_KEY`, `GITLAB_SSH_KEY_FILE` or the
    /// secret `/run/secrets/dicom_bot_ssh_key`).
    pub key: Secret,
    /// Where this process writes the key for ssh, readable by it only
    /// (`<BIDSFLUX_WORK_DIR>/.ssh/gitlab_key-<random>`, removed at exit):
    /// docker secrets are mode 0444, which ssh refuses for a private key, and
    /// replicas sharing the work directory each have their own file.
    pub key_file: PathBuf,
    /// GitLab's host keys in known_hosts format (`GITLAB_SSH_KNOWN_HOSTS`,
    /// default `/run/secrets/ssh_known_hosts`); hosts not listed are refused.
    pub known_hosts: PathBuf,
}

/// How the indexer reaches GitLab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitlabConfig {
    /// Base URL without a trailing slash, e.g. `https://gitlab.example.org`
    /// (`GITLAB_URL`, else `https://$CI_SERVER_HOST`).
    pub url: String,
    /// API and git token of the bot (`GITLAB_TOKEN`, `GITLAB_TOKEN_FILE` or
    /// the secret `/run/secrets/dicom_bot_gitlab_token`).
    pub token: Secret,
    /// User made Maintainer of each study group (`GITLAB_BOT_USERNAME`).
    pub bot_username: String,
    /// Visibility of created groups and projects (`BIDSFLUX_GITLAB_VISIBILITY`, default `private`).
    pub visibility: Visibility,
    /// Longest a GitLab API request may take before it counts as GitLab
    /// being unavailable (`BIDSFLUX_GITLAB_TIMEOUT`, default 30s).
    pub request_timeout: Duration,
    /// How git pushes and fetches (`BIDSFLUX_GITLAB_GIT_TRANSPORT`: `https`, the default, or `ssh`).
    pub transport: GitTransport,
}

fn ssh_transport(env: &Env, url: &str, work_dir: &Path) -> Result<SshTransport, ConfigError> {
    let url_host = url.split("://").nth(1).unwrap_or_default().split(['/', ':']).next().unwrap_or_default();
    let host = env.get("BIDSFLUX_GITLAB_SSH_HOST").map_or(url_host, str::trim).to_owned();
    let bracketed = host.starts_with('[') && host.ends_with(']') && host.len() > 2;
    let host_ok = !host.is_empty()
        && !host.starts_with('-')
        && (bracketed || !host.contains(['[', ']', ':']))
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'[' | b']' | b':'));
    if !host_ok {
        return Err(ConfigError::invalid("BIDSFLUX_GITLAB_SSH_HOST", "must be a host name or address"));
    }
    let port = env.parse_or("GIT_SSH_PORT", 222u16)?;
    if port == 0 {
        return Err(ConfigError::invalid("GIT_SSH_PORT", "must be a TCP port"));
    }
    let user = env.get_or("BIDSFLUX_GITLAB_SSH_USER", "git").trim().to_owned();
    if user.is_empty()
        || user.starts_with('-')
        || !user.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(ConfigError::invalid("BIDSFLUX_GITLAB_SSH_USER", "must be a user name such as git"));
    }
    // Unset: the swarm secret, as in the original deployments.
    let key_secret = secrets::path(secrets::DICOM_BOT_SSH_KEY);
    let key = env
        .secret("GITLAB_SSH_KEY", Some(&key_secret))?
        .filter(|k| k.expose().contains("PRIVATE KEY"))
        .ok_or_else(|| {
            ConfigError::invalid(
                "GITLAB_SSH_KEY",
                format!(
                    "required with BIDSFLUX_GITLAB_GIT_TRANSPORT=ssh: a private key in GITLAB_SSH_KEY_FILE or the secret {}",
                    key_secret.display()
                ),
            )
        })?;
    let key = Secret::new(format!("{}\n", key.expose().trim()));
    // Absolute: ssh runs in each job's directory.
    let absolute = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
    let known_hosts = absolute(env.path_or("GITLAB_SSH_KNOWN_HOSTS", secrets::path(secrets::SSH_KNOWN_HOSTS)));
    if !known_hosts.is_file() {
        return Err(ConfigError::invalid(
            "GITLAB_SSH_KNOWN_HOSTS",
            format!("{} is not a file: GitLab's SSH host keys are needed to trust it", known_hosts.display()),
        ));
    }
    let key_file = absolute(work_dir.join(".ssh").join(format!("gitlab_key-{}", uuid::Uuid::new_v4().simple())));
    Ok(SshTransport { host, port, user, key, key_file, known_hosts })
}

/// `GITLAB_URL` (or `https://$CI_SERVER_HOST`), checked and without a trailing slash.
fn gitlab_url(env: &Env) -> Result<String, ConfigError> {
    let (var, url) = match (env.get("GITLAB_URL"), env.get("CI_SERVER_HOST")) {
        (Some(url), _) if !url.trim().is_empty() => ("GITLAB_URL", url.trim().to_owned()),
        (_, Some(host)) if !host.trim().is_empty() => ("CI_SERVER_HOST", format!("https://{}", host.trim())),
        _ => {
            return Err(ConfigError::invalid(
                "GITLAB_URL",
                "required with BIDSFLUX_FORGE=gitlab (e.g. https://gitlab.example.org; CI_SERVER_HOST is also accepted)",
            ));
        }
    };
    let url = url.trim_end_matches('/').to_owned();
    let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"));
    let Some(rest) = rest else {
        return Err(ConfigError::invalid(var, "must start with https:// or http://"));
    };
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() || rest.contains(['@', '?', '#']) || rest.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ConfigError::invalid(
            var,
            "must be a plain base URL such as https://gitlab.example.org (no credentials, query or spaces)",
        ));
    }
    Ok(url)
}

fn gitlab_config(env: &Env, bot_username: &str, work_dir: &Path) -> Result<GitlabConfig, ConfigError> {
    let url = gitlab_url(env)?;
    // Unset: the swarm secret, as in the original deployments.
    let token_secret = secrets::path(secrets::DICOM_BOT_GITLAB_TOKEN);
    let token = env
        .secret("GITLAB_TOKEN", Some(&token_secret))?
        .filter(|t| !t.expose().trim().is_empty())
        .ok_or_else(|| {
            ConfigError::invalid(
                "GITLAB_TOKEN",
                format!(
                    "required with BIDSFLUX_FORGE=gitlab: set GITLAB_TOKEN or GITLAB_TOKEN_FILE, or provide the secret {}",
                    token_secret.display()
                ),
            )
        })?;
    let token = Secret::new(token.expose().trim());
    if token.expose().chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ConfigError::invalid("GITLAB_TOKEN", "must not contain spaces or control characters"));
    }
    let visibility = match env.get_or("BIDSFLUX_GITLAB_VISIBILITY", "private") {
        "private" => Visibility::Private,
        "internal" => Visibility::Internal,
        "public" => Visibility::Public,
        other => {
            return Err(ConfigError::invalid(
                "BIDSFLUX_GITLAB_VISIBILITY",
                format!("{other:?} is not one of private, internal, public"),
            ));
        }
    };
    let request_timeout = env.duration_or("BIDSFLUX_GITLAB_TIMEOUT", Duration::from_secs(30))?;
    if request_timeout.is_zero() {
        return Err(ConfigError::invalid("BIDSFLUX_GITLAB_TIMEOUT", "must be greater than zero"));
    }
    let transport = match env.get_or("BIDSFLUX_GITLAB_GIT_TRANSPORT", "https") {
        "https" => GitTransport::Https,
        "ssh" => GitTransport::Ssh(ssh_transport(env, &url, work_dir)?),
        other => {
            return Err(ConfigError::invalid(
                "BIDSFLUX_GITLAB_GIT_TRANSPORT",
                format!("{other:?} is not one of https, ssh"),
            ));
        }
    };
    Ok(GitlabConfig { url, token, bot_username: bot_username.to_owned(), visibility, request_timeout, transport })
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
    /// The forge that hosts session datasets (`BIDSFLUX_FORGE`: `local`, the
    /// default, or `gitlab`).
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
    /// Path of each session in the study superdataset
    /// (`BIDSFLUX_SESSION_NAME_TEMPLATE`, default `{PatientName}` like the
    /// original, `^` becoming `/`).
    pub session_name_template: Template,
    /// Group holding the site's `ci-pipelines` project, which the study and
    /// BIDS datasets' CI includes (`NI_DATAOPS_GITLAB_ROOT`, default `ni-dataops`).
    pub ni_dataops_root: String,
    /// BIDS branch conversions are merged into (`BIDS_DEV_BRANCH`, default `dev`).
    pub bids_dev_branch: String,
    /// BIDS branch conversions start from (`BIDS_BASE_BRANCH`, default `base`).
    pub bids_base_branch: String,
    /// Files of new session, study and BIDS datasets: built in, or a site's
    /// from `BIDSFLUX_TEMPLATES_DIR` (see [`crate::templates`]).
    pub templates: Templates,
    /// `GET /metrics` and `GET /healthz` ([`HTTP_BIND_VAR`], default [`DEFAULT_HTTP_BIND`];
    /// `off` turns them off). Each replica serves its own.
    pub http_bind: Option<SocketAddr>,
}

/// The variable of [`Config::http_bind`].
pub const HTTP_BIND_VAR: &str = "BIDSFLUX_INDEXER_HTTP_BIND";
/// Default of [`HTTP_BIND_VAR`] (the receiver's is 9464, study-completion's 9465, the uploader's 9466).
pub const DEFAULT_HTTP_BIND: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 9467);

/// Checks a branch name the way `git check-ref-format --branch` would, for the names a site sets.
fn branch(env: &Env, var: &'static str, default: &str) -> Result<String, ConfigError> {
    let name = env.get_or(var, default).trim().to_owned();
    let ok = !name.is_empty()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'))
        && !name.starts_with(['-', '/', '.'])
        && !name.ends_with(['/', '.'])
        && !name.ends_with(".lock")
        && !name.contains("..")
        && !name.contains("//")
        && name != "main"
        && name != "HEAD";
    if ok {
        Ok(name)
    } else {
        Err(ConfigError::invalid(
            var,
            format!("{name:?} is not a usable branch name (letters, digits, '.', '_', '-', '/'; not main)"),
        ))
    }
}

impl Config {
    /// Reads the configuration.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let bot_username = env.get_or("GITLAB_BOT_USERNAME", "dicom_bot").to_owned();
        if bot_username.contains(['<', '>', '\n']) {
            return Err(ConfigError::invalid("GITLAB_BOT_USERNAME", "must not contain '<', '>' or newlines"));
        }
        let work_dir = env.path_or("BIDSFLUX_WORK_DIR", "/var/lib/bidsflux/work");
        let forge = match env.get_or("BIDSFLUX_FORGE", "local") {
            "local" => ForgeConfig::Local { dir: env.path_or("BIDSFLUX_FORGE_DIR", "/var/lib/bidsflux/forge") },
            "gitlab" => ForgeConfig::Gitlab(gitlab_config(env, &bot_username, &work_dir)?),
            other => {
                return Err(ConfigError::invalid(
                    "BIDSFLUX_FORGE",
                    format!("{other:?} is not a supported forge (supported: local, gitlab)"),
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
        let session_name_template =
            Template::parse(env.get_or("BIDSFLUX_SESSION_NAME_TEMPLATE", DEFAULT_SESSION_NAME_TEMPLATE))
                .map_err(|e| ConfigError::invalid("BIDSFLUX_SESSION_NAME_TEMPLATE", e.to_string()))?;
        let ni_dataops_root = env.get_or("NI_DATAOPS_GITLAB_ROOT", "ni-dataops").trim().trim_matches('/').to_owned();
        if crate::forge::ProjectPath::new(ni_dataops_root.as_str()).is_err() || ni_dataops_root.contains(['"', '\\']) {
            return Err(ConfigError::invalid(
                "NI_DATAOPS_GITLAB_ROOT",
                "must be a GitLab group path such as ni-dataops",
            ));
        }
        let bids_dev_branch = branch(env, "BIDS_DEV_BRANCH", "dev")?;
        let bids_base_branch = branch(env, "BIDS_BASE_BRANCH", "base")?;
        let nested = |a: &str, b: &str| b.starts_with(&format!("{a}/"));
        if bids_dev_branch == bids_base_branch
            || nested(&bids_dev_branch, &bids_base_branch)
            || nested(&bids_base_branch, &bids_dev_branch)
        {
            return Err(ConfigError::invalid(
                "BIDS_BASE_BRANCH",
                "must differ from BIDS_DEV_BRANCH, and neither may be a directory of the other (git refuses dev and dev/x)",
            ));
        }
        let templates = match env.get("BIDSFLUX_TEMPLATES_DIR").filter(|d| !d.trim().is_empty()) {
            Some(dir) => {
                Templates::load(Path::new(dir.trim())).map_err(|e| ConfigError::invalid("BIDSFLUX_TEMPLATES_DIR", e))?
            }
            None => Templates::default(),
        };
        let bot_email = env.get_or("GITLAB_BOT_EMAIL", "dicom_bot@localhost").to_owned();
        if bot_email.contains(['<', '>', '\n']) {
            return Err(ConfigError::invalid("GITLAB_BOT_EMAIL", "must not contain '<', '>' or newlines"));
        }
        Ok(Self {
            nats_url: env.get_or("NATS_URL", "nats://127.0.0.1:4222").to_owned(),
            work_dir,
            forge,
            group_template,
            bot_username,
            bot_email,
            git: env.path_or("BIDSFLUX_GIT", "git"),
            git_timeout,
            concurrency,
            session_name_template,
            ni_dataops_root,
            bids_dev_branch,
            bids_base_branch,
            templates,
            http_bind: env.listen_addr_or(HTTP_BIND_VAR, DEFAULT_HTTP_BIND)?,
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
        assert_eq!(c.session_name_template.as_str(), "{PatientName}");
        assert_eq!(
            (c.ni_dataops_root.as_str(), c.bids_dev_branch.as_str(), c.bids_base_branch.as_str()),
            ("ni-dataops", "dev", "base")
        );
        assert_eq!(c.templates, Templates::default());
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
            ("BIDSFLUX_SESSION_NAME_TEMPLATE", "{PatientAge}"),
            ("NI_DATAOPS_GITLAB_ROOT", "../x"),
            ("BIDS_DEV_BRANCH", "main"),
            ("BIDS_DEV_BRANCH", "a..b"),
            ("BIDS_BASE_BRANCH", "dev"),
            ("BIDS_BASE_BRANCH", "dev/base"),
            ("BIDS_DEV_BRANCH", "HEAD"),
            ("BIDS_BASE_BRANCH", "-x"),
            ("BIDSFLUX_TEMPLATES_DIR", "/nonexistent-dir/x"),
        ] {
            let e = Config::from_env(&Env::from_pairs([(var, value)])).unwrap_err().to_string();
            assert!(e.contains(var), "{e}");
        }
    }

    fn gitlab_env() -> Env {
        Env::from_pairs([
            ("BIDSFLUX_FORGE", "gitlab"),
            ("GITLAB_URL", "https://gitlab.example.org/"),
            ("GITLAB_TOKEN", "glpat-secret-value"),
        ])
    }

    fn gitlab(env: &Env) -> GitlabConfig {
        match Config::from_env(env).unwrap().forge {
            ForgeConfig::Gitlab(g) => g,
            other => panic!("not a GitLab forge: {other:?}"),
        }
    }

    #[test]
    fn gitlab_forge() {
        let g = gitlab(&gitlab_env());
        assert_eq!(g.url, "https://gitlab.example.org");
        assert_eq!(g.token.expose(), "glpat-secret-value");
        assert_eq!(g.bot_username, "dicom_bot");
        assert_eq!(g.visibility, Visibility::Private);
        assert_eq!(g.request_timeout, Duration::from_secs(30));
        let shown = format!("{:?}", Config::from_env(&gitlab_env()).unwrap());
        assert!(!shown.contains("glpat-secret-value"), "{shown}");

        let g = gitlab(
            &gitlab_env()
                .with("GITLAB_BOT_USERNAME", "indexer_bot")
                .with("BIDSFLUX_GITLAB_VISIBILITY", "internal")
                .with("BIDSFLUX_GITLAB_TIMEOUT", "5s"),
        );
        assert_eq!((g.bot_username.as_str(), g.visibility), ("indexer_bot", Visibility::Internal));
        assert_eq!(g.request_timeout, Duration::from_secs(5));
    }

    #[test]
    fn git_over_ssh() {
        let dir = tempfile::tempdir().unwrap();
        let (key, hosts) = (dir.path().join("id"), dir.path().join("known_hosts"));
        // A body that no path or hex name can contain, so the redaction check below cannot flake.
        std::fs::write(
            &key,
            "-----BEGIN OPENSSH PRIVATE KEY-----\nPRIVATE_KEY_BODY\n-----END OPENSSH PRIVATE KEY-----\n",
        )
        .unwrap();
        std::fs::write(&hosts, "[gitlab.example.org]:222 ssh-ed25519 AAAA\n").unwrap();
        let env = gitlab_env()
            .with("BIDSFLUX_GITLAB_GIT_TRANSPORT", "ssh")
            .with("GITLAB_SSH_KEY_FILE", key.to_str().unwrap())
            .with("GITLAB_SSH_KNOWN_HOSTS", hosts.to_str().unwrap())
            .with("BIDSFLUX_WORK_DIR", "/w");
        let GitTransport::Ssh(ssh) = gitlab(&env).transport else { panic!("not ssh") };
        assert_eq!((ssh.host.as_str(), ssh.port, ssh.user.as_str()), ("gitlab.example.org", 222, "git"));
        assert!(ssh.key_file.starts_with("/w/.ssh") && ssh.key_file.to_string_lossy().contains("gitlab_key-"));
        let GitTransport::Ssh(other) = gitlab(&env).transport else { panic!("not ssh") };
        assert_ne!(other.key_file, ssh.key_file, "each process has its own key file");
        assert!(!format!("{ssh:?}").contains("PRIVATE_KEY_BODY"));
        let ssh_env = env.clone().with("GIT_SSH_PORT", "2222").with("BIDSFLUX_GITLAB_SSH_HOST", "10.0.0.5");
        let GitTransport::Ssh(ssh) = gitlab(&ssh_env).transport else { panic!("not ssh") };
        assert_eq!((ssh.host.as_str(), ssh.port), ("10.0.0.5", 2222));
        assert_eq!(gitlab(&gitlab_env()).transport, GitTransport::Https);
        for (var, value) in [
            ("BIDSFLUX_GITLAB_GIT_TRANSPORT", "ftp"),
            ("GIT_SSH_PORT", "0"),
            ("BIDSFLUX_GITLAB_SSH_USER", "-oProxyCommand=x"),
            ("BIDSFLUX_GITLAB_SSH_HOST", "-oProxyCommand=x"),
            ("GITLAB_SSH_KNOWN_HOSTS", "/nonexistent"),
            ("GITLAB_SSH_KEY_FILE", hosts.to_str().unwrap()),
        ] {
            let e = Config::from_env(&env.clone().with(var, value)).unwrap_err().to_string();
            assert!(e.contains(var) || (var == "GITLAB_SSH_KEY_FILE" && e.contains("GITLAB_SSH_KEY")), "{var}: {e}");
        }
    }

    #[test]
    fn gitlab_url_falls_back_to_ci_server_host() {
        let env = Env::from_pairs([
            ("BIDSFLUX_FORGE", "gitlab"),
            ("CI_SERVER_HOST", "gitlab.site.org"),
            ("GITLAB_TOKEN", "t"),
        ]);
        assert_eq!(gitlab(&env).url, "https://gitlab.site.org");
        assert_eq!(gitlab(&env.with("GITLAB_URL", "http://127.0.0.1:8080")).url, "http://127.0.0.1:8080");
    }

    #[test]
    fn gitlab_token_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "glpat-from-file\n").unwrap();
        let env = Env::from_pairs([("BIDSFLUX_FORGE", "gitlab"), ("GITLAB_URL", "https://gitlab.example.org")])
            .with("GITLAB_TOKEN_FILE", file.to_str().unwrap());
        assert_eq!(gitlab(&env).token.expose(), "glpat-from-file");
    }

    #[test]
    fn gitlab_errors_name_the_variable() {
        let no_token = Env::from_pairs([("BIDSFLUX_FORGE", "gitlab"), ("GITLAB_URL", "https://gitlab.example.org")]);
        let e = Config::from_env(&no_token).unwrap_err().to_string();
        assert!(e.contains("GITLAB_TOKEN") && e.contains(bidsflux_config::secrets::DICOM_BOT_GITLAB_TOKEN), "{e}");
        let e = Config::from_env(&no_token.with("GITLAB_TOKEN", "  ")).unwrap_err().to_string();
        assert!(e.contains("GITLAB_TOKEN"), "{e}");
        let no_url = Env::from_pairs([("BIDSFLUX_FORGE", "gitlab"), ("GITLAB_TOKEN", "t")]);
        let e = Config::from_env(&no_url).unwrap_err().to_string();
        assert!(e.contains("GITLAB_URL") && e.contains("CI_SERVER_HOST"), "{e}");
        for (var, value) in [
            ("GITLAB_URL", "gitlab.example.org"),
            ("GITLAB_URL", "https://bot:pw@gitlab.example.org"),
            ("GITLAB_URL", "https://"),
            ("BIDSFLUX_GITLAB_VISIBILITY", "secret"),
            ("BIDSFLUX_GITLAB_TIMEOUT", "0"),
        ] {
            let e = Config::from_env(&gitlab_env().with(var, value)).unwrap_err().to_string();
            assert!(e.contains(var), "{var}={value}: {e}");
            assert!(!e.contains("glpat-secret-value"), "{e}");
        }
    }
}
