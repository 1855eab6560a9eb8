//! Seeding and inspecting the state from tests, without the API: users and
//! tokens, SSH keys, groups, projects, memberships; and reading back what the
//! API made of it (groups, members, protected branches, variables, runners).

use std::path::PathBuf;

use crate::api::tokens::ALL_SCOPES;
use crate::clock::now_iso;
use crate::replies::ApiErr;
use crate::server::FakeGitlab;
use crate::state::{
    Group, Member, PersonalAccessToken, Project, ProtectedBranch, Runner, Scope, SshKey, User, Variable,
};

impl FakeGitlab {
    /// Creates a user (or reuses one of that name) and gives it a new token
    /// with all scopes. Returns `(user id, token)`.
    pub fn add_user(&self, username: &str, admin: bool) -> (u64, String) {
        let mut st = self.state();
        let id = match st.users.iter().find(|u| u.username.eq_ignore_ascii_case(username)) {
            Some(u) => u.id,
            None => st.insert_user(username, username, &format!("{username}@example.com"), admin),
        };
        let token = st.insert_token(id, &format!("{username}-token"), &ALL_SCOPES, None).token;
        (id, token)
    }

    /// A new token for a user with the given scopes and expiry date (`YYYY-MM-DD`).
    pub fn add_token(&self, user_id: u64, scopes: &[&str], expires_at: Option<&str>) -> String {
        self.state().insert_token(user_id, "seeded", scopes, expires_at.map(str::to_owned)).token
    }

    /// Registers an SSH public key (`ssh-ed25519 AAAA...`) of a user, as
    /// `POST /users/:id/keys` would but without its checks (format,
    /// uniqueness); returns the key id. Keys added before
    /// [`FakeGitlab::start_ssh`] may log in.
    pub fn add_ssh_key(&self, user_id: u64, public_key: &str) -> u64 {
        let mut st = self.state();
        let id = st.next();
        st.ssh_keys.push(SshKey {
            id,
            user_id,
            title: format!("seeded key {id}"),
            key: public_key.trim().to_owned(),
            usage_type: "auth_and_signing".to_owned(),
            expires_at: None,
            created_at: now_iso(),
        });
        id
    }

    /// Creates the groups of `full_path` that are missing (private, owned by
    /// `root`) and returns the id of the last one.
    pub fn add_group(&self, full_path: &str) -> anyhow::Result<u64> {
        let mut st = self.state();
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
        let mut st = self.state();
        let ns_id = st.namespace_by_ref(ns).ok_or_else(|| anyhow::anyhow!("namespace {ns} not found"))?.0;
        let admin = st.admin_id;
        let env = self.inner.shared.env();
        let p = st.create_project(&env, admin, path, path, ns_id, "main", "private", "", false).map_err(anyhow_err)?;
        Ok(p.id)
    }

    /// Sets (adds or changes) a direct membership of a group (by full path) or
    /// project (by path with namespace): `target` is tried as a group first.
    pub fn set_member(&self, target: &str, user_id: u64, access_level: u64) -> anyhow::Result<()> {
        let mut st = self.state();
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
        self.state().users.clone()
    }

    /// A user by name.
    pub fn user(&self, username: &str) -> Option<User> {
        self.state().users.iter().find(|u| u.username.eq_ignore_ascii_case(username)).cloned()
    }

    /// All personal access tokens.
    pub fn tokens(&self) -> Vec<PersonalAccessToken> {
        self.state().tokens.clone()
    }

    /// All groups, in creation order.
    pub fn groups(&self) -> Vec<Group> {
        self.state().groups.clone()
    }

    /// A group by full path (case-insensitive, like GitLab's routes).
    pub fn group(&self, full_path: &str) -> Option<Group> {
        self.state().group_by_path(full_path).cloned()
    }

    /// All projects, in creation order.
    pub fn projects(&self) -> Vec<Project> {
        self.state().projects.clone()
    }

    /// A project by path with namespace.
    pub fn project(&self, path_with_namespace: &str) -> Option<Project> {
        self.state().project_by_path(path_with_namespace).cloned()
    }

    /// Direct members of a group (full path) or else a project (path with namespace).
    pub fn members(&self, target: &str) -> Vec<Member> {
        let st = self.state();
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
        let st = self.state();
        match (st.group_by_path(target), st.project_by_path(target)) {
            (Some(g), _) => st.group_level(g.id, user_id),
            (None, Some(p)) => st.project_level(p.id, user_id),
            (None, None) => 0,
        }
    }

    /// Protected branch rules of a project.
    pub fn protected_branches(&self, path_with_namespace: &str) -> Vec<ProtectedBranch> {
        let st = self.state();
        let Some(p) = st.project_by_path(path_with_namespace) else { return Vec::new() };
        st.protected.iter().filter(|b| b.project_id == p.id).cloned().collect()
    }

    /// CI/CD variables of the instance (`None`), or of a group (full path) or
    /// else a project (path with namespace).
    pub fn variables(&self, target: Option<&str>) -> Vec<Variable> {
        let st = self.state();
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
        self.state().runners.clone()
    }

    /// All SSH keys (seeded with [`Self::add_ssh_key`] or added with `POST /users/:id/keys`).
    pub fn ssh_keys(&self) -> Vec<SshKey> {
        self.state().ssh_keys.clone()
    }

    /// The bare repository of a project.
    pub fn repo_dir(&self, path_with_namespace: &str) -> Option<PathBuf> {
        let st = self.state();
        st.project_by_path(path_with_namespace)
            .map(|p| self.inner.shared.repos.join(format!("{}.git", p.path_with_namespace)))
    }

    /// `http://oauth2:<token>@127.0.0.1:PORT/<path_with_namespace>.git`.
    pub fn git_url(&self, path_with_namespace: &str, token: &str) -> String {
        format!("http://oauth2:{token}@{}/{path_with_namespace}.git", self.addr)
    }
}

fn anyhow_err(e: ApiErr) -> anyhow::Error {
    anyhow::anyhow!("{} {}", e.status, e.body)
}
