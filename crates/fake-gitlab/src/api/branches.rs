//! Branches, read from the real repository:
//! `GET /projects/:id/repository/branches[/:branch]` (`search`).

use std::path::Path;

use serde_json::{Value, json};

use super::protected_branches::wildcard_match;
use crate::params::Params;
use crate::replies::{ApiErr, Reply, ok};
use crate::repos::{Env, git, repo_dir};
use crate::state::{Project, ProtectedBranch, State, User, access};

impl State {
    /// `GET /projects/:id/repository/branches`.
    pub(crate) fn list_branches(&self, env: &Env, u: &User, p: &str, params: &Params) -> Result<Reply, ApiErr> {
        let p = self.find_project(u, p)?;
        self.require_read_repo(u, &p)?;
        let out = git(&repo_dir(env, &p), &["for-each-ref", "--format=%(refname:lstrip=2)", "refs/heads"], None)
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

    /// `GET /projects/:id/repository/branches/:branch`.
    pub(crate) fn get_branch(&self, env: &Env, u: &User, p: &str, branch: &str) -> Result<Reply, ApiErr> {
        let p = self.find_project(u, p)?;
        self.require_read_repo(u, &p)?;
        self.branch_json(env, &p, branch).map_or_else(|| Err(ApiErr::not_found("Branch")), ok)
    }

    fn branch_json(&self, env: &Env, p: &Project, name: &str) -> Option<Value> {
        if name.starts_with('-') {
            return None;
        }
        let commit = self.commit_json(&repo_dir(env, p), p, &format!("refs/heads/{name}"))?;
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
            "commit": commit,
        }))
    }

    /// The commit `rev` (a full ref name or an object id) of the repository
    /// `dir` of `p` as GitLab shows commits, if it exists.
    pub(crate) fn commit_json(&self, dir: &Path, p: &Project, rev: &str) -> Option<Value> {
        let format = "--format=%H%x00%h%x00%s%x00%an%x00%ae%x00%aI%x00%cn%x00%ce%x00%cI%x00%P%x00%B";
        let out = git(dir, &["log", "-1", format, rev, "--"], None).ok()?;
        let f: Vec<&str> = out.splitn(11, '\0').collect();
        if f.len() < 11 {
            return None;
        }
        Some(json!({
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
        }))
    }
}
