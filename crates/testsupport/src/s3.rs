use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tokio::net::TcpListener;

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
    /// Every request served, as `METHOD /path?query`.
    requests: Arc<Mutex<Vec<String>>>,
    /// Milliseconds each UploadPart waits before it is served (0: none).
    part_delay_ms: Arc<AtomicU64>,
    /// The status every request is answered with instead of being served (0: served).
    failing: Arc<AtomicU16>,
    _tmp: Option<tempfile::TempDir>,
    /// Starts the accept loop on a listener (again, after [`S3Server::stop`]).
    serve: Serve,
    /// The accept loop.
    task: Mutex<tokio::task::JoinHandle<()>>,
}

/// Spawns the server's accept loop on a listener.
#[derive(Clone)]
struct Serve(Arc<dyn Fn(TcpListener) -> tokio::task::JoinHandle<()> + Send + Sync>);

impl std::fmt::Debug for Serve {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Serve")
    }
}

/// An S3 error reply (`<Error><Code>…`), as S3 and MinIO send when they cannot serve a request.
fn s3_error(status: u16) -> hyper::Response<s3s::Body> {
    let code = match status {
        503 => "ServiceUnavailable",
        500 => "InternalError",
        _ => "SlowDown",
    };
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>injected by the test</Message></Error>"
    );
    let mut resp = hyper::Response::new(s3s::Body::from(body));
    *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::SERVICE_UNAVAILABLE);
    resp.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/xml"));
    resp
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
        let requests = Arc::new(Mutex::new(Vec::new()));
        let part_delay_ms = Arc::new(AtomicU64::new(0));
        let failing = Arc::new(AtomicU16::new(0));
        let (log, delay, fail) = (requests.clone(), part_delay_ms.clone(), failing.clone());
        let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            if let Ok(mut l) = log.lock() {
                l.push(format!("{} {}", req.method(), req.uri()));
            }
            let is_part = req.uri().query().is_some_and(|q| q.contains("partNumber="));
            let pause = if is_part { delay.load(Ordering::Relaxed) } else { 0 };
            let status = fail.load(Ordering::Relaxed);
            // Lazy: the request (body included) is read only when polled.
            let served = (status == 0).then(|| hyper::service::Service::call(&service, req));
            async move {
                let Some(served) = served else { return Ok(s3_error(status)) };
                if pause > 0 {
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                served.await
            }
        });
        let serve = Serve(Arc::new(move |l: TcpListener| tokio::spawn(crate::http::serve(l, service.clone()))));
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let task = Mutex::new((serve.0)(listener));
        Ok(Self {
            endpoint: format!("http://{addr}"),
            addr,
            access_key: access_key.to_owned(),
            secret_key: secret_key.to_owned(),
            root: root.to_path_buf(),
            requests,
            part_delay_ms,
            failing,
            _tmp: None,
            serve,
            task,
        })
    }

    /// Directory holding the buckets.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The environment a user of this server gives git-annex and DataLad:
    /// its credentials, and loopback allowed (`annex.security.allowed-ip-addresses`,
    /// through `GIT_CONFIG_*`, since git-annex refuses private addresses).
    pub fn annex_user_env(&self) -> [(&'static str, String); 5] {
        [
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
            ("GIT_CONFIG_COUNT", "1".into()),
            ("GIT_CONFIG_KEY_0", "annex.security.allowed-ip-addresses".into()),
            ("GIT_CONFIG_VALUE_0", "127.0.0.1".into()),
        ]
    }

    /// Every request this server received so far, as `METHOD /path?query`
    /// (e.g. `PUT /bucket/key?partNumber=3&uploadId=…` for an UploadPart).
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Makes every UploadPart wait `delay` before it is served, so a test can
    /// act in the middle of a multipart upload (e.g. stop the server).
    pub fn delay_parts(&self, delay: Duration) {
        self.part_delay_ms.store(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Multipart uploads the server still holds (started, neither completed
    /// nor aborted): s3s-fs keeps each as `<root>/.upload-<id>.json` (plus
    /// `….upload-<id>.metadata.json`) and its parts as
    /// `<root>/.upload_id-<id>.part-<n>`. It does not implement
    /// ListMultipartUploads, hence this look at its files.
    pub fn pending_uploads(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(&self.root) else { return Vec::new() };
        let mut names: Vec<String> = rd
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.contains(".upload-") || n.starts_with(".upload_id-"))
            .collect();
        names.sort();
        names
    }

    /// Answers every request with `status` (e.g. 503 `ServiceUnavailable`, as MinIO does when
    /// it cannot serve) instead of serving it, until called with `None`.
    pub fn fail_requests(&self, status: Option<u16>) {
        self.failing.store(status.unwrap_or(0), Ordering::Relaxed);
    }

    /// Stops serving (an outage): the port refuses connections and open ones are reset.
    /// Objects stay on disk; [`Self::restart`] serves them again.
    pub fn stop(&self) {
        if let Ok(t) = self.task.lock() {
            t.abort();
        }
    }

    /// Serves again on the same address after [`Self::stop`] (the end of an outage).
    pub async fn restart(&self) -> anyhow::Result<()> {
        self.stop();
        // Tokio's listener sets SO_REUSEADDR: the port is free once the old one is dropped.
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                // The aborted loop drops its listener when the runtime next polls it.
                Err(_) if tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(anyhow::anyhow!("bind {} again: {e}", self.addr)),
            }
        };
        let task = (self.serve.0)(listener);
        if let Ok(mut t) = self.task.lock() {
            *t = task;
        }
        Ok(())
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}
