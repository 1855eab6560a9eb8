//! A Docker Engine of the test's own: Debian's `dockerd` with its own data root, exec root and
//! socket in a temp dir, a one-node swarm, and everything it changed on the host put back when it
//! is dropped (also while a failing test unwinds). Used by the deploy test and the provisioner's
//! secrets test.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::run_ok;

/// The repository root (the stack and its scripts are read from there).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Runs `cmd`, returning its output (never panics on a failed status).
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"))
}

/// What a Docker daemon changes on the host, taken before it starts, to put back after.
#[derive(Debug)]
struct HostState {
    ip_forward: String,
    /// `iptables-save` (the nf_tables backend docker 20.10 uses): restored when not empty.
    iptables: String,
    /// nftables tables (`family name`): the ones docker adds are deleted.
    nft_tables: BTreeSet<String>,
    links: BTreeSet<String>,
    /// Paths outside its data root that dockerd creates: removed when they were not there.
    created: Vec<(PathBuf, bool)>,
    /// `/var/lib/docker/network/files` entries (dockerd writes there whatever its data root).
    network_files: BTreeSet<String>,
}

const NETWORK_FILES: &str = "/var/lib/docker/network/files";

fn nft_tables() -> BTreeSet<String> {
    let out = run(Command::new("nft").args(["list", "tables"]));
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.strip_prefix("table ")).map(str::to_owned).collect()
}

fn links() -> BTreeSet<String> {
    let out = run(Command::new("ip").args(["-o", "link", "show"]));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_owned())
        .collect()
}

fn dir_entries(dir: &str) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

impl HostState {
    fn capture() -> Self {
        Self {
            ip_forward: std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap().trim().to_owned(),
            iptables: run_ok(&mut Command::new("iptables-save")),
            nft_tables: nft_tables(),
            links: links(),
            created: ["/var/lib/docker", "/run/docker", "/var/run/docker"]
                .iter()
                .map(|p| (PathBuf::from(p), Path::new(p).exists()))
                .collect(),
            network_files: dir_entries(NETWORK_FILES),
        }
    }

    /// Puts the host back; what could not be put back, for the log.
    fn restore(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let failed = |what: &str, out: std::io::Result<Output>| match out {
            Ok(o) if o.status.success() => None,
            Ok(o) => Some(format!("{what}: {}", String::from_utf8_lossy(&o.stderr).trim())),
            Err(e) => Some(format!("{what}: {e}")),
        };
        for table in nft_tables().difference(&self.nft_tables) {
            let mut args = vec!["delete", "table"];
            args.extend(table.split_whitespace());
            problems.extend(failed(&format!("nft delete table {table}"), Command::new("nft").args(&args).output()));
        }
        if !self.iptables.trim().is_empty() {
            let restore =
                Command::new("iptables-restore").stdin(Stdio::piped()).stderr(Stdio::piped()).spawn().and_then(
                    |mut child| {
                        use std::io::Write as _;
                        child.stdin.take().map(|mut i| i.write_all(self.iptables.as_bytes())).transpose()?;
                        child.wait_with_output()
                    },
                );
            problems.extend(failed("iptables-restore", restore));
        }
        if let Err(e) = std::fs::write("/proc/sys/net/ipv4/ip_forward", &self.ip_forward) {
            problems.push(format!("restore ip_forward: {e}"));
        }
        for link in links().difference(&self.links) {
            problems.extend(failed(
                &format!("ip link delete {link}"),
                Command::new("ip").args(["link", "delete", link]).output(),
            ));
        }
        for name in dir_entries(NETWORK_FILES).difference(&self.network_files) {
            let _ = std::fs::remove_file(Path::new(NETWORK_FILES).join(name));
        }
        for (path, existed) in &self.created {
            if !existed
                && path.exists()
                && let Err(e) = std::fs::remove_dir_all(path)
            {
                problems.push(format!("remove {}: {e}", path.display()));
            }
        }
        let left: Vec<String> = links().difference(&self.links).cloned().collect();
        if !left.is_empty() {
            problems.push(format!("links left: {left:?}"));
        }
        problems
    }
}

/// The test's own Docker Engine, in swarm mode, and the stack deployed on it. Dropping it (also
/// while a failing test unwinds) removes the stack, leaves the swarm, stops the daemon and puts
/// the host back.
pub struct Engine {
    /// Its directory: data root, exec root, socket, log (and whatever a test puts there).
    pub dir: tempfile::TempDir,
    /// Its API socket.
    pub sock: PathBuf,
    dockerd: Option<Child>,
    host: HostState,
    /// The variables the CLI runs with (the stack's settings).
    pub env: BTreeMap<String, String>,
}

impl Engine {
    /// Starts the daemon (as root) and waits until it answers.
    pub fn start() -> Self {
        let host = HostState::capture();
        let dir = tempfile::Builder::new().prefix("bidsflux-engine.").tempdir().unwrap();
        let sock = dir.path().join("docker.sock");
        let log = std::fs::File::create(dir.path().join("dockerd.log")).unwrap();
        let dockerd = Command::new("dockerd")
            .arg("--data-root")
            .arg(dir.path().join("data"))
            .arg("--exec-root")
            .arg(dir.path().join("exec"))
            .arg("--pidfile")
            .arg(dir.path().join("dockerd.pid"))
            .arg("--host")
            .arg(format!("unix://{}", sock.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start dockerd (scripts/install-deps.sh installs docker.io): {e}"));
        let engine = Self { dir, sock, dockerd: Some(dockerd), host, env: BTreeMap::new() };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !engine.docker(&["version"]).status.success() {
            assert!(Instant::now() < deadline, "dockerd did not answer in 30 s:\n{}", engine.daemon_log());
            std::thread::sleep(Duration::from_millis(200));
        }
        engine
    }

    /// The end of the daemon's log.
    pub fn daemon_log(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default();
        log.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// The docker CLI against this engine, with the stack's variables.
    pub fn cli(&self) -> Command {
        let mut c = Command::new("docker");
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", self.dir.path())
            .env("DOCKER_HOST", self.host())
            .envs(&self.env)
            .current_dir(repo());
        c
    }

    /// `docker ARGS` against this engine (never panics on a failed status).
    pub fn docker(&self, args: &[&str]) -> Output {
        run(self.cli().args(args))
    }

    /// `docker ARGS` against this engine: its stdout, or a panic with the end of its output.
    pub fn docker_ok(&self, args: &[&str]) -> String {
        run_ok(self.cli().args(args))
    }

    /// `unix://<socket>`, for `DOCKER_HOST` and `--docker-host`.
    pub fn host(&self) -> String {
        format!("unix://{}", self.sock.display())
    }

    /// `docker swarm init` on 127.0.0.1, the node labelled as both the data and the processing
    /// server.
    pub fn init_swarm(&self) {
        self.docker_ok(&["swarm", "init", "--advertise-addr", "127.0.0.1"]);
        let node = self.docker_ok(&["node", "ls", "-q"]).trim().to_owned();
        self.docker_ok(&[
            "node",
            "update",
            "--label-add",
            "bidsflux.data=true",
            "--label-add",
            "bidsflux.proc=true",
            &node,
        ]);
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let mut problems = Vec::new();
        if self.dockerd.is_some() {
            let _ = self.docker(&["stack", "rm", "bidsflux"]);
            let services = self.docker(&["service", "ls", "-q"]);
            for id in String::from_utf8_lossy(&services.stdout).split_whitespace() {
                let _ = self.docker(&["service", "rm", id]);
            }
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                let ps = self.docker(&["ps", "-aq"]);
                if ps.status.success() && ps.stdout.is_empty() {
                    break;
                }
                let _ = self.docker(&["container", "prune", "-f"]);
                std::thread::sleep(Duration::from_millis(500));
            }
            let _ = self.docker(&["swarm", "leave", "--force"]);
        }
        if let Some(mut d) = self.dockerd.take() {
            let _ = Command::new("kill").args(["-TERM", &d.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while d.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(200));
            }
            if d.try_wait().ok().flatten().is_none() {
                problems.push("dockerd did not stop in 30 s: killed".to_owned());
                let _ = d.kill();
                let _ = d.wait();
            }
        }
        // Whatever the daemon left mounted under its directories (overlays, network namespaces).
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let root = self.dir.path().display().to_string();
        let mut under: Vec<&str> =
            mounts.lines().filter_map(|l| l.split_whitespace().nth(1)).filter(|m| m.starts_with(&root)).collect();
        under.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in under {
            let _ = Command::new("umount").args(["-l", m]).status();
        }
        problems.extend(self.host.restore());
        if !problems.is_empty() {
            eprintln!("test engine: the host could not be put back entirely: {problems:?}");
        }
    }
}
