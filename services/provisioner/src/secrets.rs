//! `bidsflux-provisioner secrets`: the secrets whose values are random, created in the swarm
//! through the Docker Engine API of a manager ([`Store::Swarm`]), or as files in a directory
//! ([`Store::Dir`]) on a host without swarm.
//!
//! Values come from the operating system's CSPRNG (`getrandom`). An existing secret is never
//! overwritten (swarm secrets are immutable, and a running site uses it): it is kept. `--rotate
//! NAME` creates the next version, `NAME_v2`, `NAME_v3`, ..., and says how to switch the stack to
//! it. The values the operator must keep (GitLab's root password) are shown once, or written to a
//! file of mode 0600 that the operator names; no other value is ever printed or logged.

use std::collections::{BTreeMap, BTreeSet, HashMap};
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
/// Label on every secret the provisioner creates: the SHA-256 of its value (random values of 20
/// or more characters and GitLab tokens: not reversible), to tell which version a mounted copy is
/// and whether a value changed, without reading it.
pub const SHA256_LABEL: &str = "org.bidsflux.sha256";

/// Options of `secrets`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// Secrets to rotate (base names, e.g. `s3_secret`).
    pub rotate: Vec<String>,
    /// Where to write the values the operator must keep, instead of showing them once.
    pub reveal_to: Option<PathBuf>,
    /// Also make placeholders of the stack's secrets that GitLab makes ([`PLACEHOLDER_LABEL`]):
    /// `secrets` alone does, for the first deploy; `up`, which makes the real ones next, does not.
    pub placeholders: bool,
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
        Ok(self.inventory().await?.into_keys().collect())
    }

    /// The secrets kept, with their labels (swarm: the secret's labels; a directory: the file
    /// `.<name>.labels` beside it). Labels hold what identifies a value without showing it: the
    /// GitLab id of a token, the public half of a key, the ids of runners.
    pub async fn inventory(&self) -> anyhow::Result<BTreeMap<String, Labels>> {
        match self {
            Self::Swarm(docker) => {
                let list = docker
                    .list_secrets(None)
                    .await
                    .context("list the swarm's secrets (is this node a swarm manager?)")?;
                Ok(list
                    .into_iter()
                    .filter_map(|s| s.spec)
                    .filter_map(|spec| Some((spec.name?, spec.labels.unwrap_or_default().into_iter().collect())))
                    .collect())
            }
            Self::Dir(dir) => match std::fs::read_dir(dir) {
                Ok(entries) => Ok(entries
                    .filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.starts_with('.'))
                    .map(|n| {
                        let labels = std::fs::read(dir.join(labels_file(&n)))
                            .ok()
                            .and_then(|b| serde_json::from_slice(&b).ok())
                            .unwrap_or_default();
                        (n, labels)
                    })
                    .collect()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
                Err(e) => Err(anyhow::anyhow!("read the secrets directory {}: {e}", dir.display())),
            },
        }
    }

    /// The value of the secret `name`, where this process can read it: a directory store's file,
    /// else `<mounted>/<name>` (a swarm secret mounted into the container the provisioner runs
    /// in). Swarm does not give a secret's value back through its API. The value is as stored
    /// (a key file keeps its final newline).
    pub fn read(&self, name: &str, mounted: Option<&Path>) -> anyhow::Result<Option<String>> {
        let path = match (self, mounted) {
            (Self::Dir(dir), _) => dir.join(name),
            (Self::Swarm(_), Some(m)) => m.join(name),
            (Self::Swarm(_), None) => return Ok(None),
        };
        match std::fs::read_to_string(&path) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow::anyhow!("read the secret {}: {e}", path.display())),
        }
    }

    /// Creates the secret `name` (version of `base`) with `value`; `Ok(false)` when it exists
    /// already (made meanwhile by another run): it is then kept, never overwritten.
    pub async fn create(&self, name: &str, base: &str, value: &str) -> anyhow::Result<bool> {
        self.create_labeled(name, base, value, &Labels::new()).await
    }

    /// [`Store::create`] with `labels` besides [`LABEL`] (never a value).
    pub async fn create_labeled(&self, name: &str, base: &str, value: &str, labels: &Labels) -> anyhow::Result<bool> {
        let mut labels = labels.clone();
        labels.insert(LABEL.to_owned(), base.to_owned());
        // Identifies the value without showing it: a mounted copy is checked against it.
        labels.insert(SHA256_LABEL.to_owned(), crate::site::sha256_hex(value));
        match self {
            Self::Swarm(docker) => {
                let spec = SecretSpec {
                    name: Some(name.to_owned()),
                    labels: Some(labels.into_iter().collect::<HashMap<_, _>>()),
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
            Self::Dir(dir) => create_file(dir, name, value, &labels),
        }
    }

    /// The latest version of `base` kept, if any ([`secrets::versioned`]).
    pub async fn latest(&self, base: &str) -> anyhow::Result<Option<Stored>> {
        Ok(latest_of(&self.inventory().await?, base))
    }
}

/// Labels of a kept secret.
pub type Labels = BTreeMap<String, String>;

/// A kept version of a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Its name (`base` or `base_vN`).
    pub name: String,
    /// N.
    pub version: u32,
    /// Its labels.
    pub labels: Labels,
}

impl Stored {
    /// The name of the next version.
    pub fn next_name(stored: Option<&Self>, base: &str) -> String {
        secrets::versioned(base, stored.map_or(1, |s| s.version + 1))
    }
}

/// The latest version of `base` in `inventory`.
pub fn latest_of(inventory: &BTreeMap<String, Labels>, base: &str) -> Option<Stored> {
    inventory
        .iter()
        .filter_map(|(n, labels)| Some((secrets::version_of(base, n)?, n, labels)))
        .max_by_key(|(v, _, _)| *v)
        .map(|(version, name, labels)| Stored { name: name.clone(), version, labels: labels.clone() })
}

fn labels_file(name: &str) -> String {
    format!(".{name}.labels")
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
fn create_file(dir: &Path, name: &str, value: &str, labels: &Labels) -> anyhow::Result<bool> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("create the secrets directory {}", dir.display()))?;
    let target = dir.join(name);
    if target.exists() {
        return Ok(false);
    }
    // The labels first: a crash before the link leaves labels of no secret, rewritten next time.
    let labels_path = dir.join(labels_file(name));
    std::fs::write(&labels_path, serde_json::to_vec(labels)?)
        .with_context(|| format!("write {}", labels_path.display()))?;
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

/// Creates every missing random secret (and the rotations asked for), recording a line for each;
/// returns the values made, by secret name (for `up`'s next steps, never printed).
pub async fn run(store: &Store, options: &Options, plan: &mut Plan) -> anyhow::Result<BTreeMap<String, String>> {
    for name in &options.rotate {
        if site_secret(name).is_none() {
            anyhow::bail!("{name} is not a secret of the site (known: {})", known());
        }
    }
    let have = store.existing().await?;
    let mut reveal: Vec<(String, String)> = Vec::new();
    let mut made = BTreeMap::new();
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
            made.insert(target.clone(), value.clone());
            if keep {
                reveal.push((target, value));
            }
        } else {
            plan.record(Change::Keep, "secret", &target, Some("created meanwhile by someone else".into()));
        }
    }
    if options.placeholders {
        placeholders(store, &have, plan).await?;
    }
    if !reveal.is_empty() {
        show(&reveal, options.reveal_to.as_deref())?;
    }
    Ok(made)
}

/// Label of a placeholder: a secret the stack mounts whose value GitLab must make first.
pub const PLACEHOLDER_LABEL: &str = "org.bidsflux.placeholder";

/// The value of a placeholder of `secret`: a runner `config.toml` with no runner (gitlab-runner
/// starts, serves its metrics and waits), or a word that GitLab refuses as a token.
pub fn placeholder_value(secret: &SiteSecret) -> &'static str {
    match secret.origin {
        Origin::RunnerConfig => {
            "# Placeholder made by `bidsflux-provisioner secrets`: no runner until `bidsflux-provisioner runners`.\nconcurrent = 1\nlisten_address = \"127.0.0.1:9252\"\n"
        }
        _ => "placeholder-until-bidsflux-provisioner-gitlab",
    }
}

/// The two-stage deploy: the stack mounts secrets that only GitLab can make (`dicom_bot`'s
/// token, the runners' configs) and GitLab runs in the stack. So `secrets` makes a placeholder
/// of each that has no version yet; the stack deploys and GitLab starts; `gitlab` and
/// `runners` then make the real values as the next version (`_v2`) and say which `SECRET_*`
/// variable to set before deploying again.
async fn placeholders(store: &Store, have: &BTreeSet<String>, plan: &mut Plan) -> anyhow::Result<()> {
    for secret in secrets::ALL.iter().filter(|s| s.in_stack && !matches!(s.origin, Origin::Generated { .. })) {
        if have.iter().any(|n| secrets::version_of(secret.name, n).is_some()) {
            continue;
        }
        let by = if secret.origin == Origin::RunnerConfig { "runners" } else { "gitlab" };
        let note = Some(format!("placeholder until `bidsflux-provisioner {by}`"));
        if plan.dry_run {
            plan.record(Change::Create, "secret", secret.name, note);
            continue;
        }
        let labels = Labels::from([(PLACEHOLDER_LABEL.to_owned(), "true".to_owned())]);
        if store.create_labeled(secret.name, secret.name, placeholder_value(secret), &labels).await? {
            plan.record(Change::Create, "secret", secret.name, note);
        }
    }
    Ok(())
}

/// Where the site's secret `name` comes from, if it is one.
pub fn site_secret(name: &str) -> Option<Origin> {
    secrets::get(name).map(|s: &SiteSecret| s.origin)
}

/// The names of the site's secrets.
pub fn known() -> String {
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
