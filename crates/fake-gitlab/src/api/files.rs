//! Repository files, written and read with git plumbing on the project's real
//! bare repository: `POST /projects/:id/repository/commits` (one commit of
//! `create`, `update`, `delete`, `move` and `chmod` actions; Developer, and
//! the protected branch rules of the target branch), `GET
//! /projects/:id/repository/files/:file_path` (`ref`) and `GET
//! …/files/:file_path/raw` (`ref`, the default branch if absent).
//!
//! A commit is made without a work tree: blobs with `hash-object`, the new
//! tree in a temporary index (`update-index --index-info`, `write-tree`),
//! then `commit-tree` and `update-ref` with the branch's old value, so a
//! concurrent push cannot be lost. Like GitLab's API (and unlike a push) it
//! does not run the `pre-receive` hook: the API checks the protected branch
//! rules itself.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine as _;
use serde_json::json;

use super::protected_branches::wildcard_match;
use crate::params::{ParamError, Params};
use crate::replies::{ApiErr, Reply, created, ok};
use crate::repos::{Env, git, git_env, repo_dir};
use crate::state::{Project, Scope, State, User, access};

/// Paths are given literally, never as pathspec patterns.
const LITERAL: (&str, &str) = ("GIT_LITERAL_PATHSPECS", "1");

/// An entry of a tree: mode, type and object id.
#[derive(Debug, Clone)]
struct Entry {
    mode: String,
    kind: String,
    oid: String,
}

/// One action of `POST /projects/:id/repository/commits`, its parameters checked.
#[derive(Debug)]
struct Action {
    /// `create`, `update`, `delete`, `move` or `chmod`.
    action: String,
    file_path: String,
    previous_path: Option<String>,
    /// Decoded content.
    content: Option<Vec<u8>>,
    execute_filemode: Option<bool>,
}

/// A failed git command: `500`.
fn internal(e: &anyhow::Error) -> ApiErr {
    ApiErr::message(500, format!("500 Internal Server Error: {e:#}"))
}

/// A `400 {"message": ...}` of the commit service.
fn rejected(message: &str) -> ApiErr {
    ApiErr::message(400, message)
}

/// The object id of the commit `rev` (branch, tag or commit id), if any.
fn resolve_commit(dir: &Path, rev: &str) -> Option<String> {
    if rev.is_empty() || rev.starts_with('-') {
        return None;
    }
    let spec = format!("{rev}^{{commit}}");
    let out = git(dir, &["rev-parse", "--verify", "--quiet", "--end-of-options", &spec], None).ok()?;
    Some(out.trim().to_owned()).filter(|s| !s.is_empty())
}

/// `ls-tree -z` output: entries by path.
fn parse_tree(out: &[u8]) -> BTreeMap<String, Entry> {
    let mut entries = BTreeMap::new();
    for record in out.split(|b| *b == 0).filter(|r| !r.is_empty()) {
        let record = String::from_utf8_lossy(record);
        let Some((meta, path)) = record.split_once('\t') else { continue };
        let mut meta = meta.split(' ');
        if let (Some(mode), Some(kind), Some(oid)) = (meta.next(), meta.next(), meta.next()) {
            entries
                .insert(path.to_owned(), Entry { mode: mode.to_owned(), kind: kind.to_owned(), oid: oid.to_owned() });
        }
    }
    entries
}

/// Every file (blobs and submodules) of the commit `commit`.
fn files_of(dir: &Path, commit: &str) -> anyhow::Result<BTreeMap<String, Entry>> {
    Ok(parse_tree(&git_env(dir, &["ls-tree", "-r", "-z", "--full-tree", commit], None, &[])?))
}

/// A file path as the commit service takes it: a leading `/` dropped; no
/// empty, `.`, `..` or `.git` component.
fn clean_path(path: &str) -> Result<String, ApiErr> {
    let path = path.strip_prefix('/').unwrap_or(path);
    if path.is_empty() {
        return Err(rejected("You must provide a file path"));
    }
    if path.split('/').any(|c| matches!(c, "" | "." | ".." | ".git")) {
        return Err(rejected("Path cannot include directory traversal"));
    }
    Ok(path.to_owned())
}

/// Whether `path` can be added to `files`: not there, no file where it needs
/// a directory, no directory of that name.
fn check_new(files: &BTreeMap<String, Entry>, path: &str) -> Result<(), ApiErr> {
    let mut dirs = path.match_indices('/').map(|(i, _)| &path[..i]);
    if files.contains_key(path) || dirs.any(|d| files.contains_key(d)) {
        return Err(rejected("A file with this name already exists"));
    }
    let prefix = format!("{path}/");
    if files.range(prefix.clone()..).next().is_some_and(|(k, _)| k.starts_with(&prefix)) {
        return Err(rejected("A directory with this name already exists"));
    }
    Ok(())
}

/// The existing file (blob) at `path`.
fn existing<'a>(files: &'a BTreeMap<String, Entry>, path: &str) -> Result<&'a Entry, ApiErr> {
    files.get(path).filter(|e| e.kind == "blob").ok_or_else(|| rejected("A file with this name doesn't exist"))
}

/// The actions of a commit, checked as GitLab's API layer checks them.
fn parse_actions(params: &Params) -> Result<Vec<Action>, ParamError> {
    let actions = params.objects("actions")?.ok_or_else(|| ParamError::missing("actions"))?;
    if actions.is_empty() {
        return Err(ParamError::new(400, "actions is empty"));
    }
    let mut out = Vec::new();
    for (i, a) in actions.iter().enumerate() {
        let name = |field: &str| format!("actions[{i}][{field}]");
        let action = a.str("action").filter(|s| !s.is_empty()).ok_or_else(|| ParamError::missing(&name("action")))?;
        if !matches!(action.as_str(), "create" | "update" | "delete" | "move" | "chmod") {
            return Err(ParamError::invalid(&name("action")));
        }
        let file_path = a.str("file_path").ok_or_else(|| ParamError::missing(&name("file_path")))?;
        let previous_path = a.str("previous_path");
        if action == "move" && previous_path.is_none() {
            return Err(ParamError::missing(&name("previous_path")));
        }
        let content = a.str("content");
        if action == "update" && content.is_none() {
            return Err(ParamError::missing(&name("content")));
        }
        let encoding = a.str("encoding").unwrap_or_else(|| "text".to_owned());
        let content = match (encoding.as_str(), content) {
            (_, None) => None,
            ("text", Some(c)) => Some(c.into_bytes()),
            ("base64", Some(c)) => {
                // Like Ruby's `Base64.decode64`: line breaks and blanks do not matter.
                let c: String = c.chars().filter(|ch| !ch.is_ascii_whitespace()).collect();
                let engines =
                    [base64::engine::general_purpose::STANDARD, base64::engine::general_purpose::STANDARD_NO_PAD];
                let decoded = engines.iter().find_map(|e| e.decode(&c).ok());
                Some(decoded.ok_or_else(|| ParamError::new(400, format!("{} is not valid base64", name("content"))))?)
            }
            _ => return Err(ParamError::invalid(&name("encoding"))),
        };
        let execute_filemode =
            a.bool("execute_filemode").map_err(|_| ParamError::invalid(&name("execute_filemode")))?;
        if action == "chmod" && execute_filemode.is_none() {
            return Err(ParamError::missing(&name("execute_filemode")));
        }
        out.push(Action { action, file_path, previous_path, content, execute_filemode });
    }
    Ok(out)
}

impl State {
    /// Whether `u` may push to `branch` of `p`: Developer, and if protected
    /// branch rules match the branch, one of them lets the user's level push.
    fn may_push_to(&self, u: &User, p: &Project, branch: &str) -> bool {
        let level = self.role(u, Scope::Project(p.id));
        let mut rules =
            self.protected.iter().filter(|b| b.project_id == p.id && wildcard_match(&b.name, branch)).peekable();
        level >= access::DEVELOPER
            && (rules.peek().is_none() || rules.any(|b| b.push_access_level != 0 && level >= b.push_access_level))
    }

    /// `POST /projects/:id/repository/commits`: `branch`, `commit_message`,
    /// `start_branch`, `actions`, `author_name`, `author_email`.
    pub(crate) fn create_commit(&self, env: &Env, u: &User, p: &str, params: &Params) -> Result<Reply, ApiErr> {
        let p = self.find_project(u, p)?;
        self.require_read_repo(u, &p)?;
        let branch = params.required("branch")?;
        let message = params.str("commit_message").ok_or_else(|| ParamError::missing("commit_message"))?;
        let actions = parse_actions(params)?;
        for unsupported in ["start_sha", "start_project"] {
            if params.str(unsupported).is_some_and(|s| !s.is_empty()) {
                return Err(ApiErr::error(400, format!("{unsupported} is not supported by the fake GitLab")));
            }
        }
        if params.bool("force")?.unwrap_or(false) {
            return Err(ApiErr::error(400, "force is not supported by the fake GitLab"));
        }
        let start_branch = params.str("start_branch").filter(|s| !s.is_empty()).unwrap_or_else(|| branch.clone());
        if !self.may_push_to(u, &p, &branch) {
            return Err(ApiErr::forbidden_because("You are not allowed to push into this branch"));
        }

        let dir = repo_dir(env, &p);
        let empty =
            git(&dir, &["for-each-ref", "--count=1", "refs/heads"], None).map_err(|e| internal(&e))?.trim().is_empty();
        let old = resolve_commit(&dir, &format!("refs/heads/{branch}"));
        let parent = if empty {
            None
        } else {
            let start = resolve_commit(&dir, &format!("refs/heads/{start_branch}"))
                .ok_or_else(|| rejected("You can only create or edit files when you are on a branch"))?;
            if start_branch != branch && old.is_some() {
                return Err(rejected(&format!(
                    "A branch called '{branch}' already exists. Switch to that branch in order to make changes"
                )));
            }
            Some(start)
        };
        if old.is_none() && git(&dir, &["check-ref-format", "--branch", &branch], None).is_err() {
            return Err(rejected("Branch name is invalid"));
        }

        let mut files = match &parent {
            Some(c) => files_of(&dir, c).map_err(|e| internal(&e))?,
            None => BTreeMap::new(),
        };
        let blob = |content: &[u8]| -> Result<String, ApiErr> {
            let out = git(&dir, &["hash-object", "-w", "--no-filters", "--stdin"], Some(content))
                .map_err(|e| internal(&e))?;
            Ok(out.trim().to_owned())
        };
        let mode = |exec: bool| if exec { "100755" } else { "100644" }.to_owned();
        for a in actions {
            let path = clean_path(&a.file_path)?;
            match a.action.as_str() {
                "create" => {
                    check_new(&files, &path)?;
                    let oid = blob(a.content.as_deref().unwrap_or_default())?;
                    let mode = mode(a.execute_filemode.unwrap_or(false));
                    files.insert(path, Entry { mode, kind: "blob".into(), oid });
                }
                "update" => {
                    let old = existing(&files, &path)?.clone();
                    let oid = blob(a.content.as_deref().unwrap_or_default())?;
                    let mode = a.execute_filemode.map_or(old.mode, mode);
                    files.insert(path, Entry { mode, kind: "blob".into(), oid });
                }
                "delete" => {
                    existing(&files, &path)?;
                    files.remove(&path);
                }
                "move" => {
                    let from = clean_path(a.previous_path.as_deref().unwrap_or_default())?;
                    let old = existing(&files, &from)?.clone();
                    files.remove(&from);
                    check_new(&files, &path)?;
                    let oid = match &a.content {
                        Some(c) => blob(c)?,
                        None => old.oid,
                    };
                    let mode = a.execute_filemode.map_or(old.mode, mode);
                    files.insert(path, Entry { mode, kind: "blob".into(), oid });
                }
                _ => {
                    let exec = a.execute_filemode.unwrap_or(false);
                    let old = existing(&files, &path)?.clone();
                    files.insert(path, Entry { mode: mode(exec), ..old });
                }
            }
        }

        // The new tree, through an index of its own.
        let tmp = tempfile::Builder::new()
            .prefix("fake-gitlab-index-")
            .tempdir()
            .map_err(|e| internal(&anyhow::Error::from(e)))?;
        let index = tmp.path().join("index");
        let index = index.to_string_lossy();
        let index_env = [("GIT_INDEX_FILE", index.as_ref())];
        let mut list = Vec::new();
        for (path, e) in &files {
            list.extend_from_slice(format!("{} {} {}\t{path}", e.mode, e.kind, e.oid).as_bytes());
            list.push(0);
        }
        let tree = git_env(&dir, &["read-tree", "--empty"], None, &index_env)
            .and_then(|_| git_env(&dir, &["update-index", "-z", "--index-info"], Some(&list), &index_env))
            .and_then(|_| git_env(&dir, &["write-tree"], None, &index_env))
            .map_err(|e| internal(&e))?;
        let tree = String::from_utf8_lossy(&tree).trim().to_owned();

        let author_name = params.str("author_name").filter(|s| !s.is_empty()).unwrap_or_else(|| u.name.clone());
        let author_email = params.str("author_email").filter(|s| !s.is_empty()).unwrap_or_else(|| u.email.clone());
        let identity = [
            ("GIT_AUTHOR_NAME", author_name.as_str()),
            ("GIT_AUTHOR_EMAIL", author_email.as_str()),
            ("GIT_COMMITTER_NAME", u.name.as_str()),
            ("GIT_COMMITTER_EMAIL", u.email.as_str()),
        ];
        let mut args = vec!["commit-tree", tree.as_str()];
        if let Some(parent) = &parent {
            args.extend(["-p", parent.as_str()]);
        }
        args.extend(["-F", "-"]);
        let commit = git_env(&dir, &args, Some(message.as_bytes()), &identity).map_err(|e| internal(&e))?;
        let commit = String::from_utf8_lossy(&commit).trim().to_owned();
        let refname = format!("refs/heads/{branch}");
        let reflog = format!("fake GitLab: commit by {} through the API", u.username);
        git(&dir, &["update-ref", "-m", &reflog, &refname, &commit, old.as_deref().unwrap_or("")], None)
            .map_err(|_| rejected("Could not update the branch: it changed while the commit was made"))?;

        let numstat =
            git(&dir, &["diff-tree", "--no-commit-id", "--numstat", "--no-renames", "-r", "--root", &commit], None)
                .map_err(|e| internal(&e))?;
        let (mut additions, mut deletions) = (0u64, 0u64);
        for line in numstat.lines() {
            let mut f = line.split('\t');
            additions += f.next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
            deletions += f.next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
        }
        let mut v =
            self.commit_json(&dir, &p, &commit).ok_or_else(|| ApiErr::message(500, "500 Internal Server Error"))?;
        if let Some(o) = v.as_object_mut() {
            o.insert("trailers".into(), json!({}));
            o.insert("extended_trailers".into(), json!({}));
            o.insert(
                "stats".into(),
                json!({ "additions": additions, "deletions": deletions, "total": additions + deletions }),
            );
            o.insert("status".into(), json!(null));
            o.insert("project_id".into(), json!(p.id));
            o.insert("last_pipeline".into(), json!(null));
        }
        created(v)
    }

    /// `GET /projects/:id/repository/files/:file_path` (`ref`), or with `raw`
    /// `…/raw` (`ref` optional: the default branch).
    pub(crate) fn get_file(
        &self,
        env: &Env,
        u: &User,
        p: &str,
        file_path: &str,
        params: &Params,
        raw: bool,
    ) -> Result<Reply, ApiErr> {
        let p = self.find_project(u, p)?;
        self.require_read_repo(u, &p)?;
        if file_path.split('/').any(|c| c == "..") {
            return Err(ParamError::new(400, "file_path should be a valid file path").into());
        }
        let reference = match params.str("ref") {
            Some(r) if r.is_empty() => return Err(ParamError::new(400, "ref is empty").into()),
            Some(r) => r,
            None if raw => p.default_branch.clone(),
            None => return Err(ParamError::missing("ref").into()),
        };
        let dir = repo_dir(env, &p);
        let commit = resolve_commit(&dir, &reference).ok_or_else(|| ApiErr::not_found("Commit"))?;
        let path = file_path.trim_start_matches('/');
        let listed =
            git_env(&dir, &["ls-tree", "-z", &commit, "--", path], None, &[LITERAL]).map_err(|e| internal(&e))?;
        let entry = parse_tree(&listed)
            .remove(path)
            .filter(|e| e.kind == "blob" && !path.is_empty())
            .ok_or_else(|| ApiErr::not_found("File"))?;
        let content = git_env(&dir, &["cat-file", "blob", &entry.oid], None, &[]).map_err(|e| internal(&e))?;
        let last = git_env(&dir, &["log", "-1", "--format=%H", &commit, "--", path], None, &[LITERAL])
            .map_err(|e| internal(&e))?;
        let last = String::from_utf8_lossy(&last).trim().to_owned();
        let file_name = path.rsplit('/').next().unwrap_or(path);
        let sha256 = sha256_hex(&content);
        let executable = entry.mode == "100755";
        if raw {
            let headers = [
                ("X-Gitlab-Blob-Id", entry.oid.clone()),
                ("X-Gitlab-Commit-Id", commit.clone()),
                ("X-Gitlab-Content-Sha256", sha256),
                ("X-Gitlab-Encoding", "base64".to_owned()),
                ("X-Gitlab-Execute-Filemode", executable.to_string()),
                ("X-Gitlab-File-Name", file_name.to_owned()),
                ("X-Gitlab-File-Path", path.to_owned()),
                ("X-Gitlab-Last-Commit-Id", last),
                ("X-Gitlab-Ref", reference),
                ("X-Gitlab-Size", content.len().to_string()),
            ];
            return Ok(Reply::Raw(content, headers.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()));
        }
        ok(json!({
            "file_name": file_name,
            "file_path": path,
            "size": content.len(),
            "encoding": "base64",
            "content_sha256": sha256,
            "ref": reference,
            "blob_id": entry.oid,
            "commit_id": commit,
            "last_commit_id": last,
            "execute_filemode": executable,
            "content": base64::engine::general_purpose::STANDARD.encode(&content),
        }))
    }
}

/// SHA-256 of `data` in lowercase hex (a file's `content_sha256`).
fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(data))
}
