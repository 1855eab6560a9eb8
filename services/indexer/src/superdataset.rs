//! The study superdataset and the BIDS dataset of a study group `G`.
//!
//! - `G/sourcedata/dicoms/study`: created on first use from the `study`
//!   template (a DataLad dataset with `.ci-env.yml` and `.gitlab-ci.yml`);
//!   every session dataset is a subdataset of it, at the path rendered from
//!   `BIDSFLUX_SESSION_NAME_TEMPLATE` (default `{PatientName}`, `^` → `/`),
//!   recorded at the session's newest indexed commit.
//! - `G/bids`: created on first use from the `bids` template, with the study
//!   superdataset installed at `sourcedata/dicoms`, and the branches `main`,
//!   `BIDS_DEV_BRANCH` and `BIDS_BASE_BRANCH`.
//!
//! Subdataset URLs are relative (`../<StudyInstanceUID>.git`,
//! `../sourcedata/dicoms/study.git`): git and DataLad resolve them against the
//! URL the superdataset was cloned from, so HTTPS, SSH and a moved GitLab all
//! keep working.
//!
//! Replicas race: each change is a commit on the fetched `main`, pushed
//! without force. A push refused because `main` moved (another session was
//! added meanwhile) fetches the new `main` and applies the change again on it,
//! up to [`PUSH_ATTEMPTS`] times, so two sessions indexed at once both end up
//! in the superdataset. A change already present (redelivery) is not made again.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use bidsflux_service::Backoff;
use uuid::Uuid;

use crate::annex_branch::{BranchUpdate, Timestamp};
use crate::forge::Project;
use crate::git::{Git, GitError};
use crate::templates::{TemplateSet, Values};

/// How often a push refused because `main` moved is tried again on the new `main`.
pub const PUSH_ATTEMPTS: u32 = 12;

/// Where the study superdataset is installed in the BIDS dataset.
pub const BIDS_SOURCEDATA_PATH: &str = "sourcedata/dicoms";

/// The study superdataset's URL relative to the BIDS dataset's
/// (`G/bids` → `G/sourcedata/dicoms/study`).
pub const STUDY_URL_FROM_BIDS: &str = "../sourcedata/dicoms/study.git";

/// A subdataset to record: where, from where, which dataset, at which commit.
#[derive(Clone, PartialEq, Eq)]
pub struct Subdataset {
    /// Path in the superdataset (patient data for sessions: never log it).
    pub path: String,
    /// URL relative to the superdataset's.
    pub url: String,
    /// DataLad dataset id.
    pub id: String,
    /// Commit to record.
    pub commit: String,
}

impl std::fmt::Debug for Subdataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subdataset")
            .field("path", &bidsflux_session::REDACTED)
            .field("url", &self.url)
            .field("id", &self.id)
            .field("commit", &self.commit)
            .finish()
    }
}

/// The session URL relative to the study superdataset.
pub fn session_url(study: &str) -> String {
    format!("../{study}.git")
}

/// The session path cannot be used in the superdataset (dead-lettered: the
/// session dataset is pushed, only its superdataset entry is missing).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Conflict(pub String);

/// Which rule a session path breaks, if any (the message never quotes it).
pub fn session_path_problem(path: &str) -> Option<&'static str> {
    if path.is_empty() {
        Some("it is empty")
    } else if path.split('/').any(|s| s.is_empty() || s == "." || s == "..") {
        Some("it has an empty, '.' or '..' segment")
    } else if path.contains('\\') || path.chars().any(char::is_control) {
        Some("it contains a backslash or a control character")
    } else if path.split('/').any(|s| s.starts_with('.')) {
        Some("a segment starts with '.' (reserved for .git, .datalad and the CI files)")
    } else if path.split('/').any(|s| s.starts_with('-')) {
        Some("a segment starts with '-' (git refuses such submodule paths)")
    } else if path.split('/').any(|s| s.len() > 255) || path.len() > 4096 {
        Some("it is too long for a file system")
    } else {
        None
    }
}

/// The study superdataset after a session was recorded in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StudyUpdate {
    /// Its DataLad dataset id.
    pub dataset_id: String,
    /// Its `main` (with the session).
    pub commit: String,
    /// False when the session was already recorded (nothing pushed).
    pub pushed: bool,
    /// True when this call created the superdataset.
    pub created: bool,
    /// Pushes refused because another replica moved the superdataset first, then redone.
    pub push_retries: u32,
}

/// An entry of `.gitmodules`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Module {
    name: String,
    path: String,
    url: String,
    id: String,
}

/// Records `session` in the study superdataset `project` (creating the
/// superdataset from `template` if it has no `main`). `contains(a, b)` tells
/// whether session commit `b` contains commit `a` (so `a` must not replace
/// `b`); it fails rather than guess when it cannot tell.
pub async fn add_session<F, Fut>(
    git: &Git,
    work: &Path,
    project: &Project,
    template: &TemplateSet,
    values: &Values,
    session: &Subdataset,
    contains: F,
) -> anyhow::Result<StudyUpdate>
where
    F: Fn(String, String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    // Replicas race on this superdataset: the time from fetch to push is
    // kept to a few git processes, none of them touching a work tree.
    let remote = git.with_config(&project.git_config);
    for attempt in 0..PUSH_ATTEMPTS {
        let dir = work.join(format!("study-{attempt}"));
        git.init_work_repo(&dir).await.context("create work repository")?;
        let fetched = fetch_main(&remote, &dir, &project.push_url).await?;
        let base = if fetched {
            "refs/remotes/origin/main"
        } else {
            create_dataset(git, &dir, template, values, "[bidsflux] new study superdataset").await?;
            "refs/heads/main"
        };
        let created = !fetched;
        let recorded = record(git, &dir, base, session, &contains).await?;
        let dataset_id = read_dataset_id(git, &dir, base).await?;
        let commit = match recorded {
            Some(commit) => commit,
            None if !created => {
                let commit = git.run(&dir, &["rev-parse", base]).await.context("read the superdataset")?;
                return Ok(StudyUpdate {
                    dataset_id,
                    commit: commit.trim().to_owned(),
                    pushed: false,
                    created,
                    push_retries: attempt,
                });
            }
            None => anyhow::bail!("a new study superdataset did not record its first session"),
        };
        let main = format!("{commit}:refs/heads/main");
        let mut refs = vec![main.as_str()];
        if created {
            annex_init_dead(git, &dir).await?;
            refs.push("refs/heads/git-annex:refs/heads/git-annex");
        }
        if push(&remote, &dir, &project.push_url, &refs).await? {
            return Ok(StudyUpdate { dataset_id, commit, pushed: true, created, push_retries: attempt });
        }
        tracing::debug!(attempt, "the study superdataset moved while a session was added; adding it again");
        backoff(attempt).await;
    }
    anyhow::bail!("the study superdataset kept moving: {PUSH_ATTEMPTS} pushes were refused; retrying later")
}

/// Creates the BIDS dataset `project` if it has no `main` (from `template`,
/// with `study` installed at [`BIDS_SOURCEDATA_PATH`]), and the branches
/// `branches` it lacks, all at `main`'s commit. Returns whether anything was pushed.
pub async fn init_bids(
    git: &Git,
    work: &Path,
    project: &Project,
    template: &TemplateSet,
    values: &Values,
    study: &Subdataset,
    branches: &[&str],
) -> anyhow::Result<bool> {
    let remote = git.with_config(&project.git_config);
    for attempt in 0..PUSH_ATTEMPTS {
        let dir = work.join(format!("bids-{attempt}"));
        git.init_work_repo(&dir).await.context("create work repository")?;
        let mut wanted = vec!["main"];
        wanted.extend(branches.iter().copied().filter(|b| *b != "main"));
        let heads =
            remote.remote_branches(&dir, &project.push_url).await.context("list the branches of the BIDS project")?;
        let missing: Vec<&str> = wanted.iter().copied().filter(|b| !heads.contains(*b)).collect();
        if missing.is_empty() {
            // Complete (maybe made by another replica since the first attempt).
            return Ok(false);
        }
        if !heads.contains("main") && !heads.is_empty() {
            // A BIDS dataset made before bidsflux on another branch: not ours to replace.
            let mut others: Vec<&str> = heads.iter().map(String::as_str).collect();
            others.sort_unstable();
            return Err(Conflict(format!(
                "the BIDS project has no main branch but has {}; bidsflux writes main",
                others.join(", ")
            ))
            .into());
        }
        let refs: Vec<String> = if heads.contains("main") {
            // Branches lost or never pushed (a crash): from the current main.
            fetch_main(&remote, &dir, &project.push_url).await?;
            missing.iter().map(|b| format!("refs/remotes/origin/main:refs/heads/{b}")).collect()
        } else {
            create_dataset(git, &dir, template, values, "[bidsflux] new BIDS dataset").await?;
            let commit = record(git, &dir, "refs/heads/main", study, &|_, _| async { Ok(false) })
                .await?
                .context("the new BIDS dataset did not record the study superdataset")?;
            annex_init_dead(git, &dir).await?;
            let mut refs: Vec<String> = wanted.iter().map(|b| format!("{commit}:refs/heads/{b}")).collect();
            refs.push("refs/heads/git-annex:refs/heads/git-annex".into());
            refs
        };
        let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
        if push(&remote, &dir, &project.push_url, &refs).await? {
            return Ok(true);
        }
        // Another replica created it meanwhile: look again.
        backoff(attempt).await;
    }
    anyhow::bail!("the BIDS dataset kept moving: {PUSH_ATTEMPTS} pushes were refused; retrying later")
}

/// Fetches `main` into `refs/remotes/origin/main`; false when the project is
/// empty (a `main` that appears meanwhile, made by another replica, is fetched). A project with branches but no `main` (e.g. a superdataset made on
/// `master` before bidsflux) is a [`Conflict`]: writing a second history
/// beside it would be wrong, and retrying cannot help.
async fn fetch_main(git: &Git, dir: &Path, url: &str) -> anyhow::Result<bool> {
    match git.run(dir, &["fetch", "-q", "--no-tags", url, "+refs/heads/main:refs/remotes/origin/main"]).await {
        Ok(_) => Ok(true),
        Err(GitError::Failed { ref stderr, .. }) if stderr.contains("couldn't find remote ref") => {
            let mut branches: Vec<String> =
                git.remote_branches(dir, url).await.context("list the superdataset's branches")?.into_iter().collect();
            branches.sort_unstable();
            if branches.is_empty() {
                Ok(false)
            } else if branches.iter().any(|b| b == "main") {
                // Another replica created the dataset between the fetch and the listing (it
                // pushes main and git-annex at once): fetch what it made.
                git.run(dir, &["fetch", "-q", "--no-tags", url, "+refs/heads/main:refs/remotes/origin/main"])
                    .await
                    .map(|_| true)
                    .map_err(|e| anyhow::Error::new(e).context("fetch the superdataset"))
            } else {
                Err(Conflict(format!(
                    "the project has no main branch but has {}; bidsflux writes main (rename the branch in the forge)",
                    branches.join(", ")
                ))
                .into())
            }
        }
        Err(e) => Err(anyhow::Error::new(e).context("fetch the superdataset")),
    }
}

async fn read_dataset_id(git: &Git, dir: &Path, base: &str) -> anyhow::Result<String> {
    Ok(git
        .run(dir, &["config", "--blob", &format!("{base}:.datalad/config"), "datalad.dataset.id"])
        .await
        .context("read the superdataset's dataset id")?
        .trim()
        .to_owned())
}

/// Commits a new DataLad dataset (random id) with the rendered template.
async fn create_dataset(
    git: &Git,
    dir: &Path,
    template: &TemplateSet,
    values: &Values,
    message: &str,
) -> anyhow::Result<()> {
    let id = Uuid::new_v4().to_string();
    crate::dataset::create_dataset(git, dir, &id, &template.render(values), message).await
}

/// Creates the git-annex branch (a dataset DataLad and git-annex recognise)
/// with the work repository described and dead, without running git-annex.
async fn annex_init_dead(git: &Git, dir: &Path) -> anyhow::Result<()> {
    let mut update = BranchUpdate::new(Timestamp::now());
    crate::dataset::work_repo_dead(&mut update);
    update.apply(git, dir, "update (bidsflux indexer)").await.context("write the git-annex branch")?;
    Ok(())
}

/// Pushes `refs` atomically; false when refused because a branch moved.
async fn push(git: &Git, dir: &Path, url: &str, refs: &[&str]) -> anyhow::Result<bool> {
    let mut args = vec!["push", "-q", "--atomic", url];
    args.extend_from_slice(refs);
    match git.run(dir, &args).await {
        Ok(_) => Ok(true),
        Err(GitError::Failed { ref stderr, .. }) if moved(stderr) => Ok(false),
        Err(e) => Err(anyhow::Error::new(e).context("push the superdataset")),
    }
}

/// Whether git push was refused because the remote branch moved: it is no
/// longer an ancestor (`[rejected] (fetch first)`), or another push updated
/// it while the server was applying ours (`cannot lock ref`, `failed to update ref`).
fn moved(stderr: &str) -> bool {
    stderr.lines().any(|l| {
        (l.contains("[rejected]")
            && (l.contains("fetch first") || l.contains("non-fast-forward") || l.contains("stale")))
            || l.contains("cannot lock ref")
            || l.contains("failed to update ref")
            || l.contains("atomic transaction failed")
    })
}

/// After refused push `attempt` (from 0): 25 ms more per attempt up to 225 ms, plus as much again at random.
async fn backoff(attempt: u32) {
    const PUSH_RACE: Backoff = Backoff::linear(Duration::from_millis(25), Duration::from_millis(225)).with_jitter(1.0);
    PUSH_RACE.sleep(attempt + 1).await;
}

/// The content of `.gitmodules` at `base` (None if it has none).
async fn read_gitmodules(git: &Git, dir: &Path, base: &str) -> anyhow::Result<Option<Vec<u8>>> {
    let out = git
        .run_input(dir, &["cat-file", "--batch"], format!("{base}:.gitmodules\n").into_bytes())
        .await
        .map_err(|e| without_path("read .gitmodules", &e))?;
    let Some(nl) = out.iter().position(|&b| b == b'\n') else { return Ok(None) };
    let header = String::from_utf8_lossy(&out[..nl]);
    if header.ends_with(" missing") {
        return Ok(None);
    }
    let size: usize = header.rsplit(' ').next().and_then(|n| n.parse().ok()).unwrap_or(0);
    Ok(Some(out.get(nl + 1..nl + 1 + size).unwrap_or_default().to_vec()))
}

/// The entries of `.gitmodules` (`content`), as git reads them.
async fn parse_modules(git: &Git, dir: &Path, content: &[u8]) -> anyhow::Result<Vec<Module>> {
    let out = git
        .run_input(dir, &["config", "--file", "-", "--null", "--list"], content.to_vec())
        .await
        .map_err(|e| without_path("read .gitmodules", &e))?;
    let out = String::from_utf8_lossy(&out);
    let mut modules: BTreeMap<String, Module> = BTreeMap::new();
    for item in out.split('\0').filter(|i| !i.is_empty()) {
        let (key, value) = item.split_once('\n').unwrap_or((item, ""));
        let Some(rest) = key.strip_prefix("submodule.") else { continue };
        let Some((name, var)) = rest.rsplit_once('.') else { continue };
        let m = modules.entry(name.to_owned()).or_insert_with(|| Module { name: name.to_owned(), ..Module::default() });
        match var {
            "path" => m.path = value.to_owned(),
            "url" => m.url = value.to_owned(),
            "datalad-id" => m.id = value.to_owned(),
            _ => {}
        }
    }
    Ok(modules.into_values().collect())
}

/// `s` as a git config quoted string (subsection name or value).
fn config_quoted(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// `content` (a `.gitmodules`) with the entry `name` set to `sub` at `path`:
/// appended when new; an existing entry is rewritten by `git config`.
async fn with_module(
    git: &Git,
    dir: &Path,
    content: Vec<u8>,
    existing: bool,
    name: &str,
    path: &str,
    sub: &Subdataset,
) -> anyhow::Result<Vec<u8>> {
    if !existing {
        let mut out = content;
        if !out.is_empty() && !out.ends_with(b"\n") {
            out.push(b'\n');
        }
        let section = format!(
            "[submodule {}]\n\tpath = {}\n\turl = {}\n\tdatalad-id = {}\n",
            config_quoted(name),
            config_quoted(path),
            config_quoted(&sub.url),
            config_quoted(&sub.id)
        );
        out.extend_from_slice(section.as_bytes());
        return Ok(out);
    }
    let file = dir.join(".git").join("bidsflux-gitmodules");
    tokio::fs::write(&file, content).await.context("write .gitmodules")?;
    let file_arg = file.to_string_lossy().into_owned();
    for (var, value) in [("path", path), ("url", sub.url.as_str()), ("datalad-id", sub.id.as_str())] {
        git.run(dir, &["config", "-f", &file_arg, &format!("submodule.{name}.{var}"), value])
            .await
            .map_err(|e| without_path("write .gitmodules", &e))?;
    }
    tokio::fs::read(&file).await.context("read .gitmodules")
}

/// `(mode, object, path)` of every entry of `base` (gitlinks are not entered).
async fn tree_entries(git: &Git, dir: &Path, base: &str) -> anyhow::Result<Vec<(String, String, String)>> {
    let out = git
        .run(dir, &["ls-tree", "-r", "-z", "--full-tree", base])
        .await
        .map_err(|e| without_path("list the superdataset", &e))?;
    Ok(out
        .split('\0')
        .filter_map(|e| {
            let (meta, path) = e.split_once('\t')?;
            let mut meta = meta.split(' ');
            let mode = meta.next()?.to_owned();
            let _kind = meta.next()?;
            let object = meta.next()?.to_owned();
            Some((mode, object, path.to_owned()))
        })
        .collect())
}

/// `what` failed, with the command's status but not its arguments or output,
/// which quote the session path.
fn without_path(what: &str, e: &GitError) -> anyhow::Error {
    match e {
        GitError::Failed { status, .. } => anyhow::anyhow!("{what}: git failed ({status})"),
        GitError::Timeout { timeout, .. } => anyhow::anyhow!("{what}: git did not finish within {timeout:?}"),
        GitError::Spawn { program, source } => anyhow::anyhow!("{what}: cannot run {program}: {source}"),
    }
}

/// The StudyInstanceUID in a session URL `../<uid>.git`, for messages.
fn study_of_url(url: &str) -> &str {
    url.strip_prefix("../").and_then(|u| u.strip_suffix(".git")).unwrap_or("another dataset")
}

/// Records `sub` in the superdataset at `base` with plumbing (no work tree,
/// no index read from it) and returns the new commit (child of `base`), or
/// None when `sub` is already recorded at `sub.commit` or at a commit that
/// contains it. Errors of commands naming paths keep only git's status:
/// paths are patient data.
async fn record<F, Fut>(
    git: &Git,
    dir: &Path,
    base: &str,
    sub: &Subdataset,
    contains: &F,
) -> anyhow::Result<Option<String>>
where
    F: Fn(String, String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let gitmodules = read_gitmodules(git, dir, base).await?;
    let modules = match &gitmodules {
        Some(content) => parse_modules(git, dir, content).await?,
        None => Vec::new(),
    };
    // Already a subdataset (maybe at an earlier path: one entry per session).
    let ours = modules.iter().find(|m| m.url == sub.url || (!sub.id.is_empty() && m.id == sub.id));
    let path = ours.map_or(sub.path.as_str(), |m| m.path.as_str());
    let entries = tree_entries(git, dir, base).await?;
    if let Some((mode, object, _)) = entries.iter().find(|(_, _, p)| p == path) {
        if mode != "160000" {
            return Err(Conflict("the session path is a file of the superdataset".into()).into());
        }
        if ours.is_none() {
            let other = modules.iter().find(|m| m.path == path).map_or("another dataset", |m| study_of_url(&m.url));
            return Err(Conflict(format!("the session path is already the subdataset of study {other}")).into());
        }
        if *object == sub.commit || contains(sub.commit.clone(), object.clone()).await? {
            return Ok(None);
        }
    } else {
        let below = format!("{path}/");
        if let Some((_, _, p)) = entries.iter().find(|(_, _, p)| p.starts_with(&below)) {
            let what = modules.iter().find(|m| m.path == *p).map_or("other files", |m| study_of_url(&m.url));
            return Err(Conflict(format!("the session path is a directory holding {what}")).into());
        }
        if let Some((_, _, p)) = entries.iter().find(|(_, _, p)| path.starts_with(&format!("{p}/"))) {
            let what = modules.iter().find(|m| m.path == *p).map_or("a file", |m| study_of_url(&m.url));
            return Err(Conflict(format!("the session path is inside the entry of {what}")).into());
        }
    }
    git.run(dir, &["read-tree", base]).await.map_err(|e| without_path("read the superdataset", &e))?;
    let mut index = Vec::new();
    if ours.is_none_or(|m| m.url != sub.url || m.id != sub.id) {
        // DataLad names an entry by its path; a name an entry moved away from
        // (git mv keeps it) is not reused, so no other entry is overwritten.
        let name = match ours {
            Some(m) => m.name.clone(),
            None if modules.iter().any(|m| m.name == path) => format!("{path}@{}", study_of_url(&sub.url)),
            None => path.to_owned(),
        };
        let content = with_module(git, dir, gitmodules.unwrap_or_default(), ours.is_some(), &name, path, sub).await?;
        let blob = git
            .run_input(dir, &["hash-object", "-w", "--stdin"], content)
            .await
            .map_err(|e| without_path("store .gitmodules", &e))?;
        index.extend_from_slice(format!("100644 {}\t.gitmodules\0", String::from_utf8_lossy(&blob).trim()).as_bytes());
    }
    index.extend_from_slice(format!("160000 {}\t{path}\0", sub.commit).as_bytes());
    git.run_input(dir, &["update-index", "-z", "--index-info"], index)
        .await
        .map_err(|e| without_path("stage the subdataset", &e))?;
    let tree = git.run(dir, &["write-tree"]).await.map_err(|e| without_path("write the superdataset tree", &e))?;
    let message = format!("[bidsflux] record {} at {}", study_of_url(&sub.url), sub.commit);
    let commit = git
        .run(dir, &["commit-tree", tree.trim(), "-p", base, "-m", &message])
        .await
        .map_err(|e| without_path("commit the subdataset", &e))?;
    Ok(Some(commit.trim().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_paths_cannot_escape_or_hide() {
        assert_eq!(session_path_problem("Doe/Jane"), None);
        assert_eq!(session_path_problem("sub-01/ses-1"), None);
        assert_eq!(session_path_problem("Müller"), None);
        for bad in
            ["", "..", "a/../b", "/abs", "a//b", ".git", "a/.datalad", ".gitmodules", "a\\b", "a\nb", "-anon", "a/-b"]
        {
            assert!(session_path_problem(bad).is_some(), "{bad:?} accepted");
        }
        assert!(session_path_problem(&"x".repeat(256)).is_some());
    }

    #[test]
    fn refused_pushes_are_told_from_failures() {
        assert!(moved(" ! [rejected]        main -> main (fetch first)\nerror: failed to push some refs"));
        assert!(moved(" ! [rejected]        main -> main (non-fast-forward)"));
        assert!(moved("remote: error: cannot lock ref 'refs/heads/main': reference already exists"));
        assert!(moved(" ! [remote rejected] main -> main (atomic transaction failed)"));
        assert!(!moved(" ! [remote rejected] main -> main (pre-receive hook declined)"));
        assert!(!moved("fatal: unable to access 'http://x/': Failed to connect"));
    }

    #[test]
    fn session_urls_name_the_study() {
        assert_eq!(session_url("1.2.3"), "../1.2.3.git");
        assert_eq!(study_of_url("../1.2.3.git"), "1.2.3");
        assert_eq!(study_of_url("https://elsewhere/x"), "another dataset");
    }
}
