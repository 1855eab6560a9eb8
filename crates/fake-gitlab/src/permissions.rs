//! Who is calling and what they may do: tokens and their scopes, GitLab's
//! roles with inherited memberships (the highest level wins), what a user may
//! see (private things they may not see are 404) and change (403), and what
//! a git fetch or push may do, over HTTP and SSH alike.

use serde_json::json;

use crate::clock::today;
use crate::replies::ApiErr;
use crate::repos::shell_pattern;
use crate::state::{Group, Project, Scope, State, User, access};

/// An authenticated user with the scopes of the token used.
#[derive(Debug, Clone)]
pub(crate) struct AuthUser {
    /// The user.
    pub(crate) user: User,
    /// Scopes of the token (or of the SSH key: read and write repository).
    pub(crate) scopes: Vec<String>,
    /// Id of the token (0 for an SSH key).
    pub(crate) token_id: u64,
}

/// What a git request may do.
#[derive(Debug)]
pub(crate) struct GitGrant {
    /// The project.
    pub(crate) path_with_namespace: String,
    /// Who (empty: anonymous).
    pub(crate) username: String,
    /// Lines `<may push 0|1> <may force 0|1> <pattern>` for the pre-receive hook.
    pub(crate) protected: String,
}

impl State {
    pub(crate) fn token_user(&self, token: &str) -> Option<AuthUser> {
        let today = today();
        let t = self.tokens.iter().find(|t| t.token == token)?;
        if t.revoked || t.expires_at.as_deref().is_some_and(|e| e <= today.as_str()) {
            return None;
        }
        let user = self.users.iter().find(|u| u.id == t.user_id)?.clone();
        Some(AuthUser { user, scopes: t.scopes.clone(), token_id: t.id })
    }

    pub(crate) fn authenticate(&self, token: Option<&str>, method: &str) -> Result<AuthUser, ApiErr> {
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

    pub(crate) fn direct_level(&self, source: Scope, uid: u64) -> Option<u64> {
        self.members.iter().find(|m| m.source == source && m.user_id == uid).map(|m| m.access_level)
    }

    pub(crate) fn group_level(&self, gid: u64, uid: u64) -> u64 {
        self.ancestors(gid).iter().filter_map(|g| self.direct_level(Scope::Group(g.id), uid)).max().unwrap_or(0)
    }

    pub(crate) fn project_level(&self, pid: u64, uid: u64) -> u64 {
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

    pub(crate) fn level(&self, source: Scope, uid: u64) -> u64 {
        match source {
            Scope::Group(g) => self.group_level(g, uid),
            Scope::Project(p) => self.project_level(p, uid),
            Scope::Instance => 0,
        }
    }

    /// The level a user acts with: admins act as [`access::ADMIN`].
    pub(crate) fn role(&self, u: &User, source: Scope) -> u64 {
        if u.admin { access::ADMIN } else { self.level(source, u.id) }
    }

    pub(crate) fn can_see_group(&self, u: &User, g: &Group) -> bool {
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

    pub(crate) fn can_see_project(&self, u: &User, p: &Project) -> bool {
        u.admin || p.visibility != "private" || self.project_level(p.id, u.id) > 0
    }

    pub(crate) fn find_group(&self, u: &User, r: &str) -> Result<Group, ApiErr> {
        match self.group_by_ref(r) {
            Some(g) if self.can_see_group(u, g) => Ok(g.clone()),
            _ => Err(ApiErr::not_found("Group")),
        }
    }

    pub(crate) fn find_project(&self, u: &User, r: &str) -> Result<Project, ApiErr> {
        match self.project_by_ref(r) {
            Some(p) if self.can_see_project(u, p) => Ok(p.clone()),
            _ => Err(ApiErr::not_found("Project")),
        }
    }

    pub(crate) fn find_source(&self, u: &User, kind: &str, r: &str) -> Result<Scope, ApiErr> {
        if kind == "groups" {
            Ok(Scope::Group(self.find_group(u, r)?.id))
        } else {
            Ok(Scope::Project(self.find_project(u, r)?.id))
        }
    }

    pub(crate) fn require(&self, u: &User, source: Scope, level: u64) -> Result<(), ApiErr> {
        if self.role(u, source) >= level { Ok(()) } else { Err(ApiErr::forbidden()) }
    }

    pub(crate) fn require_read_repo(&self, u: &User, p: &Project) -> Result<(), ApiErr> {
        if p.visibility == "private" && self.role(u, Scope::Project(p.id)) < access::REPORTER {
            Err(ApiErr::forbidden())
        } else {
            Ok(())
        }
    }

    /// What `user` may do with the repository of `repo` (scopes, role, protected branches).
    pub(crate) fn git_grant(&self, repo: &str, user: AuthUser, push: bool) -> Result<GitGrant, (u16, &'static str)> {
        pub(crate) const NOT_FOUND: &str =
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
}
