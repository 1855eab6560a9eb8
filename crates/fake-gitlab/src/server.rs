//! The server: [`FakeGitlab`] starts it on its own runtime; every request is
//! logged, may meet an injected fault or delay, and goes to the REST API,
//! git over HTTP, or the check of the SSH forced command.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context as _;
use hyper::body::Incoming;
use hyper::{Request, Response};
use serde_json::json;
use tokio::net::TcpListener;

use crate::api;
use crate::api::tokens::ALL_SCOPES;
use crate::git_http;
use crate::replies::{Body, json_response, reason};
use crate::shared::{Shared, lock};
use crate::ssh::{self, FakeGitlabSsh};
use crate::state::State;

/// One request the server received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedRequest {
    /// HTTP method.
    pub method: String,
    /// Path as received (still percent-encoded), without the query.
    pub path: String,
    /// Query string, if any.
    pub query: Option<String>,
    /// Response status (0 while the request is being served).
    pub status: u16,
}

#[derive(Debug, Clone)]
enum FaultKind {
    Status(u16, Option<String>),
    Delay(Duration),
}

#[derive(Debug, Clone)]
struct Fault {
    method: Option<String>,
    path_prefix: String,
    kind: FaultKind,
    remaining: usize,
}

/// The fake GitLab server; stops on drop. See the [crate docs](crate).
#[derive(Debug)]
pub struct FakeGitlab {
    pub(crate) addr: SocketAddr,
    pub(crate) inner: Arc<Inner>,
    /// The accept loop; replaced by [`FakeGitlab::restart`].
    task: Mutex<tokio::task::JoinHandle<()>>,
    /// The server's own runtime, so that a test blocking its thread (e.g.
    /// running `git` with `std::process`) cannot starve the server.
    runtime: Option<tokio::runtime::Runtime>,
    _tmp: tempfile::TempDir,
}

/// What the serving tasks hold: the shared state, the request log and the faults to inject.
#[derive(Debug)]
pub(crate) struct Inner {
    /// State and repositories.
    pub(crate) shared: Shared,
    log: Mutex<Vec<LoggedRequest>>,
    faults: Mutex<Vec<Fault>>,
    /// What every request waits before it is served: see [`Latency`].
    latency: Mutex<Latency>,
}

/// A constant delay before every request is served, as when GitLab runs on another host of a
/// site's network: the round trip plus GitLab's own time to answer. Set with
/// [`FakeGitlab::set_latency`]; none by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Latency {
    /// Before each REST API request (`/api/v4/…`).
    pub api: Duration,
    /// Before each git smart-HTTP request (`…/info/refs`, `…/git-upload-pack`,
    /// `…/git-receive-pack`): a push or a fetch makes two of them.
    pub git: Duration,
}

impl FakeGitlab {
    /// Starts a server on a free loopback port with an admin user `root`
    /// ([`Self::admin_token`]) and keeps its repositories in a temp dir. It
    /// runs on its own two-thread runtime, so callers may block (e.g. run
    /// `git` with `std::process`) even on a current-thread test runtime.
    pub async fn start() -> anyhow::Result<Self> {
        let out = std::process::Command::new("git").arg("--version").output();
        if !out.as_ref().is_ok_and(|o| o.status.success()) {
            anyhow::bail!("the fake GitLab needs `git` on PATH (git http-backend serves its repositories)");
        }
        let tmp = tempfile::Builder::new().prefix("fake-gitlab-").tempdir()?;
        let repos = tmp.path().join("repositories");
        let home = tmp.path().join("home");
        std::fs::create_dir_all(&repos)?;
        std::fs::create_dir_all(&home)?;
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fake-gitlab")
            .enable_all()
            .build()?;
        let url = format!("http://{addr}");
        let mut state = State { url: url.clone(), ..State::default() };
        let root = state.insert_user("root", "Administrator", "admin@example.com", true);
        let token = state.insert_token(root, "fake-gitlab-admin", &ALL_SCOPES, None).token;
        state.admin_token = token;
        state.admin_id = root;
        let inner = Arc::new(Inner {
            shared: Shared { url, repos, home, state: Mutex::new(state) },
            log: Mutex::new(Vec::new()),
            faults: Mutex::new(Vec::new()),
            latency: Mutex::new(Latency::default()),
        });
        let task = Mutex::new(serve_on(&runtime, &inner, std_listener));
        Ok(Self { addr, inner, task, runtime: Some(runtime), _tmp: tmp })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.inner.shared.url.clone()
    }

    /// `127.0.0.1:PORT`, the host to give `gitlab::GitlabBuilder::new` (with `.insecure()`).
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving (an outage): the port refuses connections and the connections open now
    /// are reset. State and repositories stay until drop; [`Self::restart`] serves them again.
    pub fn stop(&self) {
        lock(&self.task).abort();
    }

    /// Serves again on the same address after [`Self::stop`] (the end of an outage), with the
    /// same state, repositories, faults and latency.
    pub async fn restart(&self) -> anyhow::Result<()> {
        self.stop();
        // std sets SO_REUSEADDR on Unix; the aborted loop drops its listener when its runtime
        // next polls it, so the port may be busy for a moment.
        let mut tries = 0;
        let listener = loop {
            match std::net::TcpListener::bind(self.addr) {
                Ok(l) => break l,
                Err(_) if tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(anyhow::anyhow!("bind {} again: {e}", self.addr)),
            }
        };
        listener.set_nonblocking(true)?;
        let rt = self.runtime.as_ref().context("the fake GitLab's runtime is gone")?;
        *lock(&self.task) = serve_on(rt, &self.inner, listener);
        Ok(())
    }

    /// Makes every request wait `latency` before it is served, until set again (e.g. to
    /// [`Latency::default`]).
    pub fn set_latency(&self, latency: Latency) {
        *lock(&self.inner.latency) = latency;
    }

    /// Token of the admin user `root` (all scopes).
    pub fn admin_token(&self) -> String {
        self.state().admin_token.clone()
    }

    /// Id of the admin user `root`.
    pub fn admin_id(&self) -> u64 {
        self.state().admin_id
    }

    /// The state, locked.
    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.inner.shared.state)
    }

    /// Starts OpenSSH's `sshd` (Debian `openssh-server`; it must run as root,
    /// as tests here do) on a free loopback port. Each key registered with
    /// [`FakeGitlab::add_ssh_key`] logs in to a forced command that asks the
    /// fake, as gitlab-shell asks GitLab, whether its user may fetch or push
    /// (role, project visibility) and applies the protected-branch rules.
    pub async fn start_ssh(&self) -> anyhow::Result<FakeGitlabSsh> {
        ssh::start(&self.inner.shared).await
    }

    /// Every request so far as `(method, path)`, path as received without the query.
    pub fn requests(&self) -> Vec<(String, String)> {
        lock(&self.inner.log).iter().map(|r| (r.method.clone(), r.path.clone())).collect()
    }

    /// Every request so far with its query and response status.
    pub fn request_log(&self) -> Vec<LoggedRequest> {
        lock(&self.inner.log).clone()
    }

    /// Every request so far that may write, as `(method, path)`: those whose
    /// method is not `GET` or `HEAD` (REST and git pushes alike), except git's
    /// `POST …/git-upload-pack`, which only fetches. Empty after a run that
    /// changed nothing (a test of idempotence clears the log first with
    /// [`Self::clear_requests`]).
    pub fn write_requests(&self) -> Vec<(String, String)> {
        lock(&self.inner.log)
            .iter()
            .filter(|r| !matches!(r.method.as_str(), "GET" | "HEAD"))
            .filter(|r| !(r.method == "POST" && r.path.ends_with("/git-upload-pack")))
            .map(|r| (r.method.clone(), r.path.clone()))
            .collect()
    }

    /// Forgets the request log.
    pub fn clear_requests(&self) {
        lock(&self.inner.log).clear();
    }

    /// Makes the next `times` requests whose method is `method` (any if `None`)
    /// and whose raw path starts with `path_prefix` (e.g. `/api/v4/groups` or
    /// `/pi/study.git/`) fail with `status` and a GitLab-like JSON body
    /// (`{"message":"502 Bad Gateway"}`). Faults apply in the order they were
    /// added.
    pub fn fail_next(&self, method: Option<&str>, path_prefix: &str, status: u16, times: usize) {
        self.push_fault(method, path_prefix, FaultKind::Status(status, None), times);
    }

    /// Like [`Self::fail_next`] with `{"message": message}` as the body.
    pub fn fail_next_with_message(
        &self,
        method: Option<&str>,
        path_prefix: &str,
        status: u16,
        message: &str,
        times: usize,
    ) {
        self.push_fault(method, path_prefix, FaultKind::Status(status, Some(message.to_owned())), times);
    }

    /// Makes the next `times` matching requests wait `delay` before they are
    /// served normally (to trigger client timeouts).
    pub fn delay_next(&self, method: Option<&str>, path_prefix: &str, delay: Duration, times: usize) {
        self.push_fault(method, path_prefix, FaultKind::Delay(delay), times);
    }

    fn push_fault(&self, method: Option<&str>, path_prefix: &str, kind: FaultKind, times: usize) {
        if times == 0 {
            return;
        }
        lock(&self.inner.faults).push(Fault {
            method: method.map(|m| m.to_ascii_uppercase()),
            path_prefix: path_prefix.to_owned(),
            kind,
            remaining: times,
        });
    }
}

/// Spawns the accept loop for `listener` on `rt`.
fn serve_on(
    rt: &tokio::runtime::Runtime,
    inner: &Arc<Inner>,
    listener: std::net::TcpListener,
) -> tokio::task::JoinHandle<()> {
    let served = inner.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let inner = served.clone();
        async move { Ok::<_, Infallible>(inner.handle(req).await) }
    });
    rt.spawn(async move {
        let Ok(listener) = TcpListener::from_std(listener) else { return };
        bidsflux_testsupport::serve(listener, service).await;
    })
}

impl Drop for FakeGitlab {
    fn drop(&mut self) {
        lock(&self.task).abort();
        // Dropping a runtime blocks, which is not allowed in async code.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Inner {
    fn take_fault(&self, method: &str, path: &str) -> Option<FaultKind> {
        let mut faults = lock(&self.faults);
        let i = faults.iter().position(|f| {
            f.method.as_deref().is_none_or(|m| m == method) && path.starts_with(f.path_prefix.as_str())
        })?;
        let kind = faults[i].kind.clone();
        faults[i].remaining -= 1;
        if faults[i].remaining == 0 {
            faults.remove(i);
        }
        Some(kind)
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let method = req.method().as_str().to_owned();
        let path = req.uri().path().to_owned();
        let query = req.uri().query().map(str::to_owned);
        let index = {
            let mut log = lock(&self.log);
            log.push(LoggedRequest { method: method.clone(), path: path.clone(), query: query.clone(), status: 0 });
            log.len() - 1
        };
        let latency = *lock(&self.latency);
        let wait = if path.starts_with("/api/v4/") {
            latency.api
        } else if git_http::git_route(&path).is_some() {
            latency.git
        } else {
            Duration::ZERO
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let resp = match self.take_fault(&method, &path) {
            Some(FaultKind::Status(status, message)) => {
                let message = message.unwrap_or_else(|| format!("{status} {}", reason(status)));
                json_response(status, &json!({ "message": message }), Vec::new())
            }
            Some(FaultKind::Delay(d)) => {
                tokio::time::sleep(d).await;
                self.route(req, &method, &path, query.as_deref()).await
            }
            None => self.route(req, &method, &path, query.as_deref()).await,
        };
        if let Some(entry) = lock(&self.log).get_mut(index) {
            entry.status = resp.status().as_u16();
        }
        resp
    }

    async fn route(&self, req: Request<Incoming>, method: &str, path: &str, query: Option<&str>) -> Response<Body> {
        if let Some(rest) = path.strip_prefix("/api/v4/") {
            return api::handle(&self.shared, req, method, rest, path, query).await;
        }
        if let Some((repo, action)) = git_http::git_route(path) {
            return git_http::handle(&self.shared, req, &repo, action, query).await;
        }
        if path == ssh::SSH_ALLOWED_PATH && method == "GET" {
            return ssh::allowed(&self.shared, query);
        }
        json_response(404, &json!({"error": "404 Not Found"}), Vec::new())
    }
}
