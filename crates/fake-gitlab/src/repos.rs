//! The projects' bare repositories on disk: creating them, with the
//! `pre-receive` hook that enforces protected branches on push (over HTTP and
//! SSH alike), and running git in them.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::state::Project;

/// Where the repositories live: what the handlers need besides the state.
#[derive(Debug)]
pub(crate) struct Env {
    /// Root of the bare repositories (`<path_with_namespace>.git`).
    pub(crate) repos: PathBuf,
}

/// The `pre-receive` hook of every repository: protected branches on push.
pub(crate) const PRE_RECEIVE: &str = r#"#!/bin/sh
# Installed by bidsflux's fake GitLab (crates/fake-gitlab/src/repos.rs) to
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

/// The pattern for a shell `case`: only `*` stays special.
pub(crate) fn shell_pattern(pattern: &str) -> String {
    let mut out = String::new();
    for c in pattern.chars() {
        if matches!(c, '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The bare repository of a project.
pub(crate) fn repo_dir(env: &Env, p: &Project) -> PathBuf {
    env.repos.join(format!("{}.git", p.path_with_namespace))
}

/// Runs git in `dir` (no system or global config) and returns stdout.
pub(crate) fn git(dir: &Path, args: &[&str], stdin: Option<&[u8]>) -> anyhow::Result<String> {
    git_as(dir, args, stdin, "Fake GitLab")
}

/// [`git`] with `author` as the author and committer name.
pub(crate) fn git_as(dir: &Path, args: &[&str], stdin: Option<&[u8]>, author: &str) -> anyhow::Result<String> {
    let out = git_env(dir, args, stdin, &[("GIT_AUTHOR_NAME", author), ("GIT_COMMITTER_NAME", author)])?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Runs git in `dir` (no system or global config) with extra environment
/// variables (`GIT_INDEX_FILE`, the author and committer, ...; the fake's own
/// identity otherwise) and returns stdout as bytes.
pub(crate) fn git_env(
    dir: &Path,
    args: &[&str],
    stdin: Option<&[u8]>,
    env: &[(&str, &str)],
) -> anyhow::Result<Vec<u8>> {
    let mut cmd = std::process::Command::new("git");
    cmd.current_dir(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "Fake GitLab")
        .env("GIT_AUTHOR_EMAIL", "fake-gitlab@example.com")
        .env("GIT_COMMITTER_NAME", "Fake GitLab")
        .env("GIT_COMMITTER_EMAIL", "fake-gitlab@example.com")
        .envs(env.iter().copied())
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
    Ok(out.stdout)
}

/// Creates the bare repository of `p` with the hook; with `readme_author`, a first commit with a README.
pub(crate) fn init_repo(env: &Env, p: &Project, readme_author: Option<&str>) -> anyhow::Result<()> {
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
