use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// An embedded S3 server (s3s-fs) on loopback; objects are files at
/// `<root>/<bucket>/<key>`. Stopped on drop.
#[derive(Debug)]
pub struct S3Server {
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    /// The bound address.
    pub addr: SocketAddr,
    /// Access key accepted by the server.
    pub access_key: String,
    /// Secret key accepted by the server.
    pub secret_key: String,
    root: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    task: tokio::task::JoinHandle<()>,
}

impl S3Server {
    /// Starts a server on a free port with its data in a temp dir.
    pub async fn start() -> anyhow::Result<Self> {
        let tmp = tempfile::tempdir()?;
        let root = tmp.path().to_path_buf();
        let mut s = Self::start_at(&root, "127.0.0.1:0", "bidsflux-test-key", "bidsflux-test-secret").await?;
        s._tmp = Some(tmp);
        Ok(s)
    }

    /// Starts a server keeping its data under `root`, listening on `bind`.
    pub async fn start_at(root: &Path, bind: &str, access_key: &str, secret_key: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(root)?;
        let fs =
            s3s_fs::FileSystem::new(root).map_err(|e| anyhow::anyhow!("open s3 root {}: {e:?}", root.display()))?;
        let service = {
            let mut b = S3ServiceBuilder::new(fs);
            b.set_auth(SimpleAuth::from_single(access_key, secret_key));
            b.build()
        };
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let http = ConnBuilder::new(TokioExecutor::new());
            let mut conns = JoinSet::new();
            loop {
                let Ok((socket, _)) = listener.accept().await else { continue };
                let conn = http.serve_connection(TokioIo::new(socket), service.clone()).into_owned();
                conns.spawn(async move {
                    let _ = conn.await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(Self {
            endpoint: format!("http://{addr}"),
            addr,
            access_key: access_key.to_owned(),
            secret_key: secret_key.to_owned(),
            root: root.to_path_buf(),
            _tmp: None,
            task,
        })
    }

    /// Directory holding the buckets.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Stops serving (an outage); objects stay on disk.
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}
