use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use tokio::process::{Child, Command};

/// A `nats-server` with JetStream, on a free loopback port, killed on drop.
#[derive(Debug)]
pub struct NatsServer {
    /// `nats://127.0.0.1:<port>`.
    pub url: String,
    /// The port (kept across [`NatsServer::restart`]).
    pub port: u16,
    dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a server in a new temp dir.
    pub async fn start() -> anyhow::Result<Self> {
        let tmp = tempfile::tempdir()?;
        let mut s = Self::start_in(tmp.path(), crate::free_port()?).await?;
        s._tmp = Some(tmp);
        Ok(s)
    }

    /// Starts a server keeping its data (and `nats.log`) under `dir`, on `port`.
    pub async fn start_in(dir: &std::path::Path, port: u16) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut s =
            Self { url: format!("nats://127.0.0.1:{port}"), port, dir: dir.to_path_buf(), _tmp: None, child: None };
        s.spawn().await?;
        Ok(s)
    }

    /// Where JetStream keeps its files.
    pub fn store_dir(&self) -> PathBuf {
        self.dir.join("jetstream")
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let bin = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("nats-server");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("nats.log"))?;
        let child = Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"])
            .arg(self.store_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {bin} (install Debian's nats-server)"))?;
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.port);
        crate::wait_until("nats-server to listen", Duration::from_secs(20), || {
            let addr = addr.clone();
            async move { tokio::net::TcpStream::connect(addr).await.ok().map(|_| ()) }
        })
        .await?;
        Ok(())
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Stops the server (as in an outage); data stays in the temp dir.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill().await?;
            let _ = c.wait().await;
        }
        Ok(())
    }

    /// Starts it again on the same port with the same data.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await?;
        self.spawn().await
    }
}
