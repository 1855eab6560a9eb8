//! Running git and git-annex.
//!
//! Every git-annex interaction goes through `git annex ...` so `BIDSFLUX_GIT`
//! picks both. Processes get a clean environment for what matters (no
//! inherited `GIT_DIR`/`GIT_INDEX_FILE`, no prompts, the C locale, the bot's
//! identity), are killed when the future is dropped, and time out.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt as _;
use tokio::process::Command;

/// Author and committer of everything the indexer writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Name.
    pub name: String,
    /// E-mail.
    pub email: String,
}

/// A git command that did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// The program could not be started.
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Cause.
        source: std::io::Error,
    },
    /// It ran and failed.
    #[error("`git {args}` failed ({status}): {stderr}")]
    Failed {
        /// The arguments (no secrets are ever passed on the command line).
        args: String,
        /// Exit status.
        status: String,
        /// End of its standard error.
        stderr: String,
    },
    /// It did not finish in time (and was killed).
    #[error("`git {args}` did not finish within {timeout:?}")]
    Timeout {
        /// The arguments.
        args: String,
        /// The limit.
        timeout: Duration,
    },
}

/// How git is run.
#[derive(Clone)]
pub struct Git {
    program: PathBuf,
    identity: Identity,
    timeout: Duration,
    /// Extra configuration passed through `GIT_CONFIG_KEY_n`/`GIT_CONFIG_VALUE_n`
    /// (values may be secret: never shown).
    config: Vec<(String, String)>,
}

impl std::fmt::Debug for Git {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<&str> = self.config.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("Git")
            .field("program", &self.program)
            .field("identity", &self.identity)
            .field("timeout", &self.timeout)
            .field("config_keys", &keys)
            .finish()
    }
}

/// Keep this much of a failing command's stderr in errors.
const STDERR_TAIL: usize = 2000;

impl Git {
    /// Runs `program` as git, committing as `identity`, killing commands after `timeout`.
    pub fn new(program: impl Into<PathBuf>, identity: Identity, timeout: Duration) -> Self {
        Self { program: program.into(), identity, timeout, config: Vec::new() }
    }

    /// A copy that also sets the git configuration `config` (`key`, `value`)
    /// in every command, through the environment (`GIT_CONFIG_COUNT`,
    /// `GIT_CONFIG_KEY_n`, `GIT_CONFIG_VALUE_n`, after any such entries the
    /// indexer inherited), so values such as credentials never appear in
    /// arguments, process listings or errors.
    pub fn with_config(&self, config: &[(String, String)]) -> Self {
        let mut git = self.clone();
        git.config.extend(config.iter().cloned());
        git
    }

    /// The committer identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Creates an empty work repository in `dir` (made if missing) on `main`,
    /// without git's template (sample hooks); commits get the identity from
    /// this `Git`'s environment.
    pub async fn init_work_repo(&self, dir: &Path) -> Result<(), GitError> {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|source| GitError::Spawn { program: format!("mkdir {}", dir.display()), source })?;
        self.run(dir, &["init", "-q", "--template=", "-b", "main", "."]).await.map(drop)
    }

    /// The branches (names without `refs/heads/`) of the repository at `url`.
    pub async fn remote_branches(&self, dir: &Path, url: &str) -> Result<HashSet<String>, GitError> {
        let out = self.run(dir, &["ls-remote", "--heads", url]).await?;
        Ok(out.lines().filter_map(|l| l.split('\t').nth(1)?.strip_prefix("refs/heads/")).map(str::to_owned).collect())
    }

    /// Runs `git <args>` in `dir` and returns its standard output.
    pub async fn run<S: AsRef<OsStr>>(&self, dir: &Path, args: &[S]) -> Result<String, GitError> {
        let out = self.run_input(dir, args, Vec::new()).await?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// Runs `git <args>` in `dir` with `input` on its standard input and returns its standard output.
    pub async fn run_input<S: AsRef<OsStr>>(
        &self,
        dir: &Path,
        args: &[S],
        input: Vec<u8>,
    ) -> Result<Vec<u8>, GitError> {
        let shown = || args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ");
        let mut cmd = Command::new(&self.program);
        cmd.args(args)
            .current_dir(dir)
            .stdin(if input.is_empty() { Stdio::null() } else { Stdio::piped() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // GIT_SSH_COMMAND and GIT_SSH would win over the forge's core.sshCommand
        // (its key and host-key pinning).
        for var in [
            "GIT_DIR",
            "GIT_WORK_TREE",
            "GIT_INDEX_FILE",
            "GIT_OBJECT_DIRECTORY",
            "GIT_NAMESPACE",
            "GIT_PREFIX",
            "GIT_SSH_COMMAND",
            "GIT_SSH",
            "GIT_SSH_VARIANT",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("GIT_TERMINAL_PROMPT", "0")
            .env("LC_ALL", "C")
            .env("GIT_AUTHOR_NAME", &self.identity.name)
            .env("GIT_AUTHOR_EMAIL", &self.identity.email)
            .env("GIT_COMMITTER_NAME", &self.identity.name)
            .env("GIT_COMMITTER_EMAIL", &self.identity.email);
        if !self.config.is_empty() {
            // Entries the process inherited (e.g. a site's settings) keep their indices.
            let inherited: usize =
                std::env::var("GIT_CONFIG_COUNT").ok().and_then(|n| n.trim().parse().ok()).unwrap_or(0);
            for (i, (key, value)) in self.config.iter().enumerate() {
                cmd.env(format!("GIT_CONFIG_KEY_{}", inherited + i), key)
                    .env(format!("GIT_CONFIG_VALUE_{}", inherited + i), value);
            }
            cmd.env("GIT_CONFIG_COUNT", (inherited + self.config.len()).to_string());
        }
        let mut child =
            cmd.spawn().map_err(|source| GitError::Spawn { program: self.program.display().to_string(), source })?;
        let writer = child.stdin.take().map(|mut stdin| {
            tokio::spawn(async move {
                // A command that exits early closes its stdin; its status tells what happened.
                let _ = stdin.write_all(&input).await;
                let _ = stdin.shutdown().await;
            })
        });
        let output = match tokio::time::timeout(self.timeout, child.wait_with_output()).await {
            Ok(r) => r.map_err(|source| GitError::Spawn { program: self.program.display().to_string(), source })?,
            Err(_) => return Err(GitError::Timeout { args: shown(), timeout: self.timeout }),
        };
        if let Some(w) = writer {
            let _ = w.await;
        }
        if output.status.success() {
            return Ok(output.stdout);
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stderr = stderr.trim();
        let start = stderr.len().saturating_sub(STDERR_TAIL);
        let start = (start..stderr.len()).find(|&i| stderr.is_char_boundary(i)).unwrap_or(stderr.len());
        Err(GitError::Failed { args: shown(), status: output.status.to_string(), stderr: stderr[start..].to_owned() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn extra_config_reaches_git_without_arguments() {
        let identity = Identity { name: "bot".into(), email: "bot@localhost".into() };
        let git = Git::new("git", identity, Duration::from_secs(30))
            .with_config(&[("http.https://gitlab.example.org/.extraHeader".into(), "Authorization: secret".into())]);
        let dir = tempfile::tempdir().unwrap();
        let value = git.run(dir.path(), &["config", "--get", "http.https://gitlab.example.org/.extraheader"]).await;
        assert_eq!(value.unwrap().trim(), "Authorization: secret");
        assert!(!format!("{git:?}").contains("secret"), "{git:?}");
    }
}
