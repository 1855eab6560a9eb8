//! A whole site as separate processes, the way the swarm stack runs it: a real `nats-server`,
//! the embedded S3 server, the local forge, and each bidsflux service as its own binary (the
//! provisioner as a job, the indexer as N replicas), so a test can kill one with SIGKILL and
//! start it again while the others go on.
//!
//! The binaries are the ones cargo built next to the running test (`target/<profile>/`):
//! `cargo test --workspace` (what `make test` runs) builds them. A missing binary is an error
//! that says so, never a skipped test. Each process logs to `<site>/logs/<service>-<n>.log`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use tokio::process::{Child, Command};

use crate::{NatsServer, S3Server, free_port, wait_until};

/// A bidsflux service binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Service {
    /// The DICOM C-STORE endpoint.
    Receiver,
    /// Decides when a study is complete.
    StudyCompletion,
    /// Archives completed studies into S3.
    Uploader,
    /// Builds the DataLad datasets (several replicas).
    Indexer,
}

impl Service {
    /// Every long-running service.
    pub const ALL: [Self; 4] = [Self::Receiver, Self::StudyCompletion, Self::Uploader, Self::Indexer];

    /// The binary's name.
    pub fn binary(self) -> &'static str {
        match self {
            Self::Receiver => "bidsflux-receiver",
            Self::StudyCompletion => "bidsflux-study-completion",
            Self::Uploader => "bidsflux-uploader",
            Self::Indexer => "bidsflux-indexer",
        }
    }
}

/// A tmpfs mounted for a test (the test runs as root, as CI does here), unmounted on drop.
#[derive(Debug)]
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, bytes: u64) -> anyhow::Result<Self> {
        std::fs::create_dir_all(at)?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(at)
            .output()
            .context("run mount")?;
        anyhow::ensure!(
            out.status.success(),
            "mount a {bytes}-byte tmpfs at {} (the fault tests run as root): {}",
            at.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(Self(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a process that still has a file open there cannot keep the mount busy.
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// How [`Site::start_with`] lays the site out beyond the environment.
#[derive(Debug, Clone, Default)]
pub struct SiteOptions {
    /// Put the spool on a file system of its own this many bytes large (a tmpfs), so a test
    /// can fill it.
    pub spool_fs_bytes: Option<u64>,
}

/// The site. Dropping it kills every process, then removes its files.
#[derive(Debug)]
pub struct Site {
    /// The spool's own file system, if asked for: dropped (unmounted) before `dir`.
    spool_fs: Option<Tmpfs>,
    /// Everything the site writes: spool, work directories, forge, logs.
    pub dir: tempfile::TempDir,
    /// The bus.
    pub nats: NatsServer,
    /// The object store.
    pub s3: S3Server,
    /// The receiver's DICOM port on 127.0.0.1.
    pub dicom_port: u16,
    /// The environment every service gets.
    env: Vec<(String, String)>,
    /// Where the binaries are.
    bins: PathBuf,
    /// Running processes by service and replica.
    running: HashMap<(Service, usize), Child>,
    /// Starts so far per service and replica (names the log files).
    starts: HashMap<(Service, usize), usize>,
}

/// The directory of the binaries cargo built for the running test.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("find the test executable")?;
    // target/<profile>/deps/<test> → target/<profile>
    exe.parent().and_then(Path::parent).map(Path::to_path_buf).context("the test executable has no grandparent")
}

impl Site {
    /// Starts the servers, runs the provisioner, then one receiver, study-completion and
    /// uploader and `indexers` indexer replicas, with `settings` on top of the defaults
    /// (local forge, an allow-list for DCMTK's `storescu` from loopback, the original's
    /// templates).
    pub async fn start(settings: &[(&str, &str)], indexers: usize) -> anyhow::Result<Self> {
        Self::start_with(settings, indexers, &SiteOptions::default()).await
    }

    /// [`Site::start`] with `options`.
    pub async fn start_with(settings: &[(&str, &str)], indexers: usize, options: &SiteOptions) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let spool_fs = options.spool_fs_bytes.map(|n| Tmpfs::mount(&dir.path().join("spool"), n)).transpose()?;
        let bins = bin_dir()?;
        for s in Service::ALL {
            let b = bins.join(s.binary());
            anyhow::ensure!(b.is_file(), "{} is not built: run the tests with `cargo test --workspace`", b.display());
        }
        std::fs::create_dir_all(dir.path().join("logs"))?;
        let nats = NatsServer::start().await.context("start nats-server")?;
        let s3 = S3Server::start().await.context("start the S3 server")?;
        let dicom_port = free_port()?;
        let host = format!("127.0.0.1:{}", s3.addr.port());
        let p = |name: &str| dir.path().join(name).display().to_string();
        let mut env: Vec<(String, String)> = [
            ("NATS_URL", nats.url.clone()),
            ("BIDSFLUX_SPOOL_DIR", p("spool")),
            ("BIDSFLUX_FORGE", "local".into()),
            ("BIDSFLUX_FORGE_DIR", p("forge")),
            ("BIDSFLUX_AE_TITLE", "BIDSFLUX".into()),
            ("BIDSFLUX_DICOM_BIND", format!("127.0.0.1:{dicom_port}")),
            ("BIDSFLUX_DICOM_ALLOWLIST", "STORESCU@127.0.0.1=BIDSFLUX".into()),
            ("BIDSFLUX_QUIET_PERIOD", "2s".into()),
            // The janitor and the resend sweep: every few seconds, not every 10 minutes.
            ("BIDSFLUX_SPOOL_JANITOR_INTERVAL", "3s".into()),
            (
                "S3_URL_PATTERN",
                format!("s3://{host}/test.{{ReferringPhysicianName}}.{{StudyDescriptionPath[1]}}.dicoms"),
            ),
            ("AWS_ENDPOINT_URL", s3.endpoint.clone()),
            ("BIDSFLUX_S3_PUBLIC_URL", s3.endpoint.clone()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID", s3.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", s3.secret_key.clone()),
            ("GITLAB_INDEXER_GROUP_TEMPLATE", "{ReferringPhysicianName}/{StudyDescriptionPath[1]}".into()),
            ("BIDSFLUX_RECEIVER_HTTP_BIND", "127.0.0.1:0".into()),
            ("BIDSFLUX_COMPLETION_HTTP_BIND", "127.0.0.1:0".into()),
            ("BIDSFLUX_COMPLETION_GRPC_BIND", "off".into()),
            ("BIDSFLUX_UPLOADER_HTTP_BIND", "127.0.0.1:0".into()),
            ("BIDSFLUX_INDEXER_HTTP_BIND", "127.0.0.1:0".into()),
            ("BIDSFLUX_INDEXER_CONCURRENCY", "1".into()),
            ("RUST_LOG", "info".into()),
            ("OTEL_SDK_DISABLED", "true".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (k, v) in settings {
            env.retain(|(key, _)| key != k);
            env.push(((*k).to_owned(), (*v).to_owned()));
        }
        let mut site =
            Self { spool_fs, dir, nats, s3, dicom_port, env, bins, running: HashMap::new(), starts: HashMap::new() };
        site.provision().await?;
        for s in [Service::StudyCompletion, Service::Uploader, Service::Receiver] {
            site.spawn(s, 0)?;
        }
        for n in 0..indexers {
            site.spawn(Service::Indexer, n)?;
        }
        site.wait_for_dicom().await?;
        Ok(site)
    }

    /// Runs the provisioner to its end (it is idempotent: a re-run changes nothing).
    pub async fn provision(&self) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.dir.path().join("logs/provisioner.log"))?;
        let status = Command::new(self.bins.join("bidsflux-provisioner"))
            .env_clear()
            .envs(self.base_env())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .status()
            .await
            .context("run bidsflux-provisioner")?;
        anyhow::ensure!(status.success(), "bidsflux-provisioner failed: {status}");
        Ok(())
    }

    fn base_env(&self) -> Vec<(String, String)> {
        let mut env = self.env.clone();
        for k in ["PATH", "HOME"] {
            if let Some(v) = std::env::var_os(k) {
                env.push((k.to_owned(), v.to_string_lossy().into_owned()));
            }
        }
        env
    }

    /// Starts replica `n` of `service` (its own work directory).
    pub fn spawn(&mut self, service: Service, n: usize) -> anyhow::Result<()> {
        let start = self.starts.entry((service, n)).or_insert(0);
        *start += 1;
        let name = format!("{}-{n}", service.binary());
        let log = std::fs::File::create(self.dir.path().join(format!("logs/{name}.{start}.log")))?;
        let work = self.dir.path().join("work").join(&name);
        std::fs::create_dir_all(&work)?;
        let child = Command::new(self.bins.join(service.binary()))
            .env_clear()
            .envs(self.base_env())
            .env("BIDSFLUX_WORK_DIR", &work)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {name}"))?;
        self.running.insert((service, n), child);
        Ok(())
    }

    /// Kills replica `n` of `service` with SIGKILL (no chance to clean up) and reaps it.
    pub async fn kill(&mut self, service: Service, n: usize) -> anyhow::Result<()> {
        let mut child =
            self.running.remove(&(service, n)).with_context(|| format!("{service:?} {n} is not running"))?;
        child.start_kill()?;
        child.wait().await?;
        Ok(())
    }

    /// Whether replica `n` of `service` is still running (not exited).
    pub fn is_running(&mut self, service: Service, n: usize) -> bool {
        self.running.get_mut(&(service, n)).is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The process id of replica `n` of `service`, while it runs.
    pub fn pid(&self, service: Service, n: usize) -> Option<u32> {
        self.running.get(&(service, n)).and_then(Child::id)
    }

    /// Waits until the receiver accepts TCP connections.
    pub async fn wait_for_dicom(&self) -> anyhow::Result<()> {
        let port = self.dicom_port;
        wait_until("the receiver's DICOM port", Duration::from_secs(30), || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok().map(|_| ())
        })
        .await
    }

    /// The spool directory.
    pub fn spool(&self) -> PathBuf {
        self.dir.path().join("spool")
    }

    /// The local forge's directory.
    pub fn forge(&self) -> PathBuf {
        self.dir.path().join("forge")
    }

    /// The work directories of every service.
    pub fn work(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    /// The last lines of every log, for a failure message.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        let Ok(rd) = std::fs::read_dir(self.dir.path().join("logs")) else { return out };
        let mut paths: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for p in paths {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(lines).collect();
            out.push_str(&format!("== {}\n", p.display()));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        // Every process first (kill_on_drop), so that nothing writes while the files go.
        for (_, mut child) in self.running.drain() {
            let _ = child.start_kill();
        }
        drop(self.spool_fs.take());
    }
}
