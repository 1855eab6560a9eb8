//! Where session datasets are pushed.
//!
//! [`Forge`] hides the hosting: [`LocalForge`] keeps bare repositories under a
//! directory (development, tests, sites without GitLab);
//! [`crate::gitlab_forge::GitlabForge`] implements the same trait on GitLab
//! (nested groups get-or-create, project, bot access).

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};

use bidsflux_messaging::{Classify, ErrorClass};
use bidsflux_proto::v1::FailureKind;
use bidsflux_session::{REDACTED, redact};

use crate::git::{Git, GitError};

/// A validated project path such as `PI/Study1/sourcedata/dicoms/1.2.3`.
///
/// Relative, `/`-separated, no empty, `.` or `..` segment, no backslash or
/// control character: it cannot escape the forge's namespace.
///
/// When its group was rendered from patient values (a group template using
/// PatientID, PatientName or StudyDate), logs and errors show it as
/// `[redacted]/sourcedata/dicoms/<uid>` ([`ProjectPath::shown`]), and
/// [`ProjectPath::redact`] scrubs the group from other text (git's errors
/// quote the push URL).
#[derive(Clone, PartialEq, Eq)]
pub struct ProjectPath {
    path: String,
    /// The leading part (the group) that is patient data, if any.
    hidden: Option<String>,
}

impl fmt::Debug for ProjectPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ProjectPath").field(&self.shown()).finish()
    }
}

/// Latin letters GitLab refuses in a path, with the ASCII they are written with: the letters
/// of European names (Latin-1 Supplement and Latin Extended-A).
const TRANSLITERATION: &[(char, &str)] = &[
    ('À', "A"),
    ('Á', "A"),
    ('Â', "A"),
    ('Ã', "A"),
    ('Ä', "A"),
    ('Å', "A"),
    ('Æ', "AE"),
    ('Ç', "C"),
    ('È', "E"),
    ('É', "E"),
    ('Ê', "E"),
    ('Ë', "E"),
    ('Ì', "I"),
    ('Í', "I"),
    ('Î', "I"),
    ('Ï', "I"),
    ('Ð', "D"),
    ('Ñ', "N"),
    ('Ò', "O"),
    ('Ó', "O"),
    ('Ô', "O"),
    ('Õ', "O"),
    ('Ö', "O"),
    ('Ø', "O"),
    ('Ù', "U"),
    ('Ú', "U"),
    ('Û', "U"),
    ('Ü', "U"),
    ('Ý', "Y"),
    ('Þ', "TH"),
    ('ß', "ss"),
    ('à', "a"),
    ('á', "a"),
    ('â', "a"),
    ('ã', "a"),
    ('ä', "a"),
    ('å', "a"),
    ('æ', "ae"),
    ('ç', "c"),
    ('è', "e"),
    ('é', "e"),
    ('ê', "e"),
    ('ë', "e"),
    ('ì', "i"),
    ('í', "i"),
    ('î', "i"),
    ('ï', "i"),
    ('ð', "d"),
    ('ñ', "n"),
    ('ò', "o"),
    ('ó', "o"),
    ('ô', "o"),
    ('õ', "o"),
    ('ö', "o"),
    ('ø', "o"),
    ('ù', "u"),
    ('ú', "u"),
    ('û', "u"),
    ('ü', "u"),
    ('ý', "y"),
    ('þ', "th"),
    ('ÿ', "y"),
    ('Ā', "A"),
    ('ā', "a"),
    ('Ă', "A"),
    ('ă', "a"),
    ('Ą', "A"),
    ('ą', "a"),
    ('Ć', "C"),
    ('ć', "c"),
    ('Č', "C"),
    ('č', "c"),
    ('Ď', "D"),
    ('ď', "d"),
    ('Đ', "D"),
    ('đ', "d"),
    ('Ē', "E"),
    ('ē', "e"),
    ('Ė', "E"),
    ('ė', "e"),
    ('Ę', "E"),
    ('ę', "e"),
    ('Ě', "E"),
    ('ě', "e"),
    ('Ğ', "G"),
    ('ğ', "g"),
    ('Ī', "I"),
    ('ī', "i"),
    ('Į', "I"),
    ('į', "i"),
    ('İ', "I"),
    ('ı', "i"),
    ('Ķ', "K"),
    ('ķ', "k"),
    ('Ĺ', "L"),
    ('ĺ', "l"),
    ('Ļ', "L"),
    ('ļ', "l"),
    ('Ľ', "L"),
    ('ľ', "l"),
    ('Ł', "L"),
    ('ł', "l"),
    ('Ń', "N"),
    ('ń', "n"),
    ('Ņ', "N"),
    ('ņ', "n"),
    ('Ň', "N"),
    ('ň', "n"),
    ('Ō', "O"),
    ('ō', "o"),
    ('Ő', "O"),
    ('ő', "o"),
    ('Œ', "OE"),
    ('œ', "oe"),
    ('Ŕ', "R"),
    ('ŕ', "r"),
    ('Ř', "R"),
    ('ř', "r"),
    ('Ś', "S"),
    ('ś', "s"),
    ('Ş', "S"),
    ('ş', "s"),
    ('Š', "S"),
    ('š', "s"),
    ('Ţ', "T"),
    ('ţ', "t"),
    ('Ť', "T"),
    ('ť', "t"),
    ('Ū', "U"),
    ('ū', "u"),
    ('Ů', "U"),
    ('ů', "u"),
    ('Ű', "U"),
    ('ű', "u"),
    ('Ų', "U"),
    ('ų', "u"),
    ('Ÿ', "Y"),
    ('Ź', "Z"),
    ('ź', "z"),
    ('Ż', "Z"),
    ('ż', "z"),
    ('Ž', "Z"),
    ('ž', "z"),
];

/// A group segment as a path GitLab accepts: letters, digits, `_`, `-` and `.`, not starting
/// with `-` or `.`, not ending in `.`, `.git` or `.atom`.
///
/// A segment GitLab already accepts is kept as it is (the original created groups with
/// `path = name = segment`, so sites' existing groups are found). Otherwise — DICOM values
/// hold spaces, commas and accented letters, which the original could not create — the letters
/// of European names are written in ASCII (`Müller` → `Muller`), every other run of refused
/// characters becomes one `-` (`Anna-Maria Christina` → `Anna-Maria-Christina`), and a leading
/// `-` and trailing `-` and `.` are dropped. A leading `.` is kept: [`ProjectPath`] refuses
/// such a segment (a hidden name is not a study group). `None` when nothing is left.
pub fn gitlab_segment(segment: &str) -> Option<String> {
    let accepted = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    let mut out = String::with_capacity(segment.len());
    for c in segment.chars() {
        if accepted(c) {
            out.push(c);
        } else if let Some((_, ascii)) = TRANSLITERATION.iter().find(|(from, _)| *from == c) {
            out.push_str(ascii);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let mut out = out.trim_start_matches('-').trim_end_matches(['-', '.']).to_owned();
    for suffix in [".git", ".atom"] {
        if out.ends_with(suffix) {
            out.push('_');
        }
    }
    (!out.is_empty()).then_some(out)
}

/// `group` with each segment as [`gitlab_segment`] writes it; `None` if a segment has no
/// character GitLab accepts.
pub fn gitlab_group(group: &str) -> Option<String> {
    group.split('/').map(gitlab_segment).collect::<Option<Vec<_>>>().map(|v| v.join("/"))
}

/// Which rule `path` breaks, if any.
fn path_problem(path: &str) -> Option<&'static str> {
    if path.is_empty() {
        Some("it is empty")
    } else if path.split('/').any(|s| s.is_empty() || s == "." || s == "..") {
        Some("it has an empty, '.' or '..' segment")
    } else if path.contains('\\') || path.chars().any(char::is_control) {
        Some("it contains a backslash or a control character")
    } else if path.split('/').any(|s| s.starts_with('.') || s.ends_with(".git")) {
        Some("a segment starts with '.' or ends with '.git'")
    } else {
        None
    }
}

impl ProjectPath {
    /// Validates `path` (no part of it is patient data).
    pub fn new(path: impl Into<String>) -> Result<Self, ForgeError> {
        let path = path.into();
        match path_problem(&path) {
            Some(why) => Err(ForgeError::InvalidPath { path, why }),
            None => Ok(Self { path, hidden: None }),
        }
    }

    /// Validates `<group>/<rest>`; when `group_is_patient_data`, the group is
    /// never shown, not even in the error.
    pub fn in_group(group: &str, rest: &str, group_is_patient_data: bool) -> Result<Self, ForgeError> {
        let path = Self { path: format!("{group}/{rest}"), hidden: group_is_patient_data.then(|| group.to_owned()) };
        match path_problem(&path.path) {
            Some(why) => Err(ForgeError::InvalidPath { path: path.shown(), why }),
            None => Ok(path),
        }
    }

    /// The path.
    pub fn as_str(&self) -> &str {
        &self.path
    }

    /// Whether part of the path is patient data.
    pub fn has_patient_data(&self) -> bool {
        self.hidden.is_some()
    }

    /// The path as logs, spans and errors may show it.
    pub fn shown(&self) -> String {
        match &self.hidden {
            Some(group) => format!("{REDACTED}{}", &self.path[group.len()..]),
            None => self.path.clone(),
        }
    }

    /// `text` with the patient part of the path (if any) replaced by
    /// `[redacted]`, also where it appears URL-encoded (`PI%2FP001`, as in
    /// GitLab API paths).
    pub fn redact(&self, text: &str) -> String {
        match &self.hidden {
            Some(group) => {
                let encoded = group.replace('/', "%2F");
                let encoded_lower = group.replace('/', "%2f");
                redact(text, &[group, &encoded, &encoded_lower])
            }
            None => text.to_owned(),
        }
    }

    /// How a leading part of the path (a namespace such as `PI` or
    /// `PI/Study1/sourcedata`) may be shown: any part of it inside a patient
    /// group becomes `[redacted]`, as a single segment of that group would not
    /// be caught by [`ProjectPath::redact`].
    pub fn shown_prefix(&self, prefix: &str) -> String {
        match &self.hidden {
            Some(group) if prefix.len() <= group.len() => REDACTED.to_owned(),
            Some(group) => format!("{REDACTED}{}", prefix.get(group.len()..).unwrap_or_default()),
            None => prefix.to_owned(),
        }
    }
}

/// A project ready to receive a push.
#[derive(Clone, PartialEq, Eq)]
pub struct Project {
    /// URL (or path) the indexer pushes to; never holds credentials.
    pub push_url: String,
    /// URL (or path) users and CI clone from, published in `StudyIndexed`.
    pub clone_url: String,
    /// git configuration (`key`, `value`) the commands that talk to the
    /// remote need, e.g. GitLab's `http.<url>.extraHeader` carrying the token.
    /// Given to git through `GIT_CONFIG_KEY_n`/`GIT_CONFIG_VALUE_n` (never
    /// arguments); values are secret and hidden by `Debug`.
    pub git_config: Vec<(String, String)>,
}

impl fmt::Debug for Project {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys: Vec<&str> = self.git_config.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("Project")
            .field("push_url", &self.push_url)
            .field("clone_url", &self.clone_url)
            .field("git_config_keys", &keys)
            .finish()
    }
}

/// Why the forge could not provide a project.
#[derive(Debug, thiserror::Error)]
pub enum ForgeError {
    /// The path cannot be used (the message is dead-lettered as invalid input).
    #[error("forge project path {path:?} cannot be used: {why}")]
    InvalidPath {
        /// The path as it may be shown ([`ProjectPath::shown`]).
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

impl Classify for ForgeError {
    fn class(&self) -> ErrorClass {
        match self {
            Self::InvalidPath { .. } => ErrorClass::Permanent(FailureKind::InvalidInput),
            Self::Unavailable(_) => ErrorClass::Transient,
            Self::Refused(_) => ErrorClass::Permanent(FailureKind::Permanent),
        }
    }
}

/// A place that hosts session datasets.
pub trait Forge: Send + Sync + 'static {
    /// Returns the project at `path`, creating it (and its groups) if needed.
    fn ensure_project(&self, path: &ProjectPath) -> impl Future<Output = Result<Project, ForgeError>> + Send;

    /// Makes sure the group `path` (e.g. `G/derivatives`) exists.
    fn ensure_group(&self, path: &ProjectPath) -> impl Future<Output = Result<(), ForgeError>> + Send;

    /// Protects `branches` (names or wildcards such as `convert/*`) of the
    /// project `path`, which may not have them yet; protections that exist are
    /// left as they are. Forges without branch protection do nothing.
    fn protect_branches(
        &self,
        path: &ProjectPath,
        branches: &[String],
    ) -> impl Future<Output = Result<(), ForgeError>> + Send;
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
        // Errors quote directories, which contain the project path.
        self.create_project(path).await.map_err(|e| match e {
            ForgeError::Unavailable(m) => ForgeError::Unavailable(path.redact(&m)),
            ForgeError::Refused(m) => ForgeError::Refused(path.redact(&m)),
            e @ ForgeError::InvalidPath { .. } => e,
        })
    }

    /// A directory `<root>/<path>` (the tree mirrors GitLab's groups).
    async fn ensure_group(&self, path: &ProjectPath) -> Result<(), ForgeError> {
        let dir = self.root.join(path.as_str());
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| ForgeError::Unavailable(path.redact(&format!("create {}: {e}", dir.display()))))
    }

    /// Bare repositories have no branch protection: nothing to do.
    async fn protect_branches(&self, _path: &ProjectPath, _branches: &[String]) -> Result<(), ForgeError> {
        Ok(())
    }
}

impl LocalForge {
    async fn create_project(&self, path: &ProjectPath) -> Result<Project, ForgeError> {
        let dir = self.repo_dir(path);
        let url = dir.to_string_lossy().into_owned();
        let project = Project { push_url: url.clone(), clone_url: url, git_config: Vec::new() };
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
        tracing::info!(project = path.shown(), "created forge project");
        Ok(project)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn group_segments_become_paths_gitlab_accepts() {
        use super::{gitlab_group, gitlab_segment};
        for kept in ["Smith", "Study1", "sub-01_x.y", "PI"] {
            assert_eq!(gitlab_segment(kept).as_deref(), Some(kept));
        }
        assert_eq!(gitlab_segment("Müller").as_deref(), Some("Muller"));
        assert_eq!(gitlab_segment("Øster Åsa").as_deref(), Some("Oster-Asa"));
        assert_eq!(gitlab_segment("Étude été").as_deref(), Some("Etude-ete"));
        assert_eq!(gitlab_segment("Prof.").as_deref(), Some("Prof"));
        assert_eq!(gitlab_segment("memory study, cohort A").as_deref(), Some("memory-study-cohort-A"));
        assert_eq!(gitlab_segment("-x.atom").as_deref(), Some("x.atom_"));
        assert_eq!(gitlab_segment(".hidden").as_deref(), Some(".hidden"), "refused by ProjectPath");
        assert_eq!(gitlab_segment("東京"), None);
        assert_eq!(gitlab_segment(" - "), None);
        assert_eq!(gitlab_group("Smith/John/Study1").as_deref(), Some("Smith/John/Study1"));
        assert_eq!(gitlab_group("Müller/Jürgen/Étude").as_deref(), Some("Muller/Jurgen/Etude"));
        assert_eq!(gitlab_group("Smith/東京"), None);
    }

    use super::*;

    #[test]
    fn project_paths_cannot_escape() {
        assert!(ProjectPath::new("PI/Study1/sourcedata/dicoms/1.2.3").is_ok());
        for bad in ["", "/abs", "a//b", "a/./b", "../x", "a/..", "a\\b", "a/\u{1}", "a/.git/b", "a/x.git/b", "a/"] {
            assert!(ProjectPath::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn patient_groups_are_never_shown() {
        let p = ProjectPath::in_group("PI/P001", "sourcedata/dicoms/1.2.3", true).unwrap();
        assert_eq!(p.as_str(), "PI/P001/sourcedata/dicoms/1.2.3");
        assert_eq!(p.shown(), "[redacted]/sourcedata/dicoms/1.2.3");
        assert_eq!(format!("{p:?}"), "ProjectPath(\"[redacted]/sourcedata/dicoms/1.2.3\")");
        assert_eq!(
            p.redact("`git push /forge/PI/P001/sourcedata/dicoms/1.2.3.git` failed"),
            "`git push /forge/[redacted]/sourcedata/dicoms/1.2.3.git` failed"
        );
        let e = ProjectPath::in_group("PI/.P001", "sourcedata/dicoms/1.2.3", true).unwrap_err().to_string();
        assert!(!e.contains("P001") && e.contains("[redacted]") && e.contains("starts with '.'"), "{e}");

        let p = ProjectPath::in_group("PI/Study1", "sourcedata/dicoms/1.2.3", false).unwrap();
        assert_eq!(p.shown(), p.as_str());
        assert_eq!(p.redact("PI/Study1"), "PI/Study1");
        let e = ProjectPath::in_group("PI/.x", "sourcedata/dicoms/1.2.3", false).unwrap_err().to_string();
        assert!(e.contains("PI/.x"), "{e}");
    }

    #[test]
    fn prefixes_and_encoded_groups_are_redacted() {
        let p = ProjectPath::in_group("PI/P001", "sourcedata/dicoms/1.2.3", true).unwrap();
        assert_eq!(p.shown_prefix("PI"), "[redacted]");
        assert_eq!(p.shown_prefix("PI/P001"), "[redacted]");
        assert_eq!(p.shown_prefix("PI/P001/sourcedata"), "[redacted]/sourcedata");
        assert_eq!(p.redact("GET /groups/PI%2FP001%2Fsourcedata"), "GET /groups/[redacted]%2Fsourcedata");
        let p = ProjectPath::in_group("PI/Study1", "sourcedata/dicoms/1.2.3", false).unwrap();
        assert_eq!(p.shown_prefix("PI"), "PI");
    }

    #[test]
    fn project_debug_hides_git_config_values() {
        let p = Project {
            push_url: "https://gitlab.example.org/a/b.git".into(),
            clone_url: "https://gitlab.example.org/a/b.git".into(),
            git_config: vec![(
                "http.https://gitlab.example.org/.extraHeader".into(),
                "Authorization: Basic c2VjcmV0".into(),
            )],
        };
        let shown = format!("{p:?}");
        assert!(!shown.contains("c2VjcmV0") && shown.contains("extraHeader"), "{shown}");
    }
}
