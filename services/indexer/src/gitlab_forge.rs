//! The GitLab forge: session projects in GitLab, as the original BIDS-flux
//! indexer (python-gitlab) made them.
//!
//! For `G/sourcedata/dicoms/<StudyInstanceUID>` it gets or creates every
//! namespace as a nested group, makes the bot (`GITLAB_BOT_USERNAME`) a
//! Maintainer of the study group `G`, gets or creates the project and returns
//! its HTTPS URL. Replicas race safely: a create answered "has already been
//! taken" is followed by a second look-up.
//!
//! Git authenticates with the token through an `http.<GITLAB_URL>/.extraHeader`
//! given in the environment ([`crate::forge::Project::git_config`]): the token is
//! never in a URL, an argument, a log line or an error.
//!
//! Connection failures, timeouts, 5xx and 429 are [`ForgeError::Unavailable`]
//! (retried); other refusals (401, 403, invalid paths, ...) are
//! [`ForgeError::Refused`] with GitLab's message. Every message is scrubbed of
//! a group rendered from patient data.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Mutex, MutexGuard};

use base64::Engine as _;
use bidsflux_gitlab_api::{Client, Fail};
use gitlab::api::Endpoint;
use gitlab::api::common::{AccessLevel, VisibilityLevel};
use gitlab::api::endpoint_prelude::Method;
use gitlab::api::groups::members::{AddGroupMember, EditGroupMember};
use gitlab::api::groups::{CreateGroup, Group};
use gitlab::api::projects::protected_branches::ProtectBranch;
use gitlab::api::projects::{CreateProject, Project as GetProject};
use gitlab::api::users::Users;
use serde::Deserialize;

use crate::config::{GitTransport, GitlabConfig, Visibility};
use crate::forge::{Forge, ForgeError, Project, ProjectPath};

/// GitLab's Maintainer level.
const MAINTAINER: u64 = 40;

/// Session projects in GitLab. Cheap to create: nothing is contacted until the
/// first [`Forge::ensure_project`].
pub struct GitlabForge {
    config: GitlabConfig,
    /// The REST client (built on first use).
    api: Client,
    cache: Mutex<Cache>,
    git_config: Vec<(String, String)>,
}

impl fmt::Debug for GitlabForge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GitlabForge")
            .field("url", &self.config.url)
            .field("bot_username", &self.config.bot_username)
            .field("visibility", &self.config.visibility)
            .finish_non_exhaustive()
    }
}

/// What this replica already knows (ids do not change; cleared after errors).
#[derive(Debug, Default)]
struct Cache {
    /// Group id by full path.
    groups: HashMap<String, u64>,
    /// Groups where the bot is known to be at least Maintainer.
    maintained: HashSet<u64>,
    bot_id: Option<u64>,
}

/// A GitLab failure as the forge reports it, patient values redacted.
trait IntoForgeError {
    fn into_forge_error(self, path: &ProjectPath) -> ForgeError;
}

impl IntoForgeError for Fail {
    fn into_forge_error(self, path: &ProjectPath) -> ForgeError {
        match self {
            Self::Unavailable(m) => ForgeError::Unavailable(path.redact(&m)),
            Self::NotFound(m) | Self::Taken(m) | Self::Conflict(m) | Self::Refused(m) => {
                ForgeError::Refused(path.redact(&m))
            }
        }
    }
}

/// `GET /groups/:id/members/all/:user_id`: a member's level, inherited included.
#[derive(Debug)]
struct InheritedMember {
    group: u64,
    user: u64,
}

impl Endpoint for InheritedMember {
    fn method(&self) -> Method {
        Method::GET
    }

    fn endpoint(&self) -> Cow<'static, str> {
        format!("groups/{}/members/all/{}", self.group, self.user).into()
    }
}

#[derive(Debug, Deserialize)]
struct IdOnly {
    id: u64,
}

#[derive(Debug, Deserialize)]
struct UserInfo {
    id: u64,
    username: String,
}

#[derive(Debug, Deserialize)]
struct MemberInfo {
    access_level: u64,
}

#[derive(Debug, Deserialize)]
struct ProjectInfo {
    http_url_to_repo: String,
}

fn lock(m: &Mutex<Cache>) -> MutexGuard<'_, Cache> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn visibility(v: Visibility) -> VisibilityLevel {
    match v {
        Visibility::Private => VisibilityLevel::Private,
        Visibility::Internal => VisibilityLevel::Internal,
        Visibility::Public => VisibilityLevel::Public,
    }
}

/// `s` quoted for the shell git runs `core.sshCommand` with.
fn shell_quoted(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The study group of `G/sourcedata/dicoms/<uid>` (else the project's namespace).
fn study_group(segments: &[&str]) -> usize {
    let n = segments.len();
    if n >= 4 && segments[n - 3] == "sourcedata" && segments[n - 2] == "dicoms" { n - 3 } else { n - 1 }
}

impl GitlabForge {
    /// A forge for `config` (nothing is contacted yet).
    pub fn new(config: GitlabConfig) -> Self {
        let api = Client::new(&config.url, config.token.clone(), config.request_timeout);
        let git_config = match &config.transport {
            GitTransport::Https => {
                let credentials =
                    base64::engine::general_purpose::STANDARD.encode(format!("oauth2:{}", config.token.expose()));
                // Scoped to GitLab's URL: git sends it to no other server.
                vec![(format!("http.{}/.extraHeader", config.url), format!("Authorization: Basic {credentials}"))]
            }
            // The key the indexer wrote at start; only GitLab's listed host keys are trusted.
            GitTransport::Ssh(ssh) => vec![(
                "core.sshCommand".to_owned(),
                format!(
                    "ssh -i {} -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=yes \
                     -o UserKnownHostsFile={} -o ConnectTimeout=30",
                    shell_quoted(&ssh.key_file.to_string_lossy()),
                    shell_quoted(&ssh.known_hosts.to_string_lossy())
                ),
            )],
        };
        Self { config, api, cache: Mutex::new(Cache::default()), git_config }
    }

    /// The id of the group `full` (`segments[..depth]`), created if missing.
    async fn group(
        &self,
        path: &ProjectPath,
        segments: &[&str],
        depth: usize,
        parent: Option<u64>,
    ) -> Result<u64, Fail> {
        let full = segments[..depth].join("/");
        if let Some(&id) = lock(&self.cache).groups.get(&full) {
            return Ok(id);
        }
        let shown = path.shown_prefix(&full);
        let get_what = format!("get group {shown}");
        let lookup = || self.api.get::<IdOnly, _>(&get_what, Group::builder().group(full.as_str()).build());
        let id = match lookup().await {
            Ok(g) => g.id,
            Err(Fail::NotFound(_)) => {
                let segment = segments[depth - 1];
                let mut create = CreateGroup::builder();
                create.name(segment).path(segment).visibility(visibility(self.config.visibility));
                if let Some(parent) = parent {
                    create.parent_id(parent);
                }
                let create_what = format!("create group {shown}");
                match self.api.get::<IdOnly, _>(&create_what, create.build()).await {
                    Ok(g) => {
                        tracing::info!(group = shown, "created GitLab group");
                        g.id
                    }
                    // Another replica won the race: use its group.
                    Err(Fail::Taken(m)) => match lookup().await {
                        Ok(g) => g.id,
                        Err(Fail::NotFound(_)) => return Err(Fail::Refused(m)),
                        Err(e) => return Err(e),
                    },
                    // The parent vanished (NotFound escapes: see `ensure_project`).
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        lock(&self.cache).groups.insert(full, id);
        Ok(id)
    }

    async fn bot_id(&self) -> Result<u64, Fail> {
        if let Some(id) = lock(&self.cache).bot_id {
            return Ok(id);
        }
        let bot = self.config.bot_username.as_str();
        let what = format!("look up the bot user {bot:?} (GITLAB_BOT_USERNAME)");
        let users: Vec<UserInfo> = self.api.get(&what, Users::builder().username(bot).build()).await?;
        let id = users
            .iter()
            .find(|u| u.username.eq_ignore_ascii_case(bot))
            .map(|u| u.id)
            .ok_or_else(|| Fail::Refused(format!("{what}: GitLab has no user {bot:?}")))?;
        lock(&self.cache).bot_id = Some(id);
        Ok(id)
    }

    /// Makes the bot at least Maintainer of the group `group` (shown as `shown`).
    async fn bot_maintains(&self, group: u64, shown: &str) -> Result<(), Fail> {
        if lock(&self.cache).maintained.contains(&group) {
            return Ok(());
        }
        let bot = self.bot_id().await?;
        let name = &self.config.bot_username;
        let level = || async {
            match self
                .api
                .call::<MemberInfo, _>(
                    &format!("get {name}'s access to group {shown}"),
                    InheritedMember { group, user: bot },
                )
                .await
            {
                Ok(m) => Ok(m.access_level),
                Err(Fail::NotFound(_)) => Ok(0),
                Err(e) => Err(e),
            }
        };
        if level().await? < MAINTAINER {
            let what = format!("make {name} Maintainer of group {shown}");
            let add = AddGroupMember::builder().group(group).user(bot).access_level(AccessLevel::Maintainer).build();
            match self.api.get::<MemberInfo, _>(&what, add).await {
                Ok(_) => tracing::info!(group = shown, bot = name, "made the bot Maintainer of the study group"),
                // Already a direct member: added meanwhile by another replica, or below Maintainer.
                Err(Fail::Conflict(_)) => {
                    if level().await? < MAINTAINER {
                        let edit = EditGroupMember::builder()
                            .group(group)
                            .user(bot)
                            .access_level(AccessLevel::Maintainer)
                            .build();
                        self.api.get::<MemberInfo, _>(&what, edit).await?;
                        tracing::info!(group = shown, bot = name, "raised the bot to Maintainer of the study group");
                    }
                }
                Err(e) => return Err(e),
            }
        }
        lock(&self.cache).maintained.insert(group);
        Ok(())
    }

    async fn project(&self, path: &ProjectPath, namespace: u64, name: &str) -> Result<ProjectInfo, Fail> {
        let shown = path.shown();
        let get_what = format!("get project {shown}");
        let lookup = || self.api.get::<ProjectInfo, _>(&get_what, GetProject::builder().project(path.as_str()).build());
        match lookup().await {
            Ok(p) => return Ok(p),
            Err(Fail::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        let create = CreateProject::builder()
            .name(name)
            .path(name)
            .namespace_id(namespace)
            .visibility(visibility(self.config.visibility))
            .initialize_with_readme(false)
            .build();
        let create_what = format!("create project {shown}");
        match self.api.get::<ProjectInfo, _>(&create_what, create).await {
            Ok(p) => {
                tracing::info!(project = shown, "created GitLab project");
                Ok(p)
            }
            Err(Fail::Taken(m)) => match lookup().await {
                Err(Fail::NotFound(_)) => Err(Fail::Refused(m)),
                r => r,
            },
            // The namespace vanished (NotFound escapes: see `ensure_project`).
            Err(e) => Err(e),
        }
    }

    async fn ensure(&self, path: &ProjectPath) -> Result<Project, Fail> {
        let segments: Vec<&str> = path.as_str().split('/').collect();
        if segments.len() < 2 {
            return Err(Fail::Refused(format!("project {}: GitLab projects need a group", path.shown())));
        }
        let study_depth = study_group(&segments);
        let mut parent = None;
        for depth in 1..segments.len() {
            let id = self.group(path, &segments, depth, parent).await?;
            if depth == study_depth {
                self.bot_maintains(id, &path.shown_prefix(&segments[..depth].join("/"))).await?;
            }
            parent = Some(id);
        }
        let namespace = parent.ok_or_else(|| Fail::Refused("no namespace".into()))?;
        let name = segments.last().copied().unwrap_or_default();
        let info = self.project(path, namespace, name).await?;
        // Built from our own path (GitLab matches it case-insensitively), so
        // that the redaction of a patient group finds it in git's errors;
        // and where the API was reached, so the credentials apply (GitLab's
        // reported external URL may be another address, e.g. in a swarm).
        let push_url = match &self.config.transport {
            GitTransport::Ssh(ssh) => format!("ssh://{}@{}:{}/{}.git", ssh.user, ssh.host, ssh.port, path.as_str()),
            GitTransport::Https => format!("{}/{}.git", self.config.url, path.as_str()),
        };
        Ok(Project { push_url, clone_url: info.http_url_to_repo, git_config: self.git_config.clone() })
    }
}

impl GitlabForge {
    /// Runs `op`; a 404 from a cached id (a group deleted since) clears the
    /// cache and runs it once more (look-ups answer 404 by creating, so a
    /// second 404 is refused). Errors clear the cache.
    async fn with_fresh_cache<T, F, Fut>(&self, path: &ProjectPath, op: F) -> Result<T, ForgeError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, Fail>>,
    {
        let result = match op().await {
            Err(Fail::NotFound(_)) if !lock(&self.cache).groups.is_empty() => {
                *lock(&self.cache) = Cache::default();
                op().await
            }
            r => r,
        };
        result.map_err(|e| {
            *lock(&self.cache) = Cache::default();
            e.into_forge_error(path)
        })
    }

    async fn ensure_groups(&self, path: &ProjectPath) -> Result<(), Fail> {
        let segments: Vec<&str> = path.as_str().split('/').collect();
        let mut parent = None;
        for depth in 1..=segments.len() {
            parent = Some(self.group(path, &segments, depth, parent).await?);
        }
        Ok(())
    }

    async fn protect(&self, path: &ProjectPath, branches: &[String]) -> Result<(), Fail> {
        for branch in branches {
            let what = format!("protect branch {branch} of {}", path.shown());
            let protect = ProtectBranch::builder()
                .project(path.as_str())
                .name(branch.as_str())
                .build()
                .map_err(|e| Fail::Refused(format!("{what}: {e}")))?;
            match self.api.call::<(), _>(&what, gitlab::api::ignore(protect)).await {
                Ok(_) => tracing::info!(project = path.shown(), branch, "protected branch"),
                // "Protected branch 'dev' already exists": a site's own settings stay.
                Err(Fail::Conflict(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Forge for GitlabForge {
    async fn ensure_project(&self, path: &ProjectPath) -> Result<Project, ForgeError> {
        self.with_fresh_cache(path, || self.ensure(path)).await
    }

    async fn ensure_group(&self, path: &ProjectPath) -> Result<(), ForgeError> {
        self.with_fresh_cache(path, || self.ensure_groups(path)).await
    }

    async fn protect_branches(&self, path: &ProjectPath, branches: &[String]) -> Result<(), ForgeError> {
        self.with_fresh_cache(path, || self.protect(path, branches)).await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bidsflux_config::Secret;

    use super::*;

    fn forge(url: &str) -> GitlabForge {
        GitlabForge::new(GitlabConfig {
            url: url.into(),
            token: Secret::new("glpat-abc"),
            bot_username: "dicom_bot".into(),
            visibility: Visibility::Private,
            request_timeout: Duration::from_secs(5),
            transport: GitTransport::Https,
        })
    }

    #[test]
    fn git_credentials_are_a_header_scoped_to_gitlab() {
        let f = forge("https://gitlab.example.org");
        let expected = base64::engine::general_purpose::STANDARD.encode("oauth2:glpat-abc");
        assert_eq!(
            f.git_config,
            vec![(
                "http.https://gitlab.example.org/.extraHeader".to_owned(),
                format!("Authorization: Basic {expected}")
            )]
        );
        assert!(!format!("{f:?}").contains("glpat-abc"));
    }

    #[test]
    fn ssh_pushes_with_the_written_key_and_known_hosts_only() {
        let mut config = forge("https://gitlab.example.org").config;
        config.transport = GitTransport::Ssh(crate::config::SshTransport {
            host: "gitlab.example.org".into(),
            port: 222,
            user: "git".into(),
            key: Secret::new("-----BEGIN OPENSSH PRIVATE KEY-----"),
            key_file: "/work/.ssh/gitlab_key".into(),
            known_hosts: "/run/secrets/it's hosts".into(),
        });
        let f = GitlabForge::new(config);
        assert_eq!(f.git_config.len(), 1);
        let (key, command) = &f.git_config[0];
        assert_eq!(key, "core.sshCommand");
        assert!(command.starts_with("ssh -i '/work/.ssh/gitlab_key' "), "{command}");
        assert!(command.contains("StrictHostKeyChecking=yes"), "{command}");
        assert!(command.contains("UserKnownHostsFile='/run/secrets/it'\\''s hosts'"), "{command}");
        assert!(!command.contains("PRIVATE KEY"));
    }

    #[test]
    fn the_study_group_is_above_sourcedata_dicoms() {
        assert_eq!(study_group(&["PI", "Study1", "sourcedata", "dicoms", "1.2.3"]), 2);
        assert_eq!(study_group(&["PI", "sourcedata", "dicoms", "1.2.3"]), 1);
        assert_eq!(study_group(&["PI", "project"]), 1);
    }
}
