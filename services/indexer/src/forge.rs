//! Where session datasets are pushed.
//!
//! [`Forge`] hides the hosting: [`LocalForge`] keeps bare repositories under a
//! directory (development, tests, sites without GitLab); a GitLab forge will
//! implement the same trait (nested groups get-or-create, project, bot access).

use std::future::Future;
use std::path::{Path, PathBuf};

use crate::git::{Git, GitError};

/// A validated project path such as `PI/Study1/sourcedata/dicoms/1.2.3`.
///
/// Relative, `/`-separated, no empty, `.` or `..` segment, no backslash or
/// control character: it cannot escape the forge's namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectPath(String);

impl ProjectPath {
    /// Validates `path`.
    pub fn new(path: impl Into<String>) -> Result<Self, ForgeError> {
        let path = path.into();
        let why = if path.is_empty() {
            Some("it is empty")
        } else if path.split('/').any(|s| s.is_empty() || s == "." || s == "..") {
            Some("it has an empty, '.' or '..' segment")
        } else if path.contains('\\') || path.chars().any(char::is_control) {
            Some("it contains a backslash or a control character")
        } else if path.split('/').any(|s| s.starts_with('.') || s.ends_with(".git")) {
            Some("a segment starts with '.' or ends with '.git'")
        } else {
            None
        };
        match why {
            Some(why) => Err(ForgeError::InvalidPath { path, why }),
            None => Ok(Self(path)),
        }
    }

    /// The path.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A project ready to receive a push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Project {
    /// URL (or path) the indexer pushes to.
    pub push_url: String,
    /// URL (or path) users and CI clone from, published in `StudyIndexed`.
    pub clone_url: String,
}

/// Why the forge could not provide a project.
#[derive(Debug, thiserror::Error)]
pub enum ForgeError {
    /// The path cannot be used (the message is dead-lettered as invalid input).
    #[error("forge project path {path:?} cannot be used: {why}")]
    InvalidPath {
        /// The path (UIDs and group names, no patient values).
        path: String,
        /// Which rule it breaks.
        why: &'static str,
    },
    /// The forge is unreachable or failed; retrying may help.
    #[error("forge unavailable: {0}")]
    Unavailable(String),
    /// The forge refused (permissions, quota); retrying will not help.
    #[error("forge refused: {0}")]
    Refused(String),
}

/// A place that hosts session datasets.
pub trait Forge: Send + Sync + 'static {
    /// Returns the project at `path`, creating it (and its groups) if needed.
    fn ensure_project(&self, path: &ProjectPath) -> impl Future<Output = Result<Project, ForgeError>> + Send;
}

/// Bare repositories at `<root>/<project path>.git`.
#[derive(Debug, Clone)]
pub struct LocalForge {
    root: PathBuf,
    git: Git,
}

impl LocalForge {
    /// A forge under `root` (created if missing), using `git` to create repositories.
    pub fn new(root: impl Into<PathBuf>, git: Git) -> Self {
        Self { root: root.into(), git }
    }

    /// The bare repository of a project.
    pub fn repo_dir(&self, path: &ProjectPath) -> PathBuf {
        self.root.join(format!("{}.git", path.as_str()))
    }
}

fn unavailable(what: &str, dir: &Path, e: impl std::fmt::Display) -> ForgeError {
    ForgeError::Unavailable(format!("{what} {}: {e}", dir.display()))
}

impl Forge for LocalForge {
    async fn ensure_project(&self, path: &ProjectPath) -> Result<Project, ForgeError> {
        let dir = self.repo_dir(path);
        let url = dir.to_string_lossy().into_owned();
        let project = Project { push_url: url.clone(), clone_url: url };
        if tokio::fs::try_exists(dir.join("HEAD")).await.unwrap_or(false) {
            return Ok(project);
        }
        let parent = dir.parent().ok_or_else(|| unavailable("find parent of", &dir, "none"))?;
        tokio::fs::create_dir_all(parent).await.map_err(|e| unavailable("create", parent, e))?;
        // Built aside and renamed into place, so a replica never sees half a repository.
        let tmp = tempfile::Builder::new()
            .prefix(".creating-")
            .tempdir_in(parent)
            .map_err(|e| unavailable("create a temporary directory in", parent, e))?;
        self.git
            .run(tmp.path(), &["init", "-q", "--bare", "-b", "main", "."])
            .await
            .map_err(|e: GitError| unavailable("create bare repository", &dir, e))?;
        if let Err(e) = tokio::fs::rename(tmp.path(), &dir).await
            && !tokio::fs::try_exists(dir.join("HEAD")).await.unwrap_or(false)
        {
            return Err(unavailable("move new repository to", &dir, e));
        }
        tracing::info!(project = path.as_str(), "created forge project");
        Ok(project)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_paths_cannot_escape() {
        assert!(ProjectPath::new("PI/Study1/sourcedata/dicoms/1.2.3").is_ok());
        for bad in ["", "/abs", "a//b", "a/./b", "../x", "a/..", "a\\b", "a/\u{1}", "a/.git/b", "a/x.git/b", "a/"] {
            assert!(ProjectPath::new(bad).is_err(), "{bad:?} accepted");
        }
    }
}
