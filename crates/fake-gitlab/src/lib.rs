//! A **fake** GitLab for tests: an in-memory imitation of a small part of
//! GitLab's REST API v4, plus real git repositories served over smart HTTP.
//! It is not GitLab and shares no code with it.
//!
//! GitLab cannot run on the machines that run our tests, so code that talks to
//! GitLab (the indexer's forge, the provisioner) is tested against this. It
//! follows the behaviour documented for **GitLab 17.x** in the REST API
//! documentation (docs.gitlab.com/ee/api/: `groups`, `members`,
//! `group_level_variables`, `project_level_variables`, `instance_level_ci_variables`,
//! `projects`, `branches`, `protected_branches`, `users`, `user_tokens`,
//! `runners`, `rest/index` for authentication, status codes and pagination):
//! paths, parameters, status codes, the fields of the responses that callers
//! use, and error bodies shaped like GitLab's (`{"message": ...}` for
//! application errors, `{"error": ...}` for parameter validation and unknown
//! routes). Where the documentation is silent, it does what GitLab is known to
//! do (e.g. `400 Failed to save group {:path=>["has already been taken"]}`).
//!
//! # What it serves
//!
//! - `GET /api/v4/user`, `GET /users` (`username`, `search`), `GET /users/:id`,
//!   `POST /users` (admin), `POST /users/:id/personal_access_tokens` (admin),
//!   `GET /personal_access_tokens` (`user_id`), `GET /personal_access_tokens/self`.
//! - Groups: `GET /groups` (`search`, `top_level_only`, `all_available`,
//!   `order_by` name|path|id, `sort`), `GET /groups/:id` (id or URL-encoded
//!   full path), `POST /groups`, `GET /groups/:id/subgroups`,
//!   `GET /groups/:id/projects` (`include_subgroups`, `search`).
//! - Members of groups and projects: `GET|POST /…/:id/members`,
//!   `GET|PUT|DELETE /…/:id/members/:user_id`, `GET /…/:id/members/all` and
//!   `/…/:id/members/all/:user_id` (inherited members, highest level wins).
//! - CI/CD variables: `/groups/:id/variables`, `/projects/:id/variables`,
//!   `/admin/ci/variables` (admin), each with `GET|POST` and
//!   `GET|PUT|DELETE /:key`.
//! - Projects: `GET /projects` (`search`), `GET /projects/:id`, `POST /projects`
//!   (creates a bare repository; `initialize_with_readme` commits a README),
//!   `GET /projects/:id/repository/branches[/:branch]` (read from the real
//!   repository), `GET|POST /projects/:id/protected_branches`,
//!   `GET|DELETE /projects/:id/protected_branches/:name` (wildcards like
//!   `convert/*`).
//! - Runners: `POST /user/runners` (`glrt-` tokens), `GET /runners/all`
//!   (admin), `GET|DELETE /runners/:id`.
//! - Git smart HTTP at `/<path_with_namespace>.git/{info/refs,git-upload-pack,git-receive-pack}`
//!   through `git http-backend` (CGI), authenticated with HTTP Basic where the
//!   password is a personal access token (any user name, e.g. `oauth2`).
//!   Protected branches are enforced on push by a `pre-receive` hook the fake
//!   installs in every repository: no deletion by push, no push below the
//!   rule's push level, no non-fast-forward update unless `allow_force_push`.
//!
//! Lists paginate like GitLab: offset pagination (`page`, `per_page` default
//! 20 and at most 100; `X-Total`, `X-Total-Pages`, `X-Page`, `X-Per-Page`,
//! `X-Next-Page`, `X-Prev-Page`; `Link` with `prev`/`next`/`first`/`last` on the
//! server's own URL), and keyset pagination when asked with
//! `pagination=keyset` (only a `Link` `rel="next"` carrying an opaque
//! `cursor`), which the `gitlab` crate uses for `/groups` and `/users`.
//!
//! Authentication: `PRIVATE-TOKEN: <token>`, `Authorization: Bearer <token>` or
//! `private_token=`; otherwise `401 {"message":"401 Unauthorized"}`. Token
//! scopes are checked (`api`, `read_api` for GET; `api`,
//! `read_repository`/`write_repository` for git). Permissions follow GitLab's
//! roles (Guest 10, Reporter 20, Developer 30, Maintainer 40, Owner 50;
//! admins can do everything): private things a user cannot see are 404,
//! visible things a user may not change are 403. Maintainer is needed to
//! create subgroups and projects in a group, to manage members (only Owners
//! grant Owner), protected branches and variables; Owner to create group
//! runners; Developer to push; Reporter to fetch private repositories.
//!
//! Git over HTTP answers like GitLab: no or wrong credentials → 401 with
//! `WWW-Authenticate: Basic realm="GitLab"` (so `git` retries with the
//! credentials of the URL), a private project the user cannot see → 404, a
//! member below Reporter (fetch) or Developer (push) → 403; public projects
//! can be cloned anonymously. When several protected branch rules match a
//! branch, a push is allowed if any rule allows it, a force push only if all
//! do. Request and response bodies are streamed through `git http-backend`,
//! so large pushes do not sit in memory.
//!
//! The creator of a group becomes its Owner (as in GitLab); a project's
//! creator gets no membership of its own (group projects inherit; personal
//! projects belong to their user). The server runs on its own runtime: tests
//! may block their thread (e.g. run `git` with `std::process`) while it serves.
//!
//! Tests can seed state directly ([`FakeGitlab::add_user`],
//! [`FakeGitlab::add_group`], ...), inspect it ([`FakeGitlab::group`],
//! [`FakeGitlab::members`], ...), read the request log
//! ([`FakeGitlab::requests`]) and inject failures or delays on any path, REST or
//! git ([`FakeGitlab::fail_next`], [`FakeGitlab::delay_next`]).
//!
//! # What it does not implement
//!
//! Everything else: merge requests, pipelines, jobs, issues, tags, files and
//! commits APIs, webhooks, SSH key APIs (keys are seeded with
//! [`FakeGitlab::add_ssh_key`]; git over SSH runs through a real `sshd` with
//! [`FakeGitlab::start_ssh`], whose forced command asks a fake-only endpoint
//! where gitlab-shell would ask GitLab's internal API), LFS, GraphQL, OAuth, passwords, group/project access tokens, CI
//! job tokens, `sudo`, deletion and transfer of groups and projects, invites,
//! group sharing, member expiry, approval rules, the `allowed_to_*` per-user
//! or per-group protected branch rules (only the access levels), protected
//! tags, visibility inheritance checks (a public subgroup under a private group
//! is accepted), rate limiting, and GitLab's side effects of a push (the default
//! branch is what the project was created with, never updated by a push).
//! Keyset cursors are positions in the sorted list, not keys. Values it cannot
//! know (avatars, statistics) are `null` or absent.

use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// GitLab's role levels (`access_level` values).
pub mod access {
    /// No access.
    pub const NO_ACCESS: u64 = 0;
    /// Minimal access.
    pub const MINIMAL: u64 = 5;
    /// Guest.
    pub const GUEST: u64 = 10;
    /// Planner.
    pub const PLANNER: u64 = 15;
    /// Reporter: can read private repositories.
    pub const REPORTER: u64 = 20;
    /// Developer: can push unprotected branches.
    pub const DEVELOPER: u64 = 30;
    /// Maintainer: manages members, protected branches, variables, subgroups, projects.
    pub const MAINTAINER: u64 = 40;
    /// Owner.
    pub const OWNER: u64 = 50;
    /// Admin (only as a protected branch level; instance admins act at this level).
    pub const ADMIN: u64 = 60;
}

/// A user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// User id.
    pub id: u64,
    /// Login name (also the path of the personal namespace).
    pub username: String,
    /// Display name.
    pub name: String,
    /// E-mail address.
    pub email: String,
    /// Instance administrator.
    pub admin: bool,
    /// Id of the personal namespace.
    pub namespace_id: u64,
    /// Creation time (ISO 8601).
    pub created_at: String,
}

/// A personal access token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersonalAccessToken {
    /// Token id.
    pub id: u64,
    /// Owner.
    pub user_id: u64,
    /// Token name.
    pub name: String,
    /// The secret (`glpat-…`).
    pub token: String,
    /// Scopes (`api`, `read_api`, `read_repository`, `write_repository`, ...).
    pub scopes: Vec<String>,
    /// Expiry date (`YYYY-MM-DD`); the token stops working on that day.
    pub expires_at: Option<String>,
    /// Revoked.
    pub revoked: bool,
    /// Creation time.
    pub created_at: String,
}

/// A group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// Group (namespace) id.
    pub id: u64,
    /// Display name.
    pub name: String,
    /// Last path component.
    pub path: String,
    /// Full path, e.g. `pi/study1`.
    pub full_path: String,
    /// Names joined by ` / `.
    pub full_name: String,
    /// Parent group id.
    pub parent_id: Option<u64>,
    /// `private`, `internal` or `public`.
    pub visibility: String,
    /// Description.
    pub description: String,
    /// Creation time.
    pub created_at: String,
}

/// A project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Project {
    /// Project id.
    pub id: u64,
    /// Display name.
    pub name: String,
    /// Last path component.
    pub path: String,
    /// Id of the group or personal namespace holding it.
    pub namespace_id: u64,
    /// Full path, e.g. `pi/study1/bids`.
    pub path_with_namespace: String,
    /// Default branch.
    pub default_branch: String,
    /// `private`, `internal` or `public`.
    pub visibility: String,
    /// Description.
    pub description: String,
    /// Creation time.
    pub created_at: String,
}

/// What a membership, a variable or a runner belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The whole instance (variables, runners).
    Instance,
    /// A group, by id.
    Group(u64),
    /// A project, by id.
    Project(u64),
}

/// A direct membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Group or project.
    pub source: Scope,
    /// The member.
    pub user_id: u64,
    /// Role level (see [`access`]).
    pub access_level: u64,
    /// Expiry date, if any (not enforced).
    pub expires_at: Option<String>,
    /// Creation time.
    pub created_at: String,
}

/// A protected branch rule of a project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtectedBranch {
    /// Rule id.
    pub id: u64,
    /// Project id.
    pub project_id: u64,
    /// Branch name or wildcard (`*` matches anything, `/` included).
    pub name: String,
    /// Level needed to push (0: no one).
    pub push_access_level: u64,
    /// Level needed to merge.
    pub merge_access_level: u64,
    /// Level needed to unprotect.
    pub unprotect_access_level: u64,
    /// Whether non-fast-forward pushes are allowed.
    pub allow_force_push: bool,
}

/// A CI/CD variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variable {
    /// Instance, group or project.
    pub scope: Scope,
    /// Key.
    pub key: String,
    /// Value.
    pub value: String,
    /// `env_var` or `file`.
    pub variable_type: String,
    /// Only on protected branches.
    pub protected: bool,
    /// Masked in job logs.
    pub masked: bool,
    /// Not expanded.
    pub raw: bool,
    /// Environment scope (`*`).
    pub environment_scope: String,
    /// Description.
    pub description: Option<String>,
}

/// A runner created with `POST /user/runners`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runner {
    /// Runner id.
    pub id: u64,
    /// `instance_type`, `group_type` or `project_type`.
    pub runner_type: String,
    /// Where it belongs.
    pub scope: Scope,
    /// Description.
    pub description: String,
    /// Tags.
    pub tag_list: Vec<String>,
    /// Picks untagged jobs.
    pub run_untagged: bool,
    /// Paused.
    pub paused: bool,
    /// Locked to its projects.
    pub locked: bool,
    /// `not_protected` or `ref_protected`.
    pub access_level: String,
    /// Maximum job timeout in seconds.
    pub maximum_timeout: Option<u64>,
    /// Authentication token (`glrt-…`).
    pub token: String,
    /// Creator.
    pub created_by: u64,
}

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
    addr: SocketAddr,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
    /// The server's own runtime, so that a test blocking its thread (e.g.
    /// running `git` with `std::process`) cannot starve the server.
    runtime: Option<tokio::runtime::Runtime>,
    _tmp: tempfile::TempDir,
}

#[derive(Debug)]
struct Inner {
    url: String,
    repos: PathBuf,
    home: PathBuf,
    state: Mutex<State>,
    log: Mutex<Vec<LoggedRequest>>,
    faults: Mutex<Vec<Fault>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
            url,
            repos,
            home,
            state: Mutex::new(state),
            log: Mutex::new(Vec::new()),
            faults: Mutex::new(Vec::new()),
        });
        let served = inner.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let inner = served.clone();
            async move { Ok::<_, Infallible>(inner.handle(req).await) }
        });
        let task = runtime.spawn(async move {
            let Ok(listener) = TcpListener::from_std(std_listener) else { return };
            bidsflux_testsupport::serve(listener, service).await;
        });
        Ok(Self { addr, inner, task, runtime: Some(runtime), _tmp: tmp })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.inner.url.clone()
    }

    /// `127.0.0.1:PORT`, the host to give `gitlab::GitlabBuilder::new` (with `.insecure()`).
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving (an outage); state and repositories stay until drop.
    pub fn stop(&self) {
        self.task.abort();
    }

    /// Token of the admin user `root` (all scopes).
    pub fn admin_token(&self) -> String {
        lock(&self.inner.state).admin_token.clone()
    }

    /// Id of the admin user `root`.
    pub fn admin_id(&self) -> u64 {
        lock(&self.inner.state).admin_id
    }

    /// Creates a user (or reuses one of that name) and gives it a new token
    /// with all scopes. Returns `(user id, token)`.
    pub fn add_user(&self, username: &str, admin: bool) -> (u64, String) {
        let mut st = lock(&self.inner.state);
        let id = match st.users.iter().find(|u| u.username.eq_ignore_ascii_case(username)) {
            Some(u) => u.id,
            None => st.insert_user(username, username, &format!("{username}@example.com"), admin),
        };
        let token = st.insert_token(id, &format!("{username}-token"), &ALL_SCOPES, None).token;
        (id, token)
    }

    /// A new token for a user with the given scopes and expiry date (`YYYY-MM-DD`).
    pub fn add_token(&self, user_id: u64, scopes: &[&str], expires_at: Option<&str>) -> String {
        lock(&self.inner.state).insert_token(user_id, "seeded", scopes, expires_at.map(str::to_owned)).token
    }

    /// Registers an SSH public key (`ssh-ed25519 AAAA...`) of a user, as
    /// `POST /users/:id/keys` would; returns the key id. Keys added before
    /// [`FakeGitlab::start_ssh`] may log in.
    pub fn add_ssh_key(&self, user_id: u64, public_key: &str) -> u64 {
        let mut st = lock(&self.inner.state);
        let id = st.next();
        st.ssh_keys.push((id, user_id, public_key.trim().to_owned()));
        id
    }

    /// Creates the groups of `full_path` that are missing (private, owned by
    /// `root`) and returns the id of the last one.
    pub fn add_group(&self, full_path: &str) -> anyhow::Result<u64> {
        let mut st = lock(&self.inner.state);
        let admin = st.admin_id;
        let mut parent: Option<u64> = None;
        let mut prefix = String::new();
        for part in full_path.split('/').filter(|p| !p.is_empty()) {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            let id = match st.group_by_path(&prefix) {
                Some(g) => g.id,
                None => st.create_group(Some(admin), part, part, parent, "private", "").map_err(anyhow_err)?.id,
            };
            parent = Some(id);
        }
        parent.ok_or_else(|| anyhow::anyhow!("empty group path"))
    }

    /// Creates a project (and its bare repository) at `path_with_namespace`
    /// in an existing group or personal namespace, with `main` as the default
    /// branch and an empty repository.
    pub fn add_project(&self, path_with_namespace: &str) -> anyhow::Result<u64> {
        let (ns, path) = path_with_namespace
            .rsplit_once('/')
            .ok_or_else(|| anyhow::anyhow!("{path_with_namespace}: no namespace"))?;
        let mut st = lock(&self.inner.state);
        let ns_id = st.namespace_by_ref(ns).ok_or_else(|| anyhow::anyhow!("namespace {ns} not found"))?.0;
        let admin = st.admin_id;
        let env = self.inner.env();
        let p = st.create_project(&env, admin, path, path, ns_id, "main", "private", "", false).map_err(anyhow_err)?;
        Ok(p.id)
    }

    /// Sets (adds or changes) a direct membership of a group (by full path) or
    /// project (by path with namespace): `target` is tried as a group first.
    pub fn set_member(&self, target: &str, user_id: u64, access_level: u64) -> anyhow::Result<()> {
        let mut st = lock(&self.inner.state);
        let source = if let Some(g) = st.group_by_path(target) {
            Scope::Group(g.id)
        } else if let Some(p) = st.project_by_path(target) {
            Scope::Project(p.id)
        } else {
            anyhow::bail!("{target}: no such group or project");
        };
        let now = now_iso();
        match st.members.iter_mut().find(|m| m.source == source && m.user_id == user_id) {
            Some(m) => m.access_level = access_level,
            None => st.members.push(Member { source, user_id, access_level, expires_at: None, created_at: now }),
        }
        Ok(())
    }

    /// All users.
    pub fn users(&self) -> Vec<User> {
        lock(&self.inner.state).users.clone()
    }

    /// A user by name.
    pub fn user(&self, username: &str) -> Option<User> {
        lock(&self.inner.state).users.iter().find(|u| u.username.eq_ignore_ascii_case(username)).cloned()
    }

    /// All personal access tokens.
    pub fn tokens(&self) -> Vec<PersonalAccessToken> {
        lock(&self.inner.state).tokens.clone()
    }

    /// All groups, in creation order.
    pub fn groups(&self) -> Vec<Group> {
        lock(&self.inner.state).groups.clone()
    }

    /// A group by full path (case-insensitive, like GitLab's routes).
    pub fn group(&self, full_path: &str) -> Option<Group> {
        lock(&self.inner.state).group_by_path(full_path).cloned()
    }

    /// All projects, in creation order.
    pub fn projects(&self) -> Vec<Project> {
        lock(&self.inner.state).projects.clone()
    }

    /// A project by path with namespace.
    pub fn project(&self, path_with_namespace: &str) -> Option<Project> {
        lock(&self.inner.state).project_by_path(path_with_namespace).cloned()
    }

    /// Direct members of a group (full path) or else a project (path with namespace).
    pub fn members(&self, target: &str) -> Vec<Member> {
        let st = lock(&self.inner.state);
        let source = match (st.group_by_path(target), st.project_by_path(target)) {
            (Some(g), _) => Scope::Group(g.id),
            (None, Some(p)) => Scope::Project(p.id),
            (None, None) => return Vec::new(),
        };
        st.members.iter().filter(|m| m.source == source).cloned().collect()
    }

    /// The level a user has in a group or project, inherited memberships
    /// included (0: none; admins are not counted).
    pub fn access_level(&self, target: &str, user_id: u64) -> u64 {
        let st = lock(&self.inner.state);
        match (st.group_by_path(target), st.project_by_path(target)) {
            (Some(g), _) => st.group_level(g.id, user_id),
            (None, Some(p)) => st.project_level(p.id, user_id),
            (None, None) => 0,
        }
    }

    /// Protected branch rules of a project.
    pub fn protected_branches(&self, path_with_namespace: &str) -> Vec<ProtectedBranch> {
        let st = lock(&self.inner.state);
        let Some(p) = st.project_by_path(path_with_namespace) else { return Vec::new() };
        st.protected.iter().filter(|b| b.project_id == p.id).cloned().collect()
    }

    /// CI/CD variables of the instance (`None`), or of a group (full path) or
    /// else a project (path with namespace).
    pub fn variables(&self, target: Option<&str>) -> Vec<Variable> {
        let st = lock(&self.inner.state);
        let scope = match target {
            None => Scope::Instance,
            Some(t) => match (st.group_by_path(t), st.project_by_path(t)) {
                (Some(g), _) => Scope::Group(g.id),
                (None, Some(p)) => Scope::Project(p.id),
                (None, None) => return Vec::new(),
            },
        };
        st.variables.iter().filter(|v| v.scope == scope).cloned().collect()
    }

    /// All runners.
    pub fn runners(&self) -> Vec<Runner> {
        lock(&self.inner.state).runners.clone()
    }

    /// The bare repository of a project.
    pub fn repo_dir(&self, path_with_namespace: &str) -> Option<PathBuf> {
        let st = lock(&self.inner.state);
        st.project_by_path(path_with_namespace).map(|p| self.inner.repos.join(format!("{}.git", p.path_with_namespace)))
    }

    /// `http://oauth2:<token>@127.0.0.1:PORT/<path_with_namespace>.git`.
    pub fn git_url(&self, path_with_namespace: &str, token: &str) -> String {
        format!("http://oauth2:{token}@{}/{path_with_namespace}.git", self.addr)
    }

    /// Every request so far as `(method, path)`, path as received without the query.
    pub fn requests(&self) -> Vec<(String, String)> {
        lock(&self.inner.log).iter().map(|r| (r.method.clone(), r.path.clone())).collect()
    }

    /// Every request so far with its query and response status.
    pub fn request_log(&self) -> Vec<LoggedRequest> {
        lock(&self.inner.log).clone()
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

impl Drop for FakeGitlab {
    fn drop(&mut self) {
        self.task.abort();
        // Dropping a runtime blocks, which is not allowed in async code.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn anyhow_err(e: ApiErr) -> anyhow::Error {
    anyhow::anyhow!("{} {}", e.status, e.body)
}

// ---------------------------------------------------------------------------
// Request handling

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never: Infallible| match never {}).boxed_unsync()
}

fn json_response(status: u16, body: &Value, headers: Vec<(String, String)>) -> Response<Body> {
    let mut resp = Response::new(full(body.to_string()));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = resp.headers_mut();
    h.insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    for (k, v) in headers {
        if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(&v)) {
            h.append(k, v);
        }
    }
    resp
}

fn text_response(status: u16, text: &str, www_authenticate: bool) -> Response<Body> {
    let mut resp = Response::new(full(text.to_owned()));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    if www_authenticate {
        resp.headers_mut().insert(hyper::header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"GitLab\""));
    }
    resp
}

fn reason(status: u16) -> &'static str {
    StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("Error")
}

fn decode(seg: &str) -> String {
    percent_encoding::percent_decode_str(seg).decode_utf8_lossy().into_owned()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GitAction {
    InfoRefs,
    UploadPack,
    ReceivePack,
}

fn git_route(path: &str) -> Option<(String, GitAction)> {
    let actions = [
        ("/info/refs", GitAction::InfoRefs),
        ("/git-upload-pack", GitAction::UploadPack),
        ("/git-receive-pack", GitAction::ReceivePack),
    ];
    for (suffix, action) in actions {
        if let Some(repo) = path.strip_suffix(suffix) {
            let repo = decode(repo.trim_start_matches('/'));
            let repo = repo.strip_suffix(".git").unwrap_or(&repo).to_owned();
            if !repo.is_empty() {
                return Some((repo, action));
            }
        }
    }
    None
}

/// What the handlers need besides the state.
#[derive(Debug)]
struct Env {
    repos: PathBuf,
}

impl Inner {
    fn env(&self) -> Env {
        Env { repos: self.repos.clone() }
    }

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
            return self.api(req, method, rest, path, query).await;
        }
        if let Some((repo, action)) = git_route(path) {
            return self.git_http(req, &repo, action, query).await;
        }
        if path == SSH_ALLOWED_PATH && method == "GET" {
            return self.ssh_allowed(query);
        }
        json_response(404, &json!({"error": "404 Not Found"}), Vec::new())
    }

    async fn api(
        &self,
        req: Request<Incoming>,
        method: &str,
        rest: &str,
        path: &str,
        query: Option<&str>,
    ) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let bytes = match Limited::new(body, 64 << 20).collect().await {
            Ok(c) => c.to_bytes(),
            Err(_) => return json_response(400, &json!({"error": "the request body could not be read"}), Vec::new()),
        };
        let content_type = parts.headers.get(hyper::header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
        let params = match Params::parse(query, content_type, &bytes) {
            Ok(p) => p,
            Err(e) => return json_response(e.status, &e.body, Vec::new()),
        };
        let token = parts
            .headers
            .get("private-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or_else(|| {
                let v = parts.headers.get(hyper::header::AUTHORIZATION)?.to_str().ok()?;
                let (scheme, t) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| t.trim().to_owned())
            })
            .or_else(|| params.str("private_token"));
        let segs: Vec<String> = rest.split('/').filter(|s| !s.is_empty()).map(decode).collect();
        let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
        let env = self.env();
        let result = {
            let mut st = lock(&self.state);
            let auth = st.authenticate(token.as_deref(), method);
            st.dispatch(&env, &auth, method, &segs, &params)
        };
        match result {
            Ok(Reply::Json(status, v)) => json_response(status, &v, Vec::new()),
            Ok(Reply::Empty) => {
                let mut resp = Response::new(full(Bytes::new()));
                *resp.status_mut() = StatusCode::NO_CONTENT;
                resp
            }
            Ok(Reply::List(items)) => {
                let (page, headers) = paginate(items, &params, &format!("{}{path}", self.url), query);
                json_response(200, &Value::Array(page), headers)
            }
            Err(e) => json_response(e.status, &e.body, Vec::new()),
        }
    }

    async fn git_http(
        &self,
        req: Request<Incoming>,
        repo: &str,
        action: GitAction,
        query: Option<&str>,
    ) -> Response<Body> {
        let service = match action {
            GitAction::InfoRefs => form_urlencoded::parse(query.unwrap_or("").as_bytes())
                .find(|(k, _)| k == "service")
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default(),
            GitAction::UploadPack => "git-upload-pack".to_owned(),
            GitAction::ReceivePack => "git-receive-pack".to_owned(),
        };
        let push = match service.as_str() {
            "git-upload-pack" => false,
            "git-receive-pack" => true,
            _ => return text_response(403, "Only the smart HTTP protocol is supported.", false),
        };
        let creds = basic_credentials(req.headers());
        let grant = match lock(&self.state).git_access(repo, creds.as_ref(), push) {
            Ok(g) => g,
            Err((status, text)) => return text_response(status, text, status == 401),
        };
        match self.run_backend(req, &grant, action, query).await {
            Ok(resp) => resp,
            Err(e) => {
                tracing::warn!("fake gitlab: git http-backend failed: {e:#}");
                text_response(500, "git http-backend failed", false)
            }
        }
    }

    /// The fake's stand-in for gitlab-shell's `/api/v4/internal/allowed`:
    /// the forced command of an SSH key asks whether its user may run
    /// `service` on `project`. Answers `ok` and the protected-branch lines
    /// for the pre-receive hook, or `denied: <GitLab's message>` (always 200,
    /// so the shell script reads the message).
    fn ssh_allowed(&self, query: Option<&str>) -> Response<Body> {
        let params: std::collections::HashMap<String, String> =
            form_urlencoded::parse(query.unwrap_or("").as_bytes()).into_owned().collect();
        let get = |k: &str| params.get(k).map(String::as_str).unwrap_or_default();
        let push = match get("service") {
            "git-receive-pack" => true,
            "git-upload-pack" => false,
            _ => return text_response(200, "denied: only git fetch and push are served over SSH", false),
        };
        let st = lock(&self.state);
        let key_id: u64 = get("key_id").parse().unwrap_or(0);
        let Some(user) = st
            .ssh_keys
            .iter()
            .find(|(id, _, _)| *id == key_id)
            .and_then(|(_, user_id, _)| st.users.iter().find(|u| u.id == *user_id))
            .cloned()
        else {
            return text_response(200, "denied: unknown SSH key", false);
        };
        // SSH keys are not scoped: the user's role decides.
        let scopes = vec!["read_repository".to_owned(), "write_repository".to_owned()];
        match st.git_grant(get("project").trim_end_matches(".git"), AuthUser { user, scopes, token_id: 0 }, push) {
            Ok(grant) => text_response(200, &format!("ok\n{}", grant.protected), false),
            Err((_, message)) => text_response(200, &format!("denied: {message}"), false),
        }
    }

    async fn run_backend(
        &self,
        req: Request<Incoming>,
        grant: &GitGrant,
        action: GitAction,
        query: Option<&str>,
    ) -> anyhow::Result<Response<Body>> {
        let (parts, body) = req.into_parts();
        let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let suffix = match action {
            GitAction::InfoRefs => "info/refs",
            GitAction::UploadPack => "git-upload-pack",
            GitAction::ReceivePack => "git-receive-pack",
        };
        let mut cmd = tokio::process::Command::new("git");
        cmd.arg("http-backend")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &self.home)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_PROJECT_ROOT", &self.repos)
            .env("GIT_HTTP_EXPORT_ALL", "1")
            .env("PATH_INFO", format!("/{}.git/{suffix}", grant.path_with_namespace))
            .env("QUERY_STRING", query.unwrap_or(""))
            .env("REQUEST_METHOD", parts.method.as_str())
            .env("CONTENT_TYPE", header("content-type").unwrap_or_default())
            .env("REMOTE_USER", &grant.username)
            .env("REMOTE_ADDR", "127.0.0.1")
            .env("FAKE_GITLAB_PROTECTED", &grant.protected)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(len) = header("content-length") {
            cmd.env("CONTENT_LENGTH", len);
        }
        if let Some(enc) = header("content-encoding") {
            cmd.env("HTTP_CONTENT_ENCODING", enc);
        }
        if let Some(proto) = header("git-protocol") {
            cmd.env("HTTP_GIT_PROTOCOL", proto);
        }
        let mut child = cmd.spawn()?;
        let (Some(mut stdin), Some(mut stdout), Some(mut stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            anyhow::bail!("git http-backend pipes missing");
        };
        // Request body → CGI stdin, frame by frame (pushes can be large).
        tokio::spawn(async move {
            let mut body = body;
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else { break };
                if let Ok(data) = frame.into_data()
                    && stdin.write_all(&data).await.is_err()
                {
                    break;
                }
            }
            let _ = stdin.shutdown().await;
        });
        let stderr_task = tokio::spawn(async move {
            let mut buf = Vec::new();
            let _ = (&mut stderr).take(64 << 10).read_to_end(&mut buf).await;
            let mut sink = tokio::io::sink();
            let _ = tokio::io::copy(&mut stderr, &mut sink).await;
            String::from_utf8_lossy(&buf).into_owned()
        });
        // CGI response headers.
        let mut buf = Vec::with_capacity(8192);
        let mut chunk = vec![0u8; 64 << 10];
        let (head_end, body_start) = loop {
            if let Some(found) = header_end(&buf) {
                break found;
            }
            let n = stdout.read(&mut chunk).await?;
            if n == 0 {
                let _ = child.wait().await;
                let err = stderr_task.await.unwrap_or_default();
                anyhow::bail!("no CGI headers from git http-backend: {err}");
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.len() > 1 << 20 {
                anyhow::bail!("CGI headers too long");
            }
        };
        let mut resp_builder = Response::builder();
        let mut status = 200u16;
        for line in String::from_utf8_lossy(&buf[..head_end]).lines() {
            let Some((name, value)) = line.split_once(':') else { continue };
            let value = value.trim();
            if name.eq_ignore_ascii_case("status") {
                status = value.split_whitespace().next().and_then(|s| s.parse().ok()).unwrap_or(500);
            } else {
                resp_builder = resp_builder.header(name.trim(), value);
            }
        }
        let rest = buf.split_off(body_start);
        // CGI stdout → response body, streamed.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(8);
        tokio::spawn(async move {
            let mut ok = rest.is_empty() || tx.send(Ok(Frame::data(Bytes::from(rest)))).await.is_ok();
            while ok {
                match stdout.read(&mut chunk).await {
                    Ok(0) => break,
                    Ok(n) => ok = tx.send(Ok(Frame::data(Bytes::copy_from_slice(&chunk[..n])))).await.is_ok(),
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        ok = false;
                    }
                }
            }
            if !ok {
                let _ = child.start_kill();
            }
            let exit = child.wait().await;
            let err = stderr_task.await.unwrap_or_default();
            if !err.trim().is_empty() || !exit.as_ref().is_ok_and(|s| s.success()) {
                tracing::debug!("fake gitlab: git http-backend exited {exit:?}: {err}");
            }
        });
        let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
        let resp = resp_builder.status(status).body(StreamBody::new(stream).boxed_unsync())?;
        Ok(resp)
    }
}

/// End of the CGI header block: (end of headers, start of body).
fn header_end(buf: &[u8]) -> Option<(usize, usize)> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| (i, i + 4));
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| (i, i + 2));
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

fn basic_credentials(headers: &hyper::HeaderMap) -> Option<(String, String)> {
    let v = headers.get(hyper::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, b64) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok()?;
    let raw = String::from_utf8(raw).ok()?;
    let (user, pass) = raw.split_once(':')?;
    Some((user.to_owned(), pass.to_owned()))
}

/// Offset or keyset pagination of a full list, with GitLab's headers.
fn paginate(
    items: Vec<Value>,
    params: &Params,
    self_url: &str,
    query: Option<&str>,
) -> (Vec<Value>, Vec<(String, String)>) {
    let per_page =
        params.str("per_page").and_then(|s| s.parse::<usize>().ok()).filter(|n| *n > 0).unwrap_or(20).min(100);
    let link = |replace: &[(&str, String)]| {
        let drop: Vec<&str> = replace.iter().map(|(k, _)| *k).collect();
        let mut ser = form_urlencoded::Serializer::new(String::new());
        for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            if !drop.contains(&k.as_ref()) {
                ser.append_pair(&k, &v);
            }
        }
        for (k, v) in replace {
            ser.append_pair(k, v);
        }
        format!("{self_url}?{}", ser.finish())
    };
    let total = items.len();
    if params.str("pagination").as_deref() == Some("keyset") {
        let start = params
            .str("cursor")
            .and_then(|c| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(c).ok())
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.strip_prefix("offset:").and_then(|n| n.parse::<usize>().ok()))
            .unwrap_or(0);
        let page: Vec<Value> = items.into_iter().skip(start).take(per_page).collect();
        let mut headers = Vec::new();
        let next = start + page.len();
        if next < total {
            let cursor = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("offset:{next}"));
            headers.push(("Link".to_owned(), format!("<{}>; rel=\"next\"", link(&[("cursor", cursor)]))));
        }
        return (page, headers);
    }
    let page_no = params.str("page").and_then(|s| s.parse::<usize>().ok()).filter(|n| *n > 0).unwrap_or(1);
    let total_pages = total.div_ceil(per_page).max(1);
    let page: Vec<Value> = items.into_iter().skip((page_no - 1).saturating_mul(per_page)).take(per_page).collect();
    let next = (page_no < total_pages).then_some(page_no + 1);
    let prev = (page_no > 1).then(|| (page_no - 1).min(total_pages));
    let at = |n: usize| link(&[("page", n.to_string()), ("per_page", per_page.to_string())]);
    let mut links = Vec::new();
    if let Some(p) = prev {
        links.push(format!("<{}>; rel=\"prev\"", at(p)));
    }
    if let Some(n) = next {
        links.push(format!("<{}>; rel=\"next\"", at(n)));
    }
    links.push(format!("<{}>; rel=\"first\"", at(1)));
    links.push(format!("<{}>; rel=\"last\"", at(total_pages)));
    let opt = |o: Option<usize>| o.map(|n| n.to_string()).unwrap_or_default();
    let headers = vec![
        ("X-Page".to_owned(), page_no.to_string()),
        ("X-Per-Page".to_owned(), per_page.to_string()),
        ("X-Total".to_owned(), total.to_string()),
        ("X-Total-Pages".to_owned(), total_pages.to_string()),
        ("X-Next-Page".to_owned(), opt(next)),
        ("X-Prev-Page".to_owned(), opt(prev)),
        ("Link".to_owned(), links.join(", ")),
    ];
    (page, headers)
}

// ---------------------------------------------------------------------------
// Parameters: query string, JSON body or form body, merged (body last).

#[derive(Debug, Default)]
struct Params {
    pairs: Vec<(String, Value)>,
}

impl Params {
    fn parse(query: Option<&str>, content_type: Option<&str>, body: &[u8]) -> Result<Self, ApiErr> {
        let mut pairs: Vec<(String, Value)> = form_urlencoded::parse(query.unwrap_or("").as_bytes())
            .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
            .collect();
        let ct = content_type.unwrap_or("").to_ascii_lowercase();
        if !body.iter().all(u8::is_ascii_whitespace) {
            if ct.starts_with("application/json") || (ct.is_empty() && body.first() == Some(&b'{')) {
                match serde_json::from_slice::<Value>(body) {
                    Ok(Value::Object(map)) => pairs.extend(map),
                    _ => {
                        return Err(ApiErr::error(
                            400,
                            "The provided content-type 'application/json' is not supported.",
                        ));
                    }
                }
            } else if ct.starts_with("multipart/") {
                return Err(ApiErr::error(415, "multipart bodies are not supported by the fake GitLab"));
            } else {
                pairs
                    .extend(form_urlencoded::parse(body).map(|(k, v)| (k.into_owned(), Value::String(v.into_owned()))));
            }
        }
        Ok(Self { pairs })
    }

    fn raw(&self, key: &str) -> Option<&Value> {
        self.pairs.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    fn str(&self, key: &str) -> Option<String> {
        match self.raw(key)? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }

    fn required(&self, key: &str) -> Result<String, ApiErr> {
        self.str(key).filter(|s| !s.is_empty()).ok_or_else(|| ApiErr::missing(key))
    }

    fn u64(&self, key: &str) -> Result<Option<u64>, ApiErr> {
        match self.str(key).filter(|s| !s.is_empty()) {
            None => Ok(None),
            Some(s) => s.trim().parse().map(Some).map_err(|_| ApiErr::invalid(key)),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, ApiErr> {
        match self.str(key).filter(|s| !s.is_empty()).map(|s| s.to_ascii_lowercase()) {
            None => Ok(None),
            Some(s) => match s.as_str() {
                "true" | "1" | "t" | "yes" => Ok(Some(true)),
                "false" | "0" | "f" | "no" => Ok(Some(false)),
                _ => Err(ApiErr::invalid(key)),
            },
        }
    }

    /// `key[]=a&key[]=b`, a JSON array, or `key=a,b`.
    fn list(&self, key: &str) -> Vec<String> {
        let bracket = format!("{key}[]");
        let mut out = Vec::new();
        for (k, v) in &self.pairs {
            if k == &bracket {
                if let Some(s) = v.as_str() {
                    out.push(s.to_owned());
                }
            } else if k == key {
                match v {
                    Value::Array(a) => out.extend(a.iter().filter_map(|x| x.as_str().map(str::to_owned))),
                    Value::String(s) => {
                        out.extend(s.split(',').map(str::trim).filter(|t| !t.is_empty()).map(str::to_owned))
                    }
                    _ => {}
                }
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------
// Errors and replies

#[derive(Debug, Clone)]
struct ApiErr {
    status: u16,
    body: Value,
}

impl ApiErr {
    fn message(status: u16, message: impl Into<String>) -> Self {
        Self { status, body: json!({ "message": message.into() }) }
    }
    fn error(status: u16, error: impl Into<String>) -> Self {
        Self { status, body: json!({ "error": error.into() }) }
    }
    fn not_found(what: &str) -> Self {
        Self::message(404, format!("404 {what} Not Found"))
    }
    fn forbidden() -> Self {
        Self::message(403, "403 Forbidden")
    }
    fn unauthorized() -> Self {
        Self::message(401, "401 Unauthorized")
    }
    fn missing(param: &str) -> Self {
        Self::error(400, format!("{param} is missing"))
    }
    fn invalid(param: &str) -> Self {
        Self::error(400, format!("{param} does not have a valid value"))
    }
    /// A model validation error: `{"message":{"field":["text"]}}`.
    fn validation(field: &str, text: &str) -> Self {
        Self { status: 400, body: json!({ "message": { field: [text] } }) }
    }
    fn route() -> Self {
        Self::error(404, "404 Not Found")
    }
}

#[derive(Debug)]
enum Reply {
    Json(u16, Value),
    List(Vec<Value>),
    Empty,
}

fn ok(v: Value) -> Result<Reply, ApiErr> {
    Ok(Reply::Json(200, v))
}

fn created(v: Value) -> Result<Reply, ApiErr> {
    Ok(Reply::Json(201, v))
}

// ---------------------------------------------------------------------------
// State

const ALL_SCOPES: [&str; 8] = [
    "api",
    "read_api",
    "read_user",
    "read_repository",
    "write_repository",
    "read_registry",
    "write_registry",
    "admin_mode",
];

const VALID_SCOPES: [&str; 13] = [
    "api",
    "read_api",
    "read_user",
    "create_runner",
    "manage_runner",
    "k8s_proxy",
    "read_repository",
    "write_repository",
    "read_registry",
    "write_registry",
    "ai_features",
    "sudo",
    "admin_mode",
];

const PATH_RULE: &str =
    "can contain only letters, digits, '_', '-' and '.'; cannot start with '-' or end in '.', '.git' or '.atom'";

const RESERVED_TOP_LEVEL: [&str; 12] =
    ["-", "admin", "api", "assets", "dashboard", "explore", "groups", "help", "projects", "public", "uploads", "users"];

#[derive(Debug, Default)]
struct State {
    url: String,
    admin_token: String,
    admin_id: u64,
    users: Vec<User>,
    tokens: Vec<PersonalAccessToken>,
    groups: Vec<Group>,
    projects: Vec<Project>,
    members: Vec<Member>,
    protected: Vec<ProtectedBranch>,
    variables: Vec<Variable>,
    runners: Vec<Runner>,
    /// SSH keys: `(key id, user id, public key)`.
    ssh_keys: Vec<(u64, u64, String)>,
    next_id: u64,
}

#[derive(Debug, Clone)]
struct AuthUser {
    user: User,
    scopes: Vec<String>,
    token_id: u64,
}

/// What a git request may do.
#[derive(Debug)]
struct GitGrant {
    path_with_namespace: String,
    username: String,
    /// Lines `<may push 0|1> <may force 0|1> <pattern>` for the pre-receive hook.
    protected: String,
}

fn valid_path(path: &str) -> bool {
    let ok_chars = path.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    ok_chars
        && !path.is_empty()
        && path.len() <= 255
        && !path.starts_with('-')
        && !path.ends_with('.')
        && !path.ends_with(".git")
        && !path.ends_with(".atom")
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_alphanumeric() || c == '_')
        && chars.all(|c| c.is_alphanumeric() || matches!(c, '_' | '.' | '-' | ' ' | '(' | ')' | '+'))
}

fn visibility_param(params: &Params, default: &str) -> Result<String, ApiErr> {
    let v = params.str("visibility").unwrap_or_else(|| default.to_owned());
    match v.as_str() {
        "private" | "internal" | "public" => Ok(v),
        _ => Err(ApiErr::invalid("visibility")),
    }
}

fn access_description(level: u64) -> &'static str {
    match level {
        0 => "No one",
        30 => "Developers + Maintainers",
        40 => "Maintainers",
        60 => "Admins",
        _ => "Custom",
    }
}

/// GitLab's protected branch wildcard: `*` matches any run of characters.
fn wildcard_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// The pattern for a shell `case`: only `*` stays special.
fn shell_pattern(pattern: &str) -> String {
    let mut out = String::new();
    for c in pattern.chars() {
        if matches!(c, '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn random_token(prefix: &str) -> String {
    let a = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}{}", &a[..20])
}

fn ci_eq(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

impl State {
    fn next(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn insert_user(&mut self, username: &str, name: &str, email: &str, admin: bool) -> u64 {
        let id = self.users.iter().map(|u| u.id).max().unwrap_or(0) + 1;
        let namespace_id = self.next();
        self.users.push(User {
            id,
            username: username.to_owned(),
            name: name.to_owned(),
            email: email.to_owned(),
            admin,
            namespace_id,
            created_at: now_iso(),
        });
        id
    }

    fn insert_token(
        &mut self,
        user_id: u64,
        name: &str,
        scopes: &[&str],
        expires_at: Option<String>,
    ) -> PersonalAccessToken {
        let t = PersonalAccessToken {
            id: self.tokens.len() as u64 + 1,
            user_id,
            name: name.to_owned(),
            token: random_token("glpat-"),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            expires_at,
            revoked: false,
            created_at: now_iso(),
        };
        self.tokens.push(t.clone());
        t
    }

    fn token_user(&self, token: &str) -> Option<AuthUser> {
        let today = today();
        let t = self.tokens.iter().find(|t| t.token == token)?;
        if t.revoked || t.expires_at.as_deref().is_some_and(|e| e <= today.as_str()) {
            return None;
        }
        let user = self.users.iter().find(|u| u.id == t.user_id)?.clone();
        Some(AuthUser { user, scopes: t.scopes.clone(), token_id: t.id })
    }

    fn authenticate(&self, token: Option<&str>, method: &str) -> Result<AuthUser, ApiErr> {
        let a = token.and_then(|t| self.token_user(t)).ok_or_else(ApiErr::unauthorized)?;
        let has = |s: &str| a.scopes.iter().any(|x| x == s);
        if has("api") || (method == "GET" && has("read_api")) {
            Ok(a)
        } else {
            Err(ApiErr {
                status: 403,
                body: json!({
                    "error": "insufficient_scope",
                    "error_description": "The request requires higher privileges than provided by the access token.",
                    "scope": "api read_api",
                }),
            })
        }
    }

    // --- lookups -----------------------------------------------------------

    fn group_by_id(&self, id: u64) -> Option<&Group> {
        self.groups.iter().find(|g| g.id == id)
    }

    fn group_by_path(&self, full_path: &str) -> Option<&Group> {
        let p = full_path.trim_matches('/');
        self.groups.iter().find(|g| ci_eq(&g.full_path, p))
    }

    fn group_by_ref(&self, r: &str) -> Option<&Group> {
        match r.parse::<u64>() {
            Ok(id) => self.group_by_id(id),
            Err(_) => self.group_by_path(r),
        }
    }

    fn project_by_path(&self, pwn: &str) -> Option<&Project> {
        let p = pwn.trim_matches('/');
        let p = p.strip_suffix(".git").unwrap_or(p);
        self.projects.iter().find(|x| ci_eq(&x.path_with_namespace, p))
    }

    fn project_by_ref(&self, r: &str) -> Option<&Project> {
        match r.parse::<u64>() {
            Ok(id) => self.projects.iter().find(|p| p.id == id),
            Err(_) => self.project_by_path(r),
        }
    }

    fn user_by_ref(&self, r: &str) -> Option<&User> {
        match r.parse::<u64>() {
            Ok(id) => self.users.iter().find(|u| u.id == id),
            Err(_) => self.users.iter().find(|u| ci_eq(&u.username, r)),
        }
    }

    /// `(namespace id, full path, kind, Some(group))` for a group or personal namespace.
    fn namespace_by_ref(&self, r: &str) -> Option<(u64, String, &'static str)> {
        if let Ok(id) = r.parse::<u64>() {
            if let Some(g) = self.group_by_id(id) {
                return Some((g.id, g.full_path.clone(), "group"));
            }
            return self.users.iter().find(|u| u.namespace_id == id).map(|u| (id, u.username.clone(), "user"));
        }
        if let Some(g) = self.group_by_path(r) {
            return Some((g.id, g.full_path.clone(), "group"));
        }
        self.users.iter().find(|u| ci_eq(&u.username, r)).map(|u| (u.namespace_id, u.username.clone(), "user"))
    }

    fn namespace_owner(&self, ns: u64) -> Option<&User> {
        self.users.iter().find(|u| u.namespace_id == ns)
    }

    /// The group and its ancestors, nearest first.
    fn ancestors(&self, gid: u64) -> Vec<&Group> {
        let mut out = Vec::new();
        let mut cur = self.group_by_id(gid);
        while let Some(g) = cur {
            if out.len() > 100 {
                break;
            }
            out.push(g);
            cur = g.parent_id.and_then(|p| self.group_by_id(p));
        }
        out
    }

    fn is_descendant(&self, gid: u64, ancestor: u64) -> bool {
        self.ancestors(gid).iter().any(|g| g.id == ancestor)
    }

    // --- permissions -------------------------------------------------------

    fn direct_level(&self, source: Scope, uid: u64) -> Option<u64> {
        self.members.iter().find(|m| m.source == source && m.user_id == uid).map(|m| m.access_level)
    }

    fn group_level(&self, gid: u64, uid: u64) -> u64 {
        self.ancestors(gid).iter().filter_map(|g| self.direct_level(Scope::Group(g.id), uid)).max().unwrap_or(0)
    }

    fn project_level(&self, pid: u64, uid: u64) -> u64 {
        let Some(p) = self.projects.iter().find(|p| p.id == pid) else { return 0 };
        let direct = self.direct_level(Scope::Project(pid), uid).unwrap_or(0);
        let inherited = if self.group_by_id(p.namespace_id).is_some() {
            self.group_level(p.namespace_id, uid)
        } else if self.namespace_owner(p.namespace_id).is_some_and(|u| u.id == uid) {
            access::OWNER
        } else {
            0
        };
        direct.max(inherited)
    }

    fn level(&self, source: Scope, uid: u64) -> u64 {
        match source {
            Scope::Group(g) => self.group_level(g, uid),
            Scope::Project(p) => self.project_level(p, uid),
            Scope::Instance => 0,
        }
    }

    /// The level a user acts with: admins act as [`access::ADMIN`].
    fn role(&self, u: &User, source: Scope) -> u64 {
        if u.admin { access::ADMIN } else { self.level(source, u.id) }
    }

    fn can_see_group(&self, u: &User, g: &Group) -> bool {
        if u.admin || g.visibility != "private" || self.group_level(g.id, u.id) > 0 {
            return true;
        }
        // Members of a descendant group or project see the ancestors.
        self.members.iter().any(|m| {
            m.user_id == u.id
                && match m.source {
                    Scope::Group(d) => self.is_descendant(d, g.id),
                    Scope::Project(p) => {
                        self.projects.iter().any(|x| x.id == p && self.is_descendant(x.namespace_id, g.id))
                    }
                    Scope::Instance => false,
                }
        })
    }

    fn can_see_project(&self, u: &User, p: &Project) -> bool {
        u.admin || p.visibility != "private" || self.project_level(p.id, u.id) > 0
    }

    fn find_group(&self, u: &User, r: &str) -> Result<Group, ApiErr> {
        match self.group_by_ref(r) {
            Some(g) if self.can_see_group(u, g) => Ok(g.clone()),
            _ => Err(ApiErr::not_found("Group")),
        }
    }

    fn find_project(&self, u: &User, r: &str) -> Result<Project, ApiErr> {
        match self.project_by_ref(r) {
            Some(p) if self.can_see_project(u, p) => Ok(p.clone()),
            _ => Err(ApiErr::not_found("Project")),
        }
    }

    fn find_source(&self, u: &User, kind: &str, r: &str) -> Result<Scope, ApiErr> {
        if kind == "groups" {
            Ok(Scope::Group(self.find_group(u, r)?.id))
        } else {
            Ok(Scope::Project(self.find_project(u, r)?.id))
        }
    }

    fn require(&self, u: &User, source: Scope, level: u64) -> Result<(), ApiErr> {
        if self.role(u, source) >= level { Ok(()) } else { Err(ApiErr::forbidden()) }
    }

    // --- JSON --------------------------------------------------------------

    fn user_json(&self, u: &User, full: bool) -> Value {
        let mut v = json!({
            "id": u.id,
            "username": u.username,
            "name": u.name,
            "state": "active",
            "locked": false,
            "avatar_url": null,
            "web_url": format!("{}/{}", self.url, u.username),
        });
        if full && let Some(o) = v.as_object_mut() {
            o.insert("email".into(), json!(u.email));
            o.insert("public_email".into(), json!(null));
            o.insert("is_admin".into(), json!(u.admin));
            o.insert("bot".into(), json!(false));
            o.insert("created_at".into(), json!(u.created_at));
            o.insert("can_create_group".into(), json!(true));
            o.insert("can_create_project".into(), json!(true));
            o.insert("projects_limit".into(), json!(100_000));
            o.insert("two_factor_enabled".into(), json!(false));
            o.insert("external".into(), json!(false));
            o.insert("namespace_id".into(), json!(u.namespace_id));
        }
        v
    }

    fn group_json(&self, g: &Group) -> Value {
        json!({
            "id": g.id,
            "name": g.name,
            "path": g.path,
            "description": g.description,
            "visibility": g.visibility,
            "full_name": g.full_name,
            "full_path": g.full_path,
            "parent_id": g.parent_id,
            "web_url": format!("{}/groups/{}", self.url, g.full_path),
            "avatar_url": null,
            "created_at": g.created_at,
            "lfs_enabled": true,
            "request_access_enabled": true,
            "share_with_group_lock": false,
            "require_two_factor_authentication": false,
            "project_creation_level": "maintainer",
            "subgroup_creation_level": "maintainer",
            "auto_devops_enabled": null,
            "emails_enabled": true,
            "mentions_disabled": null,
            "default_branch": null,
            "organization_id": 1,
        })
    }

    fn namespace_json(&self, ns: u64) -> Value {
        if let Some(g) = self.group_by_id(ns) {
            return json!({
                "id": g.id, "name": g.name, "path": g.path, "kind": "group", "full_path": g.full_path,
                "parent_id": g.parent_id, "avatar_url": null, "web_url": format!("{}/groups/{}", self.url, g.full_path),
            });
        }
        match self.namespace_owner(ns) {
            Some(u) => json!({
                "id": ns, "name": u.name, "path": u.username, "kind": "user", "full_path": u.username,
                "parent_id": null, "avatar_url": null, "web_url": format!("{}/{}", self.url, u.username),
            }),
            None => Value::Null,
        }
    }

    fn project_json(&self, env: &Env, p: &Project) -> Value {
        let ns_name = match self.group_by_id(p.namespace_id) {
            Some(g) => g.full_name.clone(),
            None => self.namespace_owner(p.namespace_id).map(|u| u.name.clone()).unwrap_or_default(),
        };
        let empty = git(&repo_dir(env, p), &["for-each-ref", "--count=1", "refs/heads"], None)
            .map(|s| s.trim().is_empty())
            .unwrap_or(true);
        let host = self.url.trim_start_matches("http://").split(':').next().unwrap_or("127.0.0.1").to_owned();
        let mut v = json!({
            "id": p.id,
            "name": p.name,
            "path": p.path,
            "description": p.description,
            "name_with_namespace": format!("{ns_name} / {}", p.name),
            "path_with_namespace": p.path_with_namespace,
            "default_branch": p.default_branch,
            "visibility": p.visibility,
            "http_url_to_repo": format!("{}/{}.git", self.url, p.path_with_namespace),
            "ssh_url_to_repo": format!("git@{host}:{}.git", p.path_with_namespace),
            "web_url": format!("{}/{}", self.url, p.path_with_namespace),
            "readme_url": null,
            "namespace": self.namespace_json(p.namespace_id),
            "created_at": p.created_at,
            "last_activity_at": p.created_at,
            "empty_repo": empty,
            "archived": false,
            "topics": [],
            "tag_list": [],
            "forks_count": 0,
            "star_count": 0,
        });
        if let (Some(o), Some(u)) = (v.as_object_mut(), self.namespace_owner(p.namespace_id)) {
            o.insert("owner".into(), self.user_json(u, false));
        }
        v
    }

    fn member_json(&self, uid: u64, level: u64, m: Option<&Member>) -> Value {
        let Some(u) = self.users.iter().find(|u| u.id == uid) else { return Value::Null };
        let mut v = self.user_json(u, false);
        if let Some(o) = v.as_object_mut() {
            o.insert("access_level".into(), json!(level));
            o.insert("expires_at".into(), json!(m.and_then(|m| m.expires_at.clone())));
            o.insert("created_at".into(), json!(m.map(|m| m.created_at.clone()).unwrap_or_else(now_iso)));
            o.insert("membership_state".into(), json!("active"));
        }
        v
    }

    fn protected_json(&self, b: &ProtectedBranch) -> Value {
        let lvl = |id: u64, level: u64| {
            json!([{ "id": id, "access_level": level, "access_level_description": access_description(level),
                     "user_id": null, "group_id": null, "deploy_key_id": null }])
        };
        json!({
            "id": b.id,
            "name": b.name,
            "push_access_levels": lvl(b.id * 10 + 1, b.push_access_level),
            "merge_access_levels": lvl(b.id * 10 + 2, b.merge_access_level),
            "unprotect_access_levels": lvl(b.id * 10 + 3, b.unprotect_access_level),
            "allow_force_push": b.allow_force_push,
            "code_owner_approval_required": false,
        })
    }

    fn variable_json(v: &Variable) -> Value {
        let mut out = json!({
            "variable_type": v.variable_type,
            "key": v.key,
            "value": v.value,
            "protected": v.protected,
            "masked": v.masked,
            "hidden": false,
            "raw": v.raw,
            "description": v.description,
        });
        if v.scope != Scope::Instance
            && let Some(o) = out.as_object_mut()
        {
            o.insert("environment_scope".into(), json!(v.environment_scope));
        }
        out
    }

    fn runner_json(&self, r: &Runner) -> Value {
        let mut v = json!({
            "id": r.id,
            "description": r.description,
            "ip_address": null,
            "active": !r.paused,
            "paused": r.paused,
            "is_shared": r.runner_type == "instance_type",
            "runner_type": r.runner_type,
            "name": null,
            "online": false,
            "status": "never_contacted",
            "tag_list": r.tag_list,
            "run_untagged": r.run_untagged,
            "locked": r.locked,
            "access_level": r.access_level,
            "maximum_timeout": r.maximum_timeout,
        });
        if let Some(o) = v.as_object_mut() {
            match r.scope {
                Scope::Group(g) => {
                    let groups: Vec<Value> = self.group_by_id(g).map(|g| self.group_json(g)).into_iter().collect();
                    o.insert("groups".into(), Value::Array(groups));
                }
                Scope::Project(p) => {
                    let projects: Vec<Value> = self
                        .projects
                        .iter()
                        .filter(|x| x.id == p)
                        .map(|x| json!({"id": x.id, "name": x.name, "path": x.path, "path_with_namespace": x.path_with_namespace}))
                        .collect();
                    o.insert("projects".into(), Value::Array(projects));
                }
                Scope::Instance => {}
            }
        }
        v
    }

    fn token_json(t: &PersonalAccessToken, with_secret: bool) -> Value {
        let mut v = json!({
            "id": t.id,
            "name": t.name,
            "revoked": t.revoked,
            "created_at": t.created_at,
            "description": null,
            "scopes": t.scopes,
            "user_id": t.user_id,
            "last_used_at": null,
            "active": !t.revoked,
            "expires_at": t.expires_at,
        });
        if with_secret && let Some(o) = v.as_object_mut() {
            o.insert("token".into(), json!(t.token));
        }
        v
    }

    // --- mutations shared by the API and the seeding helpers -----------------

    fn create_group(
        &mut self,
        creator: Option<u64>,
        name: &str,
        path: &str,
        parent: Option<u64>,
        visibility: &str,
        description: &str,
    ) -> Result<Group, ApiErr> {
        let fail = |field: &str, text: &str| {
            ApiErr::message(400, format!("Failed to save group {{:{field}=>[\"{}\"]}}", text.replace('"', "\\\"")))
        };
        if !valid_path(path) {
            return Err(fail("path", PATH_RULE));
        }
        if !valid_name(name) {
            return Err(fail(
                "name",
                "can contain only letters, digits, emoji, '_', '.', '-', '+', space and parentheses, and must start with a letter, digit, emoji or '_'",
            ));
        }
        let parent_group = match parent {
            Some(pid) => Some(self.group_by_id(pid).cloned().ok_or_else(|| ApiErr::not_found("Parent Group"))?),
            None => None,
        };
        let taken = match parent {
            Some(pid) => {
                self.groups.iter().any(|g| g.parent_id == Some(pid) && ci_eq(&g.path, path))
                    || self.projects.iter().any(|p| p.namespace_id == pid && ci_eq(&p.path, path))
            }
            None => {
                self.groups.iter().any(|g| g.parent_id.is_none() && ci_eq(&g.path, path))
                    || self.users.iter().any(|u| ci_eq(&u.username, path))
                    || RESERVED_TOP_LEVEL.iter().any(|r| ci_eq(r, path))
            }
        };
        if taken {
            return Err(fail("path", "has already been taken"));
        }
        let (full_path, full_name) = match &parent_group {
            Some(pg) => (format!("{}/{path}", pg.full_path), format!("{} / {name}", pg.full_name)),
            None => (path.to_owned(), name.to_owned()),
        };
        let g = Group {
            id: self.next(),
            name: name.to_owned(),
            path: path.to_owned(),
            full_path,
            full_name,
            parent_id: parent,
            visibility: visibility.to_owned(),
            description: description.to_owned(),
            created_at: now_iso(),
        };
        self.groups.push(g.clone());
        if let Some(uid) = creator {
            self.members.push(Member {
                source: Scope::Group(g.id),
                user_id: uid,
                access_level: access::OWNER,
                expires_at: None,
                created_at: now_iso(),
            });
        }
        Ok(g)
    }

    #[allow(clippy::too_many_arguments)]
    fn create_project(
        &mut self,
        env: &Env,
        creator: u64,
        name: &str,
        path: &str,
        namespace_id: u64,
        default_branch: &str,
        visibility: &str,
        description: &str,
        readme: bool,
    ) -> Result<Project, ApiErr> {
        if !valid_path(path) {
            return Err(ApiErr::validation("path", PATH_RULE));
        }
        if !valid_name(name) {
            return Err(ApiErr::validation(
                "name",
                "can contain only letters, digits, emoji, '_', '.', '+', dashes, or spaces. It must start with a letter, digit, emoji, or '_'.",
            ));
        }
        if git(&env.repos, &["check-ref-format", "--branch", default_branch], None).is_err() {
            return Err(ApiErr::invalid("default_branch"));
        }
        let (_, ns_path, _) = self
            .namespace_by_ref(&namespace_id.to_string())
            .ok_or_else(|| ApiErr::validation("namespace", "is not valid"))?;
        let mut errors = Map::new();
        if self.projects.iter().any(|p| p.namespace_id == namespace_id && ci_eq(&p.name, name)) {
            errors.insert("name".into(), json!(["has already been taken"]));
        }
        if self.projects.iter().any(|p| p.namespace_id == namespace_id && ci_eq(&p.path, path))
            || self.groups.iter().any(|g| g.parent_id == Some(namespace_id) && ci_eq(&g.path, path))
        {
            errors.insert("path".into(), json!(["has already been taken"]));
        }
        if !errors.is_empty() {
            return Err(ApiErr { status: 400, body: json!({ "message": errors }) });
        }
        let p = Project {
            id: self.projects.iter().map(|p| p.id).max().unwrap_or(0) + 1,
            name: name.to_owned(),
            path: path.to_owned(),
            namespace_id,
            path_with_namespace: format!("{ns_path}/{path}"),
            default_branch: default_branch.to_owned(),
            visibility: visibility.to_owned(),
            description: description.to_owned(),
            created_at: now_iso(),
        };
        let creator_name = self.users.iter().find(|u| u.id == creator).map(|u| u.name.clone()).unwrap_or_default();
        init_repo(env, &p, readme.then_some(creator_name.as_str()))
            .map_err(|e| ApiErr::message(500, format!("500 Internal Server Error: {e:#}")))?;
        self.projects.push(p.clone());
        Ok(p)
    }

    // --- git access ------------------------------------------------------------

    fn git_access(
        &self,
        repo: &str,
        creds: Option<&(String, String)>,
        push: bool,
    ) -> Result<GitGrant, (u16, &'static str)> {
        const DENIED: &str = "HTTP Basic: Access denied. If a password was provided for Git authentication, the password was incorrect or you're required to use a token instead of a password. If a token was provided, it was either incorrect, expired, or improperly scoped.";
        let project = self.project_by_path(repo);
        let user = match creds {
            None => {
                return match project {
                    Some(p) if p.visibility == "public" && !push => Ok(GitGrant {
                        path_with_namespace: p.path_with_namespace.clone(),
                        username: String::new(),
                        protected: String::new(),
                    }),
                    _ => Err((401, DENIED)),
                };
            }
            Some((_, token)) => self.token_user(token).ok_or((401, DENIED))?,
        };
        self.git_grant(repo, user, push)
    }

    /// What `user` may do with the repository of `repo` (scopes, role, protected branches).
    fn git_grant(&self, repo: &str, user: AuthUser, push: bool) -> Result<GitGrant, (u16, &'static str)> {
        const NOT_FOUND: &str =
            "The project you were looking for could not be found or you don't have permission to view it.";
        let project = self.project_by_path(repo);
        let has = |s: &str| user.scopes.iter().any(|x| x == s);
        let scoped = if push { has("api") || has("write_repository") } else { has("api") || has("read_repository") };
        if !scoped {
            return Err((403, "Your token does not have the scope needed for this Git operation."));
        }
        let p = match project {
            Some(p) if self.can_see_project(&user.user, p) => p,
            _ => return Err((404, NOT_FOUND)),
        };
        let level = self.role(&user.user, Scope::Project(p.id));
        if push && level < access::DEVELOPER {
            return Err((403, "You are not allowed to push code to this project."));
        }
        if !push && level < access::REPORTER && p.visibility == "private" {
            return Err((403, "You are not allowed to download code from this project."));
        }
        let protected = self
            .protected
            .iter()
            .filter(|b| b.project_id == p.id)
            .map(|b| {
                let may_push = b.push_access_level != 0 && level >= b.push_access_level;
                format!("{} {} {}", u8::from(may_push), u8::from(b.allow_force_push), shell_pattern(&b.name))
            })
            .collect::<Vec<_>>()
            .join("\n");
        Ok(GitGrant { path_with_namespace: p.path_with_namespace.clone(), username: user.user.username, protected })
    }

    // --- routing -----------------------------------------------------------------

    fn dispatch(
        &mut self,
        env: &Env,
        auth: &Result<AuthUser, ApiErr>,
        method: &str,
        segs: &[&str],
        params: &Params,
    ) -> Result<Reply, ApiErr> {
        let me = || auth.as_ref().map(|a| a.user.clone()).map_err(Clone::clone);
        match (method, segs) {
            ("GET", ["user"]) => {
                let u = me()?;
                ok(self.user_json(&u, true))
            }
            ("POST", ["user", "runners"]) => self.create_runner(&me()?, params),
            ("GET", ["users"]) => self.list_users(&me()?, params),
            ("POST", ["users"]) => self.create_user(&me()?, params),
            ("GET", ["users", id]) => {
                let u = me()?;
                let found = self.user_by_ref(id).ok_or_else(|| ApiErr::not_found("User"))?;
                ok(self.user_json(found, u.admin || u.id == found.id))
            }
            ("POST", ["users", id, "personal_access_tokens"]) => self.create_token(&me()?, id, params),
            ("GET", ["personal_access_tokens"]) => {
                let u = me()?;
                let filter = params.u64("user_id")?;
                let items = self
                    .tokens
                    .iter()
                    .filter(|t| if u.admin { filter.is_none_or(|f| f == t.user_id) } else { t.user_id == u.id })
                    .map(|t| Self::token_json(t, false))
                    .collect();
                Ok(Reply::List(items))
            }
            ("GET", ["personal_access_tokens", "self"]) => {
                let a = auth.as_ref().map_err(Clone::clone)?;
                let t = self.tokens.iter().find(|t| t.id == a.token_id).ok_or_else(|| ApiErr::not_found("Token"))?;
                ok(Self::token_json(t, false))
            }
            ("GET", ["groups"]) => self.list_groups(&me()?, params),
            ("POST", ["groups"]) => self.api_create_group(&me()?, params),
            ("GET", ["groups", g]) => {
                let u = me()?;
                let g = self.find_group(&u, g)?;
                ok(self.group_json(&g))
            }
            ("GET", ["groups", g, "subgroups"]) => {
                let u = me()?;
                let g = self.find_group(&u, g)?;
                let search = params.str("search").map(|s| s.to_lowercase());
                let items: Vec<Group> = self
                    .groups
                    .iter()
                    .filter(|x| x.parent_id == Some(g.id) && self.can_see_group(&u, x))
                    .filter(|x| search.as_ref().is_none_or(|s| matches_search(s, &[&x.name, &x.path])))
                    .cloned()
                    .collect();
                Ok(Reply::List(self.sort_groups(items, params)))
            }
            ("GET", ["groups", g, "projects"]) => {
                let u = me()?;
                let g = self.find_group(&u, g)?;
                let sub = params.bool("include_subgroups")?.unwrap_or(false);
                let search = params.str("search").map(|s| s.to_lowercase());
                let items: Vec<Project> = self
                    .projects
                    .iter()
                    .filter(|p| p.namespace_id == g.id || (sub && self.is_descendant(p.namespace_id, g.id)))
                    .filter(|p| self.can_see_project(&u, p))
                    .filter(|p| search.as_ref().is_none_or(|s| matches_search(s, &[&p.name, &p.path])))
                    .cloned()
                    .collect();
                Ok(Reply::List(self.sort_projects(env, items, params)))
            }
            ("GET", ["projects"]) => {
                let u = me()?;
                let search = params.str("search").map(|s| s.to_lowercase());
                let items: Vec<Project> = self
                    .projects
                    .iter()
                    .filter(|p| self.can_see_project(&u, p))
                    .filter(|p| {
                        search.as_ref().is_none_or(|s| matches_search(s, &[&p.name, &p.path, &p.path_with_namespace]))
                    })
                    .cloned()
                    .collect();
                Ok(Reply::List(self.sort_projects(env, items, params)))
            }
            ("POST", ["projects"]) => self.api_create_project(env, &me()?, params),
            ("GET", ["projects", p]) => {
                let u = me()?;
                let p = self.find_project(&u, p)?;
                ok(self.project_json(env, &p))
            }
            (_, [kind @ ("groups" | "projects"), id, "members", rest @ ..]) => {
                let u = me()?;
                let source = self.find_source(&u, kind, id)?;
                self.members_route(&u, source, method, rest, params)
            }
            (_, [kind @ ("groups" | "projects"), id, "variables", rest @ ..]) => {
                let u = me()?;
                let source = self.find_source(&u, kind, id)?;
                self.require(&u, source, access::MAINTAINER)?;
                self.variables_route(source, method, rest, params)
            }
            (_, ["admin", "ci", "variables", rest @ ..]) => {
                let u = me()?;
                if !u.admin {
                    return Err(ApiErr::forbidden());
                }
                self.variables_route(Scope::Instance, method, rest, params)
            }
            ("GET", ["projects", p, "repository", "branches"]) => {
                let u = me()?;
                let p = self.find_project(&u, p)?;
                self.require_read_repo(&u, &p)?;
                let out =
                    git(&repo_dir(env, &p), &["for-each-ref", "--format=%(refname:lstrip=2)", "refs/heads"], None)
                        .map_err(|e| ApiErr::message(500, format!("{e:#}")))?;
                let search = params.str("search");
                let mut items = Vec::new();
                for name in out.lines().filter(|l| !l.is_empty()) {
                    if search.as_deref().is_none_or(|s| name.contains(s))
                        && let Some(b) = self.branch_json(env, &p, name)
                    {
                        items.push(b);
                    }
                }
                Ok(Reply::List(items))
            }
            ("GET", ["projects", p, "repository", "branches", branch]) => {
                let u = me()?;
                let p = self.find_project(&u, p)?;
                self.require_read_repo(&u, &p)?;
                self.branch_json(env, &p, branch).map_or_else(|| Err(ApiErr::not_found("Branch")), ok)
            }
            (_, ["projects", p, "protected_branches", rest @ ..]) => {
                let u = me()?;
                let p = self.find_project(&u, p)?;
                self.protected_route(&u, &p, method, rest, params)
            }
            ("GET", ["runners", "all"]) => {
                let u = me()?;
                if !u.admin {
                    return Err(ApiErr::forbidden());
                }
                let ty = params.str("type");
                let tags = params.list("tag_list");
                let items = self
                    .runners
                    .iter()
                    .filter(|r| ty.as_deref().is_none_or(|t| t == r.runner_type))
                    .filter(|r| tags.iter().all(|t| r.tag_list.contains(t)))
                    .map(|r| self.runner_json(r))
                    .collect();
                Ok(Reply::List(items))
            }
            ("GET" | "DELETE", ["runners", id]) => {
                let u = me()?;
                let r = id
                    .parse::<u64>()
                    .ok()
                    .and_then(|id| self.runners.iter().find(|r| r.id == id))
                    .cloned()
                    .ok_or_else(|| ApiErr::not_found("Runner"))?;
                let allowed = u.admin
                    || match r.scope {
                        Scope::Group(g) => self.group_level(g, u.id) >= access::OWNER,
                        Scope::Project(p) => self.project_level(p, u.id) >= access::MAINTAINER,
                        Scope::Instance => false,
                    };
                if !allowed {
                    return Err(ApiErr::forbidden());
                }
                if method == "DELETE" {
                    self.runners.retain(|x| x.id != r.id);
                    return Ok(Reply::Empty);
                }
                ok(self.runner_json(&r))
            }
            _ => Err(ApiErr::route()),
        }
    }

    fn require_read_repo(&self, u: &User, p: &Project) -> Result<(), ApiErr> {
        if p.visibility == "private" && self.role(u, Scope::Project(p.id)) < access::REPORTER {
            Err(ApiErr::forbidden())
        } else {
            Ok(())
        }
    }

    fn sort_groups(&self, mut items: Vec<Group>, params: &Params) -> Vec<Value> {
        match params.str("order_by").as_deref() {
            Some("id") => items.sort_by_key(|g| g.id),
            Some("path") => items.sort_by(|a, b| a.full_path.cmp(&b.full_path).then(a.id.cmp(&b.id))),
            _ => items.sort_by(|a, b| a.name.to_lowercase().cmp(&b.name.to_lowercase()).then(a.id.cmp(&b.id))),
        }
        if params.str("sort").as_deref() == Some("desc") {
            items.reverse();
        }
        items.iter().map(|g| self.group_json(g)).collect()
    }

    fn sort_projects(&self, env: &Env, mut items: Vec<Project>, params: &Params) -> Vec<Value> {
        match params.str("order_by").as_deref() {
            Some("name") => {
                items.sort_by(|a, b| a.name.to_lowercase().cmp(&b.name.to_lowercase()).then(a.id.cmp(&b.id)))
            }
            Some("path") => items.sort_by(|a, b| a.path_with_namespace.cmp(&b.path_with_namespace)),
            _ => items.sort_by_key(|p| p.id),
        }
        // GitLab sorts projects in descending order unless told otherwise.
        if params.str("sort").as_deref() != Some("asc") {
            items.reverse();
        }
        items.iter().map(|p| self.project_json(env, p)).collect()
    }

    fn list_users(&self, u: &User, params: &Params) -> Result<Reply, ApiErr> {
        let username = params.str("username");
        let search = params.str("search").map(|s| s.to_lowercase());
        let mut items: Vec<&User> = self
            .users
            .iter()
            .filter(|x| username.as_deref().is_none_or(|n| ci_eq(n, &x.username)))
            .filter(|x| {
                search.as_ref().is_none_or(|s| {
                    matches_search(s, &[&x.username, &x.name]) || (u.admin && x.email.to_lowercase() == *s)
                })
            })
            .collect();
        items.sort_by_key(|x| x.id);
        if params.str("sort").as_deref() != Some("asc") {
            items.reverse();
        }
        Ok(Reply::List(items.into_iter().map(|x| self.user_json(x, u.admin)).collect()))
    }

    fn create_user(&mut self, u: &User, params: &Params) -> Result<Reply, ApiErr> {
        if !u.admin {
            return Err(ApiErr::forbidden());
        }
        let email = params.required("email")?;
        let name = params.required("name")?;
        let username = params.required("username")?;
        if params.str("password").is_none()
            && !params.bool("reset_password")?.unwrap_or(false)
            && !params.bool("force_random_password")?.unwrap_or(false)
        {
            return Err(ApiErr::error(
                400,
                "password, reset_password, force_random_password are missing, exactly one parameter must be provided",
            ));
        }
        if !valid_path(&username) {
            return Err(ApiErr::validation("username", PATH_RULE));
        }
        if self.users.iter().any(|x| ci_eq(&x.username, &username))
            || self.groups.iter().any(|g| g.parent_id.is_none() && ci_eq(&g.path, &username))
        {
            return Err(ApiErr::message(409, "Username has already been taken"));
        }
        if self.users.iter().any(|x| ci_eq(&x.email, &email)) {
            return Err(ApiErr::message(409, "Email has already been taken"));
        }
        let admin = params.bool("admin")?.unwrap_or(false);
        let id = self.insert_user(&username, &name, &email, admin);
        let user = self.users.iter().find(|x| x.id == id).cloned().ok_or_else(|| ApiErr::not_found("User"))?;
        created(self.user_json(&user, true))
    }

    fn create_token(&mut self, u: &User, id: &str, params: &Params) -> Result<Reply, ApiErr> {
        if !u.admin {
            return Err(ApiErr::forbidden());
        }
        let target = self.user_by_ref(id).map(|x| x.id).ok_or_else(|| ApiErr::not_found("User"))?;
        let name = params.required("name")?;
        let scopes = params.list("scopes");
        if scopes.is_empty() {
            return Err(ApiErr::missing("scopes"));
        }
        if scopes.iter().any(|s| !VALID_SCOPES.contains(&s.as_str())) {
            return Err(ApiErr::invalid("scopes"));
        }
        let expires_at = params.str("expires_at").filter(|s| !s.is_empty());
        if let Some(e) = &expires_at
            && !is_date(e)
        {
            return Err(ApiErr::invalid("expires_at"));
        }
        let scopes: Vec<&str> = scopes.iter().map(String::as_str).collect();
        let t = self.insert_token(target, &name, &scopes, expires_at);
        created(Self::token_json(&t, true))
    }

    fn list_groups(&self, u: &User, params: &Params) -> Result<Reply, ApiErr> {
        let search = params.str("search").map(|s| s.to_lowercase());
        let top = params.bool("top_level_only")?.unwrap_or(false);
        let all = params.bool("all_available")?.unwrap_or(u.admin);
        let items: Vec<Group> = self
            .groups
            .iter()
            .filter(|g| if all { self.can_see_group(u, g) } else { u.admin || self.group_level(g.id, u.id) > 0 })
            .filter(|g| !top || g.parent_id.is_none())
            .filter(|g| search.as_ref().is_none_or(|s| matches_search(s, &[&g.name, &g.path])))
            .cloned()
            .collect();
        Ok(Reply::List(self.sort_groups(items, params)))
    }

    fn api_create_group(&mut self, u: &User, params: &Params) -> Result<Reply, ApiErr> {
        let name = params.required("name")?;
        let path = params.required("path")?;
        let visibility = visibility_param(params, "private")?;
        let parent = params.u64("parent_id")?;
        if let Some(pid) = parent {
            let pg = self.group_by_id(pid).filter(|g| self.can_see_group(u, g)).cloned();
            let pg = pg.ok_or_else(|| ApiErr::not_found("Parent Group"))?;
            self.require(u, Scope::Group(pg.id), access::MAINTAINER)?;
        }
        let description = params.str("description").unwrap_or_default();
        let g = self.create_group(Some(u.id), &name, &path, parent, &visibility, &description)?;
        created(self.group_json(&g))
    }

    fn api_create_project(&mut self, env: &Env, u: &User, params: &Params) -> Result<Reply, ApiErr> {
        let name = params.str("name").filter(|s| !s.is_empty());
        let path = params.str("path").filter(|s| !s.is_empty());
        let (name, path) = match (name, path) {
            (Some(n), Some(p)) => (n, p),
            (Some(n), None) => {
                let p = n.trim().to_lowercase().replace(' ', "-");
                (n, p)
            }
            (None, Some(p)) => (p.clone(), p),
            (None, None) => {
                return Err(ApiErr::error(400, "name, path are missing, at least one parameter must be provided"));
            }
        };
        let ns = match params.str("namespace_id").filter(|s| !s.is_empty()) {
            None => u.namespace_id,
            Some(r) => {
                self.namespace_by_ref(&r).map(|n| n.0).ok_or_else(|| ApiErr::validation("namespace", "is not valid"))?
            }
        };
        let allowed = u.admin
            || match self.group_by_id(ns) {
                Some(_) => self.group_level(ns, u.id) >= access::MAINTAINER,
                None => ns == u.namespace_id,
            };
        if !allowed {
            return Err(ApiErr::validation("namespace", "is not valid"));
        }
        let visibility = visibility_param(params, "private")?;
        let default_branch = params.str("default_branch").filter(|s| !s.is_empty()).unwrap_or_else(|| "main".into());
        let description = params.str("description").unwrap_or_default();
        let readme = params.bool("initialize_with_readme")?.unwrap_or(false);
        let p = self.create_project(env, u.id, &name, &path, ns, &default_branch, &visibility, &description, readme)?;
        created(self.project_json(env, &p))
    }

    fn members_route(
        &mut self,
        u: &User,
        source: Scope,
        method: &str,
        rest: &[&str],
        params: &Params,
    ) -> Result<Reply, ApiErr> {
        // `user_ids[]` and `query` filter the lists.
        let ids: Vec<u64> = params.list("user_ids").iter().filter_map(|s| s.parse().ok()).collect();
        let query = params.str("query").map(|q| q.to_lowercase());
        let wanted = |uid: u64| {
            (ids.is_empty() || ids.contains(&uid))
                && query.as_ref().is_none_or(|q| {
                    self.users.iter().any(|u| u.id == uid && matches_search(q, &[&u.username, &u.name]))
                })
        };
        match (method, rest) {
            ("GET", []) => {
                let mut items: Vec<&Member> =
                    self.members.iter().filter(|m| m.source == source && wanted(m.user_id)).collect();
                items.sort_by_key(|m| m.user_id);
                Ok(Reply::List(
                    items.into_iter().map(|m| self.member_json(m.user_id, m.access_level, Some(m))).collect(),
                ))
            }
            ("GET", ["all"]) => {
                let items = self
                    .all_members(source)
                    .into_iter()
                    .filter(|(uid, _, _)| wanted(*uid))
                    .map(|(uid, lvl, m)| self.member_json(uid, lvl, m.as_ref()))
                    .collect();
                Ok(Reply::List(items))
            }
            ("GET", ["all", uid]) => {
                let uid = uid.parse::<u64>().map_err(|_| ApiErr::not_found("Member"))?;
                self.all_members(source)
                    .into_iter()
                    .find(|(id, _, _)| *id == uid)
                    .map(|(id, lvl, m)| self.member_json(id, lvl, m.as_ref()))
                    .map_or_else(|| Err(ApiErr::not_found("Member")), ok)
            }
            ("GET", [uid]) => {
                let uid = uid.parse::<u64>().map_err(|_| ApiErr::not_found("Member"))?;
                let m = self.members.iter().find(|m| m.source == source && m.user_id == uid);
                m.map(|m| self.member_json(m.user_id, m.access_level, Some(m)))
                    .map_or_else(|| Err(ApiErr::not_found("Member")), ok)
            }
            ("POST", []) => {
                self.require(u, source, access::MAINTAINER)?;
                let level = member_level(params)?;
                let role = self.role(u, source);
                if level > role.min(access::OWNER) || (level == access::OWNER && role < access::OWNER) {
                    return Err(ApiErr::forbidden());
                }
                let target = match (params.str("user_id"), params.str("username")) {
                    (Some(id), _) => id,
                    (None, Some(name)) => name,
                    (None, None) => {
                        return Err(ApiErr::error(
                            400,
                            "user_id, username are missing, exactly one parameter must be provided",
                        ));
                    }
                };
                let mut ids = Vec::new();
                for t in target.split(',').map(str::trim) {
                    ids.push(self.user_by_ref(t).map(|x| x.id).ok_or_else(|| ApiErr::not_found("User"))?);
                }
                for &uid in &ids {
                    if self.direct_level(source, uid).is_some() {
                        return Err(ApiErr::message(409, "Member already exists"));
                    }
                    self.check_inherited(source, uid, level)?;
                }
                let expires_at = params.str("expires_at").filter(|s| !s.is_empty());
                for &uid in &ids {
                    self.members.push(Member {
                        source,
                        user_id: uid,
                        access_level: level,
                        expires_at: expires_at.clone(),
                        created_at: now_iso(),
                    });
                }
                let m = self.members.last().cloned();
                created(m.map(|m| self.member_json(m.user_id, m.access_level, Some(&m))).unwrap_or(Value::Null))
            }
            ("PUT", [uid]) => {
                self.require(u, source, access::MAINTAINER)?;
                let uid = uid.parse::<u64>().map_err(|_| ApiErr::not_found("Member"))?;
                let level = member_level(params)?;
                let role = self.role(u, source);
                if level > role.min(access::OWNER) || (level == access::OWNER && role < access::OWNER) {
                    return Err(ApiErr::forbidden());
                }
                if self.direct_level(source, uid).is_none() {
                    return Err(ApiErr::not_found("Member"));
                }
                self.check_inherited(source, uid, level)?;
                let expires_at = params.str("expires_at");
                let Some(m) = self.members.iter_mut().find(|m| m.source == source && m.user_id == uid) else {
                    return Err(ApiErr::not_found("Member"));
                };
                m.access_level = level;
                if let Some(e) = expires_at {
                    m.expires_at = Some(e).filter(|e| !e.is_empty());
                }
                let m = m.clone();
                ok(self.member_json(m.user_id, m.access_level, Some(&m)))
            }
            ("DELETE", [uid]) => {
                self.require(u, source, access::MAINTAINER)?;
                let uid = uid.parse::<u64>().map_err(|_| ApiErr::not_found("Member"))?;
                let before = self.members.len();
                self.members.retain(|m| !(m.source == source && m.user_id == uid));
                if self.members.len() == before { Err(ApiErr::not_found("Member")) } else { Ok(Reply::Empty) }
            }
            _ => Err(ApiErr::route()),
        }
    }

    /// GitLab refuses a direct membership below one inherited from an ancestor.
    fn check_inherited(&self, source: Scope, uid: u64, level: u64) -> Result<(), ApiErr> {
        let inherited: Option<(u64, String)> = match source {
            Scope::Group(g) => self
                .ancestors(g)
                .iter()
                .skip(1)
                .filter_map(|a| self.direct_level(Scope::Group(a.id), uid).map(|l| (l, a.full_path.clone())))
                .max_by_key(|(l, _)| *l),
            Scope::Project(p) => self
                .projects
                .iter()
                .find(|x| x.id == p)
                .map(|x| self.ancestors(x.namespace_id))
                .unwrap_or_default()
                .iter()
                .filter_map(|a| self.direct_level(Scope::Group(a.id), uid).map(|l| (l, a.full_path.clone())))
                .max_by_key(|(l, _)| *l),
            Scope::Instance => None,
        };
        match inherited {
            Some((l, from)) if l > level => Err(ApiErr::validation(
                "access_level",
                &format!("should be greater than or equal to {} inherited membership from group {from}", role_name(l)),
            )),
            _ => Ok(()),
        }
    }

    /// Direct and inherited members: `(user id, highest level, direct membership here)`.
    fn all_members(&self, source: Scope) -> Vec<(u64, u64, Option<Member>)> {
        let mut sources = vec![source];
        let groups = match source {
            Scope::Group(g) => self.ancestors(g),
            Scope::Project(p) => {
                self.projects.iter().find(|x| x.id == p).map(|x| self.ancestors(x.namespace_id)).unwrap_or_default()
            }
            Scope::Instance => Vec::new(),
        };
        sources.extend(groups.iter().map(|g| Scope::Group(g.id)));
        let mut out: Vec<(u64, u64, Option<Member>)> = Vec::new();
        for m in self.members.iter().filter(|m| sources.contains(&m.source)) {
            let here = (m.source == source).then(|| m.clone());
            match out.iter_mut().find(|(id, _, _)| *id == m.user_id) {
                Some(e) => {
                    if m.access_level > e.1 {
                        e.1 = m.access_level;
                        e.2 = here;
                    }
                }
                None => out.push((m.user_id, m.access_level, here)),
            }
        }
        if let Scope::Project(p) = source
            && let Some(owner) =
                self.projects.iter().find(|x| x.id == p).and_then(|x| self.namespace_owner(x.namespace_id))
            && !out.iter().any(|(id, _, _)| *id == owner.id)
        {
            out.push((owner.id, access::OWNER, None));
        }
        out.sort_by_key(|(id, _, _)| *id);
        out
    }

    fn variables_route(&mut self, scope: Scope, method: &str, rest: &[&str], params: &Params) -> Result<Reply, ApiErr> {
        let env_scope = params.str("environment_scope").filter(|s| !s.is_empty()).unwrap_or_else(|| "*".into());
        let filter_scope = params.str("filter[environment_scope]");
        match (method, rest) {
            ("GET", []) => {
                Ok(Reply::List(self.variables.iter().filter(|v| v.scope == scope).map(Self::variable_json).collect()))
            }
            ("POST", []) => {
                let key = params.required("key")?;
                let value = params.str("value").ok_or_else(|| ApiErr::missing("value"))?;
                if key.len() > 255 || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(ApiErr::validation("key", "can contain only letters, digits and '_'."));
                }
                let v = Variable {
                    scope,
                    key: key.clone(),
                    value,
                    variable_type: variable_type(params, "env_var")?,
                    protected: params.bool("protected")?.unwrap_or(false),
                    masked: params.bool("masked")?.unwrap_or(false)
                        || params.bool("masked_and_hidden")?.unwrap_or(false),
                    raw: params.bool("raw")?.unwrap_or(false),
                    environment_scope: env_scope,
                    description: params.str("description"),
                };
                check_masked(&v)?;
                if self
                    .variables
                    .iter()
                    .any(|x| x.scope == scope && x.key == key && x.environment_scope == v.environment_scope)
                {
                    return Err(ApiErr::validation("key", &format!("({key}) has already been taken")));
                }
                self.variables.push(v.clone());
                created(Self::variable_json(&v))
            }
            ("GET", [key]) => self
                .variables
                .iter()
                .find(|v| {
                    v.scope == scope && v.key == *key && filter_scope.as_ref().is_none_or(|f| *f == v.environment_scope)
                })
                .map(Self::variable_json)
                .map_or_else(|| Err(ApiErr::not_found("Variable")), ok),
            ("PUT", [key]) => {
                let variable_type =
                    params.str("variable_type").map(|_| variable_type(params, "env_var")).transpose()?;
                let (protected, masked, raw) = (params.bool("protected")?, params.bool("masked")?, params.bool("raw")?);
                let value = params.str("value");
                let description = params.str("description");
                let new_scope = params.str("environment_scope").filter(|s| !s.is_empty());
                let Some(v) = self.variables.iter_mut().find(|v| {
                    v.scope == scope && v.key == *key && filter_scope.as_ref().is_none_or(|f| *f == v.environment_scope)
                }) else {
                    return Err(ApiErr::not_found("Variable"));
                };
                let mut updated = v.clone();
                if let Some(x) = value {
                    updated.value = x;
                }
                if let Some(x) = variable_type {
                    updated.variable_type = x;
                }
                if let Some(x) = protected {
                    updated.protected = x;
                }
                if let Some(x) = masked {
                    updated.masked = x;
                }
                if let Some(x) = raw {
                    updated.raw = x;
                }
                if description.is_some() {
                    updated.description = description;
                }
                if let Some(x) = new_scope
                    && scope != Scope::Instance
                {
                    updated.environment_scope = x;
                }
                check_masked(&updated)?;
                *v = updated.clone();
                ok(Self::variable_json(&updated))
            }
            ("DELETE", [key]) => {
                let before = self.variables.len();
                self.variables.retain(|v| {
                    !(v.scope == scope
                        && v.key == *key
                        && filter_scope.as_ref().is_none_or(|f| *f == v.environment_scope))
                });
                if self.variables.len() == before { Err(ApiErr::not_found("Variable")) } else { Ok(Reply::Empty) }
            }
            _ => Err(ApiErr::route()),
        }
    }

    fn protected_route(
        &mut self,
        u: &User,
        p: &Project,
        method: &str,
        rest: &[&str],
        params: &Params,
    ) -> Result<Reply, ApiErr> {
        let source = Scope::Project(p.id);
        match (method, rest) {
            ("GET", []) => {
                let search = params.str("search");
                Ok(Reply::List(
                    self.protected
                        .iter()
                        .filter(|b| b.project_id == p.id && search.as_deref().is_none_or(|s| b.name.contains(s)))
                        .map(|b| self.protected_json(b))
                        .collect(),
                ))
            }
            ("GET", [name]) => self
                .protected
                .iter()
                .find(|b| b.project_id == p.id && b.name == *name)
                .map(|b| self.protected_json(b))
                .map_or_else(|| Err(ApiErr::not_found("Protected Branch")), ok),
            ("POST", []) => {
                self.require(u, source, access::MAINTAINER)?;
                let name = params.required("name")?;
                if self.protected.iter().any(|b| b.project_id == p.id && b.name == name) {
                    return Err(ApiErr::message(409, format!("Protected branch '{name}' already exists")));
                }
                let level = |key: &str, nested: &str| -> Result<u64, ApiErr> {
                    let v = params.u64(key)?.or(params
                        .pairs
                        .iter()
                        .rev()
                        .find(|(k, _)| k == nested)
                        .and_then(|(_, v)| v.as_str().and_then(|s| s.parse().ok())));
                    match v {
                        None => Ok(access::MAINTAINER),
                        Some(l @ (0 | 30 | 40 | 60)) => Ok(l),
                        Some(_) => Err(ApiErr::invalid(key)),
                    }
                };
                let b = ProtectedBranch {
                    id: self.next(),
                    project_id: p.id,
                    name,
                    push_access_level: level("push_access_level", "allowed_to_push[][access_level]")?,
                    merge_access_level: level("merge_access_level", "allowed_to_merge[][access_level]")?,
                    unprotect_access_level: level("unprotect_access_level", "allowed_to_unprotect[][access_level]")?,
                    allow_force_push: params.bool("allow_force_push")?.unwrap_or(false),
                };
                self.protected.push(b.clone());
                created(self.protected_json(&b))
            }
            ("DELETE", [name]) => {
                self.require(u, source, access::MAINTAINER)?;
                let before = self.protected.len();
                self.protected.retain(|b| !(b.project_id == p.id && b.name == *name));
                if self.protected.len() == before {
                    Err(ApiErr::not_found("Protected Branch"))
                } else {
                    Ok(Reply::Empty)
                }
            }
            _ => Err(ApiErr::route()),
        }
    }

    fn branch_json(&self, env: &Env, p: &Project, name: &str) -> Option<Value> {
        if name.starts_with('-') {
            return None;
        }
        let dir = repo_dir(env, p);
        let format = "--format=%H%x00%h%x00%s%x00%an%x00%ae%x00%aI%x00%cn%x00%ce%x00%cI%x00%P%x00%B";
        let out = git(&dir, &["log", "-1", format, &format!("refs/heads/{name}"), "--"], None).ok()?;
        let f: Vec<&str> = out.splitn(11, '\0').collect();
        if f.len() < 11 {
            return None;
        }
        let rules: Vec<&ProtectedBranch> =
            self.protected.iter().filter(|b| b.project_id == p.id && wildcard_match(&b.name, name)).collect();
        let protected = !rules.is_empty();
        let dev_push = rules.iter().any(|b| b.push_access_level == access::DEVELOPER);
        let dev_merge = rules.iter().any(|b| b.merge_access_level == access::DEVELOPER);
        Some(json!({
            "name": name,
            "merged": false,
            "protected": protected,
            "default": name == p.default_branch,
            "developers_can_push": !protected || dev_push,
            "developers_can_merge": !protected || dev_merge,
            "can_push": true,
            "web_url": format!("{}/{}/-/tree/{name}", self.url, p.path_with_namespace),
            "commit": {
                "id": f[0],
                "short_id": f[1],
                "title": f[2],
                "author_name": f[3],
                "author_email": f[4],
                "authored_date": f[5],
                "committer_name": f[6],
                "committer_email": f[7],
                "committed_date": f[8],
                "created_at": f[8],
                "parent_ids": f[9].split_whitespace().collect::<Vec<_>>(),
                "message": f[10].trim_end_matches('\n'),
                "web_url": format!("{}/{}/-/commit/{}", self.url, p.path_with_namespace, f[0]),
            },
        }))
    }

    fn create_runner(&mut self, u: &User, params: &Params) -> Result<Reply, ApiErr> {
        let runner_type = params.required("runner_type")?;
        let scope = match runner_type.as_str() {
            "instance_type" => {
                if !u.admin {
                    return Err(ApiErr::forbidden());
                }
                Scope::Instance
            }
            "group_type" => {
                let gid = params.u64("group_id")?.ok_or_else(|| ApiErr::missing("group_id"))?;
                let g = self.find_group(u, &gid.to_string())?;
                self.require(u, Scope::Group(g.id), access::OWNER)?;
                Scope::Group(g.id)
            }
            "project_type" => {
                let pid = params.u64("project_id")?.ok_or_else(|| ApiErr::missing("project_id"))?;
                let p = self.find_project(u, &pid.to_string())?;
                self.require(u, Scope::Project(p.id), access::MAINTAINER)?;
                Scope::Project(p.id)
            }
            _ => return Err(ApiErr::invalid("runner_type")),
        };
        let access_level = params.str("access_level").unwrap_or_else(|| "not_protected".into());
        if !matches!(access_level.as_str(), "not_protected" | "ref_protected") {
            return Err(ApiErr::invalid("access_level"));
        }
        let r = Runner {
            id: self.runners.iter().map(|r| r.id).max().unwrap_or(0) + 1,
            runner_type,
            scope,
            description: params.str("description").unwrap_or_default(),
            tag_list: params.list("tag_list"),
            run_untagged: params.bool("run_untagged")?.unwrap_or(true),
            paused: params.bool("paused")?.unwrap_or(false),
            locked: params.bool("locked")?.unwrap_or(false),
            access_level,
            maximum_timeout: params.u64("maximum_timeout")?,
            token: random_token("glrt-"),
            created_by: u.id,
        };
        self.runners.push(r.clone());
        created(json!({ "id": r.id, "token": r.token, "token_expires_at": null }))
    }
}

fn matches_search(needle: &str, hay: &[&str]) -> bool {
    hay.iter().any(|h| h.to_lowercase().contains(needle))
}

fn member_level(params: &Params) -> Result<u64, ApiErr> {
    let level = params.u64("access_level")?.ok_or_else(|| ApiErr::missing("access_level"))?;
    if matches!(level, 5 | 10 | 15 | 20 | 30 | 40 | 50) { Ok(level) } else { Err(ApiErr::invalid("access_level")) }
}

fn role_name(level: u64) -> &'static str {
    match level {
        5 => "Minimal Access",
        10 => "Guest",
        15 => "Planner",
        20 => "Reporter",
        30 => "Developer",
        40 => "Maintainer",
        50 => "Owner",
        _ => "Custom",
    }
}

fn variable_type(params: &Params, default: &str) -> Result<String, ApiErr> {
    let t = params.str("variable_type").unwrap_or_else(|| default.to_owned());
    if matches!(t.as_str(), "env_var" | "file") { Ok(t) } else { Err(ApiErr::invalid("variable_type")) }
}

/// GitLab's rule for masked values: at least 8 characters, no whitespace,
/// a restricted alphabet.
fn check_masked(v: &Variable) -> Result<(), ApiErr> {
    let ok_chars = v.value.chars().all(|c| c.is_ascii_alphanumeric() || "@:.~-_+/=".contains(c));
    if v.masked && (v.value.len() < 8 || !ok_chars) {
        return Err(ApiErr::validation("value", "is invalid"));
    }
    Ok(())
}

fn is_date(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter().enumerate().all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
}

// ---------------------------------------------------------------------------
// git over SSH

/// Path of the fake's stand-in for gitlab-shell's internal API (not a GitLab path).
const SSH_ALLOWED_PATH: &str = "/-/fake-gitlab/ssh-allowed";

/// The forced command of every SSH key: what gitlab-shell does for a git
/// command over SSH. It asks the fake whether the key's user may run it, then
/// runs it on the repository with the protected-branch rules for the
/// pre-receive hook.
const SSH_COMMAND: &str = r#"#!/bin/sh
# Installed by bidsflux's fake GitLab (crates/fake-gitlab/src/lib.rs).
# $1: API URL, $2: repositories, $3: key id; SSH_ORIGINAL_COMMAND is e.g.
# git-receive-pack '/group/project.git'.
set -f
cmd=${SSH_ORIGINAL_COMMAND%% *}
repo=${SSH_ORIGINAL_COMMAND#"$cmd"}
repo=${repo# }; repo=${repo#"'"}; repo=${repo%"'"}; repo=${repo#/}; repo=${repo%.git}
answer=$(curl -sS -G "$1/-/fake-gitlab/ssh-allowed" --data-urlencode "key_id=$3"   --data-urlencode "service=$cmd" --data-urlencode "project=$repo") || {
  echo "GitLab: the API is unreachable" >&2; exit 1; }
case "$answer" in
  ok*) ;;
  *) printf 'GitLab: %s
' "${answer#denied: }" >&2; exit 1 ;;
esac
FAKE_GITLAB_PROTECTED=$(printf '%s
' "$answer" | tail -n +2)
export FAKE_GITLAB_PROTECTED
cd "$2" || exit 1
exec git "${cmd#git-}" "$repo.git"
"#;

/// An `sshd` serving the fake's repositories as GitLab's SSH endpoint
/// (`ssh://<user>@127.0.0.1:<port>/<path_with_namespace>.git`); stopped on drop.
#[derive(Debug)]
pub struct FakeGitlabSsh {
    child: tokio::process::Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// The user to log in as (this process's user: sshd serves only existing
    /// users, GitLab's is `git`).
    pub user: String,
    /// A known_hosts file with the server's host key.
    pub known_hosts: PathBuf,
    _dir: tempfile::TempDir,
}

impl FakeGitlabSsh {
    /// `ssh://<user>@127.0.0.1:<port>/<path_with_namespace>.git`.
    pub fn url(&self, path_with_namespace: &str) -> String {
        format!("ssh://{}@127.0.0.1:{}/{path_with_namespace}.git", self.user, self.port)
    }
}

impl Drop for FakeGitlabSsh {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl FakeGitlab {
    /// Starts OpenSSH's `sshd` (Debian `openssh-server`; it must run as root,
    /// as tests here do) on a free loopback port. Each key registered with
    /// [`FakeGitlab::add_ssh_key`] logs in to a forced command that asks the
    /// fake, as gitlab-shell asks GitLab, whether its user may fetch or push
    /// (role, project visibility) and applies the protected-branch rules.
    pub async fn start_ssh(&self) -> anyhow::Result<FakeGitlabSsh> {
        let sshd = Path::new("/usr/sbin/sshd");
        if !sshd.is_file() {
            anyhow::bail!("git over SSH needs OpenSSH's sshd (apt-get install openssh-server)");
        }
        // sshd's privilege separation directory (needed when run as root; a
        // non-root sshd serves only its own user and does without).
        let _ = std::fs::create_dir_all("/run/sshd");
        let dir = tempfile::Builder::new().prefix("fake-gitlab-ssh-").tempdir()?;
        let host_key = dir.path().join("host_ed25519");
        let out = tokio::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&host_key)
            .output()
            .await?;
        anyhow::ensure!(out.status.success(), "ssh-keygen: {}", String::from_utf8_lossy(&out.stderr));
        let command = dir.path().join("gitlab-shell");
        std::fs::write(&command, SSH_COMMAND)?;
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&command, std::fs::Permissions::from_mode(0o755))?;
        }
        let keys = lock(&self.inner.state).ssh_keys.clone();
        let mut authorized = String::new();
        for (id, _, key) in keys {
            authorized.push_str(&format!(
                "restrict,command=\"{} {} {} {id}\" {key}\n",
                command.display(),
                self.inner.url,
                self.inner.repos.display()
            ));
        }
        let authorized_keys = dir.path().join("authorized_keys");
        std::fs::write(&authorized_keys, authorized)?;
        let user = std::env::var("USER")
            .ok()
            .filter(|u| !u.is_empty())
            .or_else(|| {
                let out = std::process::Command::new("id").arg("-un").output().ok()?;
                Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
            })
            .unwrap_or_else(|| "root".to_owned());
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?.port()
        };
        let config = dir.path().join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile {}\nAuthorizedKeysFile {}\n\
                 StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
                 PermitRootLogin forced-commands-only\nAllowUsers {user}\nLogLevel ERROR\n\
                 AcceptEnv GIT_PROTOCOL\n",
                host_key.display(),
                dir.path().join("sshd.pid").display(),
                authorized_keys.display()
            ),
        )?;
        let child = tokio::process::Command::new(sshd)
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let public = std::fs::read_to_string(host_key.with_extension("pub"))?;
        let host_key_line = public.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
        let known_hosts = dir.path().join("known_hosts");
        std::fs::write(&known_hosts, format!("[127.0.0.1]:{port} {host_key_line}\n"))?;
        let ssh = FakeGitlabSsh { child, port, user, known_hosts, _dir: dir };
        // Ready when it accepts connections.
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return Ok(ssh);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("sshd did not listen on 127.0.0.1:{port} within 5 s")
    }
}

// ---------------------------------------------------------------------------
// Repositories

const PRE_RECEIVE: &str = r#"#!/bin/sh
# Installed by bidsflux's fake GitLab (crates/fake-gitlab/src/lib.rs) to
# enforce protected branches as GitLab does on push: no deletion, no push by
# users below the rule's push level, no non-fast-forward update unless force
# push is allowed. The server passes the rules, evaluated for the pushing user,
# in FAKE_GITLAB_PROTECTED: one "<may push 0|1> <may force 0|1> <pattern>" a line.
status=0
while read -r old new ref; do
  case "$ref" in refs/heads/*) ;; *) continue ;; esac
  branch=${ref#refs/heads/}
  matched=0; push=0; force=1
  while read -r may_push may_force pattern; do
    [ -n "$pattern" ] || continue
    case "$branch" in
      $pattern)
        matched=1
        [ "$may_push" = 1 ] && push=1
        [ "$may_force" = 1 ] || force=0 ;;
    esac
  done <<EOF
$FAKE_GITLAB_PROTECTED
EOF
  [ "$matched" = 1 ] || continue
  case "$new" in
    *[!0]*) ;;
    *) echo "GitLab: You can only delete protected branches using the web interface." >&2
       status=1; continue ;;
  esac
  if [ "$push" != 1 ]; then
    echo "GitLab: You are not allowed to push code to protected branches on this project." >&2
    status=1; continue
  fi
  case "$old" in
    *[!0]*)
      if [ "$force" != 1 ] && ! git merge-base --is-ancestor "$old" "$new"; then
        echo "GitLab: You are not allowed to force push code to a protected branch on this project." >&2
        status=1
      fi ;;
  esac
done
exit $status
"#;

fn repo_dir(env: &Env, p: &Project) -> PathBuf {
    env.repos.join(format!("{}.git", p.path_with_namespace))
}

/// Runs git in `dir` (no system or global config) and returns stdout.
fn git(dir: &Path, args: &[&str], stdin: Option<&[u8]>) -> anyhow::Result<String> {
    git_as(dir, args, stdin, "Fake GitLab")
}

/// [`git`] with `author` as the author and committer name.
fn git_as(dir: &Path, args: &[&str], stdin: Option<&[u8]>, author: &str) -> anyhow::Result<String> {
    let mut cmd = std::process::Command::new("git");
    cmd.current_dir(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", author)
        .env("GIT_AUTHOR_EMAIL", "fake-gitlab@example.com")
        .env("GIT_COMMITTER_NAME", author)
        .env("GIT_COMMITTER_EMAIL", "fake-gitlab@example.com")
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input)?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        anyhow::bail!("git {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn init_repo(env: &Env, p: &Project, readme_author: Option<&str>) -> anyhow::Result<()> {
    let dir = repo_dir(env, p);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    git(&dir, &["init", "--bare", "--quiet", &format!("--initial-branch={}", p.default_branch)], None)?;
    git(&dir, &["config", "http.receivepack", "true"], None)?;
    let hook = dir.join("hooks").join("pre-receive");
    std::fs::create_dir_all(dir.join("hooks"))?;
    std::fs::write(&hook, PRE_RECEIVE)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755))?;
    }
    if let Some(author) = readme_author {
        let blob = git(&dir, &["hash-object", "-w", "--stdin"], Some(format!("# {}\n", p.name).as_bytes()))?;
        let tree = git(&dir, &["mktree"], Some(format!("100644 blob {}\tREADME.md\n", blob.trim()).as_bytes()))?;
        let author = if author.is_empty() { "Administrator" } else { author };
        let commit = git_as(&dir, &["commit-tree", tree.trim(), "-m", "Initial commit"], None, author)?;
        git(&dir, &["update-ref", &format!("refs/heads/{}", p.default_branch), commit.trim()], None)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Time

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// (year, month, day) of a day count since 1970-01-01 (H. Hinnant's civil_from_days).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn now_iso() -> String {
    let s = unix_now();
    let (y, m, d) = civil((s / 86_400) as i64);
    let t = s % 86_400;
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.000Z", t / 3600, t % 3600 / 60, t % 60)
}

fn today() -> String {
    let (y, m, d) = civil((unix_now() / 86_400) as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_like_gitlab() {
        assert!(wildcard_match("convert/*", "convert/sub-01"));
        assert!(wildcard_match("convert/*", "convert/a/b"));
        assert!(!wildcard_match("convert/*", "main"));
        assert!(wildcard_match("*-stable", "1-0-stable"));
        assert!(wildcard_match("main", "main"));
        assert!(!wildcard_match("main", "main2"));
        assert!(wildcard_match("a*b*c", "axxbyyc"));
        assert!(!wildcard_match("a*b*c", "acb"));
    }

    #[test]
    fn dates() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(19_723), (2024, 1, 1));
        assert_eq!(civil(19_782), (2024, 2, 29));
        assert!(is_date("2024-02-29"));
        assert!(!is_date("2024-2-29"));
    }

    #[test]
    fn paths() {
        assert!(valid_path("sub-01_x.y"));
        assert!(!valid_path("-x"));
        assert!(!valid_path("x.git"));
        assert!(!valid_path("a/b"));
        assert!(!valid_path("a b"));
    }

    #[test]
    fn cgi_header_end() {
        assert_eq!(header_end(b"Status: 200\r\n\r\nbody"), Some((11, 15)));
        assert_eq!(header_end(b"A: b\n\nbody"), Some((4, 6)));
        assert_eq!(header_end(b"A: b\r\n"), None);
    }
}
