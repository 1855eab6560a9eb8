//! The fake's state, GitLab's data model: users, tokens, groups, projects,
//! memberships, protected branches, CI/CD variables, runners and SSH keys,
//! with the lookups every part of the fake uses. A leaf: it uses no other
//! module of the crate (what the API does with the state is in `api`, who may
//! do it in `permissions`).

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

/// An SSH key of a user (`POST /users/:id/keys`, or seeded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshKey {
    /// Key id.
    pub id: u64,
    /// Owner.
    pub user_id: u64,
    /// Title.
    pub title: String,
    /// The public key as given, trimmed (`ssh-ed25519 AAAA... comment`).
    pub key: String,
    /// `auth`, `signing` or `auth_and_signing`.
    pub usage_type: String,
    /// Expiry (ISO 8601), if any.
    pub expires_at: Option<String>,
    /// Creation time.
    pub created_at: String,
}

/// Everything the fake knows: what GitLab keeps in its database.
#[derive(Debug, Default)]
pub(crate) struct State {
    pub(crate) url: String,
    pub(crate) admin_token: String,
    pub(crate) admin_id: u64,
    pub(crate) users: Vec<User>,
    pub(crate) tokens: Vec<PersonalAccessToken>,
    pub(crate) groups: Vec<Group>,
    pub(crate) projects: Vec<Project>,
    pub(crate) members: Vec<Member>,
    pub(crate) protected: Vec<ProtectedBranch>,
    pub(crate) variables: Vec<Variable>,
    pub(crate) runners: Vec<Runner>,
    pub(crate) ssh_keys: Vec<SshKey>,
    pub(crate) next_id: u64,
}

/// Case-insensitive equality, as GitLab compares paths and names.
pub(crate) fn ci_eq(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

impl State {
    /// A new id from the counter shared by namespaces, keys and protected branch rules.
    pub(crate) fn next(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub(crate) fn group_by_id(&self, id: u64) -> Option<&Group> {
        self.groups.iter().find(|g| g.id == id)
    }

    pub(crate) fn group_by_path(&self, full_path: &str) -> Option<&Group> {
        let p = full_path.trim_matches('/');
        self.groups.iter().find(|g| ci_eq(&g.full_path, p))
    }

    pub(crate) fn group_by_ref(&self, r: &str) -> Option<&Group> {
        match r.parse::<u64>() {
            Ok(id) => self.group_by_id(id),
            Err(_) => self.group_by_path(r),
        }
    }

    pub(crate) fn project_by_path(&self, pwn: &str) -> Option<&Project> {
        let p = pwn.trim_matches('/');
        let p = p.strip_suffix(".git").unwrap_or(p);
        self.projects.iter().find(|x| ci_eq(&x.path_with_namespace, p))
    }

    pub(crate) fn project_by_ref(&self, r: &str) -> Option<&Project> {
        match r.parse::<u64>() {
            Ok(id) => self.projects.iter().find(|p| p.id == id),
            Err(_) => self.project_by_path(r),
        }
    }

    pub(crate) fn user_by_ref(&self, r: &str) -> Option<&User> {
        match r.parse::<u64>() {
            Ok(id) => self.users.iter().find(|u| u.id == id),
            Err(_) => self.users.iter().find(|u| ci_eq(&u.username, r)),
        }
    }

    /// `(namespace id, full path, kind, Some(group))` for a group or personal namespace.
    pub(crate) fn namespace_by_ref(&self, r: &str) -> Option<(u64, String, &'static str)> {
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

    pub(crate) fn namespace_owner(&self, ns: u64) -> Option<&User> {
        self.users.iter().find(|u| u.namespace_id == ns)
    }

    /// The group and its ancestors, nearest first.
    pub(crate) fn ancestors(&self, gid: u64) -> Vec<&Group> {
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

    pub(crate) fn is_descendant(&self, gid: u64, ancestor: u64) -> bool {
        self.ancestors(gid).iter().any(|g| g.id == ancestor)
    }
}
