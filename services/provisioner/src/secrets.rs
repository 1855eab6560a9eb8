//! `bidsflux-provisioner secrets`: the secrets whose values are random, created in the swarm
//! through the Docker Engine API of a manager ([`Store::Swarm`]), or as files in a directory
//! ([`Store::Dir`]) on a host without swarm.
//!
//! Values come from the operating system's CSPRNG (`getrandom`). An existing secret is never
//! overwritten (swarm secrets are immutable, and a running site uses it): it is kept. `--rotate
//! NAME` creates the next version, `NAME_v2`, `NAME_v3`, ..., and says how to switch the stack to
//! it. The values the operator must keep (GitLab's root password) are shown once, or written to a
//! file of mode 0600 that the operator names; no other value is ever printed or logged.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use base64::Engine as _;
use bidsflux_config::secrets::{self, ALPHABET, Origin, SiteSecret};
use bollard::Docker;
use bollard::models::SecretSpec;

use crate::plan::{Change, Plan};

/// Label on every secret the provisioner creates (its value: the secret's base name).
pub const LABEL: &str = "org.bidsflux.secret";

/// Options of `secrets`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// Secrets to rotate (base names, e.g. `s3_secret`).
    pub rotate: Vec<String>,
    /// Where to write the values the operator must keep, instead of showing them once.
    pub reveal_to: Option<PathBuf>,
}

/// A random value of `len` characters of [`ALPHABET`], from the OS's CSPRNG.
pub fn random_value(len: usize) -> anyhow::Result<String> {
    // Rejection sampling: bytes ≥ the largest multiple of the alphabet's size would bias it.
    let n = ALPHABET.len();
    let limit = 256 - 256 % n;
    let mut out = String::with_capacity(len);
    let mut buf = [0_u8; 64];
    while out.len() < len {
        getrandom::fill(&mut buf).map_err(|e| anyhow::anyhow!("the OS's random source failed: {e}"))?;
        for &b in &buf {
            if (b as usize) < limit && out.len() < len {
                out.push(char::from(ALPHABET[b as usize % n]));
            }
        }
    }
    Ok(out)
}

/// Where secrets are kept: the swarm (a site), or a directory of files (a host without swarm,
/// `make dev`, a test), each file mode 0600 and read by the services through `<VAR>_FILE`.
#[derive(Debug, Clone)]
pub enum Store {
    /// The swarm of this manager's Engine API.
    Swarm(Docker),
    /// Files `<dir>/<name>`.
    Dir(PathBuf),
}

impl Store {
    /// The swarm of the Engine API at `host` (`unix:///var/run/docker.sock`, a socket path, or
    /// `tcp://...`), at the API version both sides speak (Debian's docker.io 20.10: 1.41).
    pub async fn swarm(host: &str) -> anyhow::Result<Self> {
        let docker = if let Some(addr) = host.strip_prefix("tcp://").or_else(|| host.strip_prefix("http://")) {
            Docker::connect_with_http(addr, 60, bollard::API_DEFAULT_VERSION)
        } else {
            Docker::connect_with_unix(host.trim_start_matches("unix://"), 60, bollard::API_DEFAULT_VERSION)
        }
        .with_context(|| format!("connect to the Docker Engine at {host}"))?;
        let docker =
            docker.negotiate_version().await.with_context(|| format!("the Docker Engine at {host} does not answer"))?;
        Ok(Self::Swarm(docker))
    }

    /// The names of the secrets kept.
    pub async fn existing(&self) -> anyhow::Result<BTreeSet<String>> {
        match self {
            Self::Swarm(docker) => {
                let list = docker
                    .list_secrets(None)
                    .await
                    .context("list the swarm's secrets (is this node a swarm manager?)")?;
                Ok(list.into_iter().filter_map(|s| s.spec.and_then(|spec| spec.name)).collect())
            }
            Self::Dir(dir) => match std::fs::read_dir(dir) {
                Ok(entries) => Ok(entries
                    .filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.starts_with('.'))
                    .collect()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeSet::new()),
                Err(e) => Err(anyhow::anyhow!("read the secrets directory {}: {e}", dir.display())),
            },
        }
    }

    /// Creates the secret `name` (version of `base`) with `value`; `Ok(false)` when it exists
    /// already (made meanwhile by another run): it is then kept, never overwritten.
    pub async fn create(&self, name: &str, base: &str, value: &str) -> anyhow::Result<bool> {
        match self {
            Self::Swarm(docker) => {
                let spec = SecretSpec {
                    name: Some(name.to_owned()),
                    labels: Some(HashMap::from([(LABEL.to_owned(), base.to_owned())])),
                    data: Some(base64::engine::general_purpose::STANDARD.encode(value)),
                    ..Default::default()
                };
                match docker.create_secret(spec).await {
                    Ok(_) => Ok(true),
                    Err(bollard::errors::Error::DockerResponseServerError { status_code: 409, .. }) => Ok(false),
                    // The Engine's message names the secret, never its value.
                    Err(e) => Err(anyhow::anyhow!("create the secret {name}: {e}")),
                }
            }
            Self::Dir(dir) => create_file(dir, name, value),
        }
    }
}

impl Store {
    /// What the operator does to switch to the rotated `next` version of `base`.
    pub fn rotation_hint(&self, base: &str, next: &str) -> String {
        match self {
            Self::Swarm(_) => {
                format!(
                    "rotation of {base}: set {}={next} in stack/.env and run docker stack deploy",
                    stack_variable(base)
                )
            }
            Self::Dir(dir) => {
                format!("rotation of {base}: point the services at {} and restart them", dir.join(next).display())
            }
        }
    }
}

/// Writes `<dir>/<name>` whole or not at all (a temporary file, synced, then linked into place:
/// the link fails if the name exists, so nothing is overwritten), mode 0600, in a 0700 directory.
fn create_file(dir: &Path, name: &str, value: &str) -> anyhow::Result<bool> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("create the secrets directory {}", dir.display()))?;
    let target = dir.join(name);
    let tmp = dir.join(format!(".{name}.{}", std::process::id()));
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(value.as_bytes())?;
        f.sync_all()
    })();
    let linked = written.and_then(|()| std::fs::hard_link(&tmp, &target));
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("sync {}", dir.display()))?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(anyhow::anyhow!("write the secret {}: {e}", target.display())),
    }
}

/// The variable of `stack/.env` that names the swarm secret the stack mounts as `name`.
pub fn stack_variable(name: &str) -> String {
    format!("SECRET_{}", name.to_ascii_uppercase())
}

/// Creates every missing random secret (and the rotations asked for), recording a line for each.
pub async fn run(store: &Store, options: &Options, plan: &mut Plan) -> anyhow::Result<()> {
    for name in &options.rotate {
        match secrets::get(name) {
            Some(SiteSecret { origin: Origin::Generated { .. }, .. }) => {}
            Some(_) => anyhow::bail!(
                "{name} is not a random secret: GitLab tokens, SSH keys and runner configs are rotated by `bidsflux-provisioner gitlab` and `runners`"
            ),
            None => anyhow::bail!("{name} is not a secret of the site (known: {})", known()),
        }
    }
    let have = store.existing().await?;
    let mut reveal: Vec<(String, String)> = Vec::new();
    for secret in secrets::ALL {
        let Origin::Generated { len, reveal: keep } = secret.origin else { continue };
        let versions: Vec<u32> = have.iter().filter_map(|n| secrets::version_of(secret.name, n)).collect();
        let latest = versions.iter().copied().max();
        let rotate = options.rotate.iter().any(|r| r == secret.name);
        let (target, note) = match (latest, rotate) {
            (None, _) => (secret.name.to_owned(), format!("random, {len} characters")),
            (Some(v), false) => {
                let name = secrets::versioned(secret.name, v);
                plan.record(Change::Keep, "secret", &name, None);
                continue;
            }
            (Some(v), true) => {
                let next = secrets::versioned(secret.name, v + 1);
                let note = store.rotation_hint(secret.name, &next);
                (next, note)
            }
        };
        if plan.dry_run {
            plan.record(Change::Create, "secret", &target, Some(note));
            continue;
        }
        let value = random_value(len)?;
        if store.create(&target, secret.name, &value).await? {
            plan.record(Change::Create, "secret", &target, Some(note));
            if keep {
                reveal.push((target, value));
            }
        } else {
            plan.record(Change::Keep, "secret", &target, Some("created meanwhile by someone else".into()));
        }
    }
    if !reveal.is_empty() {
        show(&reveal, options.reveal_to.as_deref())?;
    }
    Ok(())
}

fn known() -> String {
    secrets::ALL.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
}

/// Gives the operator the values to keep: appended to `file` (created with mode 0600), or shown
/// once on standard error (the plan stays on standard output).
fn show(values: &[(String, String)], file: Option<&Path>) -> anyhow::Result<()> {
    if let Some(path) = file {
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("open {} for the values to keep", path.display()))?;
        for (name, value) in values {
            writeln!(f, "{name}={value}").with_context(|| format!("write {}", path.display()))?;
        }
        f.sync_all().with_context(|| format!("write {}", path.display()))?;
        return Ok(());
    }
    let mut err = std::io::stderr().lock();
    for (name, value) in values {
        writeln!(err, "\n{name} (shown once, keep it now): {value}\n")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_values_use_the_alphabet_and_differ() {
        let a = random_value(40).unwrap();
        let b = random_value(40).unwrap();
        assert_eq!(a.len(), 40);
        assert_ne!(a, b);
        assert!(a.bytes().all(|c| ALPHABET.contains(&c)), "{a}");
        // GitLab can mask it (`\A[a-zA-Z0-9_+=/@:.~-]{8,}\z`).
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric()));
    }

    #[test]
    fn stack_variables_name_the_secret() {
        assert_eq!(stack_variable("s3_secret"), "SECRET_S3_SECRET");
    }
}
