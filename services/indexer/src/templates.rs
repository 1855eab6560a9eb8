//! The files the indexer puts in the datasets it creates.
//!
//! They live in the repository as files (`services/indexer/templates/`):
//!
//! - `session/`: added to every new session dataset (the `.gitattributes`
//!   with the original's `annex.largefiles` rules);
//! - `study/`: the study superdataset `G/sourcedata/dicoms/study` on first use
//!   (`.ci-env.yml` with `STUDY_PATH` and `BIDS_PATH`, a `.gitlab-ci.yml`
//!   including `$NI_DATAOPS_GITLAB_ROOT/ci-pipelines`);
//! - `bids/`: the BIDS dataset `G/bids` on first use (`.gitlab-ci.yml`,
//!   `.gitattributes`, `.bids_init`, `.derivatives`, `.gitignore`,
//!   `.bidsignore`, README).
//!
//! They are compiled in; a site replaces any of the three sets with its own
//! directory of the same name under `BIDSFLUX_TEMPLATES_DIR`. In file contents
//! `{{STUDY_PATH}}`, `{{BIDS_PATH}}`, `{{NI_DATAOPS_GITLAB_ROOT}}`,
//! `{{BIDS_DEV_BRANCH}}` and `{{BIDS_BASE_BRANCH}}` are replaced; any other
//! `{{...}}` is refused when the indexer starts. Values are escaped for a
//! YAML double-quoted string (`\` and `"`), which the templates put them in.

use std::path::Path;

/// The placeholders a template may use.
pub const PLACEHOLDERS: &[&str] =
    &["STUDY_PATH", "BIDS_PATH", "NI_DATAOPS_GITLAB_ROOT", "BIDS_DEV_BRANCH", "BIDS_BASE_BRANCH"];

macro_rules! builtin {
    ($kind:literal: $($file:literal),* $(,)?) => {
        &[$(($file, include_str!(concat!("../templates/", $kind, "/", $file)))),*]
    };
}

const BUILTIN_SESSION: &[(&str, &str)] = builtin!("session": ".gitattributes");
const BUILTIN_STUDY: &[(&str, &str)] = builtin!("study": ".ci-env.yml", ".gitattributes", ".gitlab-ci.yml");
const BUILTIN_BIDS: &[(&str, &str)] = builtin!(
    "bids": ".bids_init", ".bidsignore", ".derivatives", ".gitattributes", ".gitignore", ".gitlab-ci.yml", "README.md"
);

/// Values of the placeholders for one study group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Values {
    /// `G/sourcedata/dicoms/study`.
    pub study_path: String,
    /// `G/bids`.
    pub bids_path: String,
    /// `NI_DATAOPS_GITLAB_ROOT` (default `ni-dataops`).
    pub root: String,
    /// `BIDS_DEV_BRANCH` (default `dev`).
    pub dev_branch: String,
    /// `BIDS_BASE_BRANCH` (default `base`).
    pub base_branch: String,
}

impl Values {
    fn get(&self, name: &str) -> Option<&str> {
        Some(match name {
            "STUDY_PATH" => &self.study_path,
            "BIDS_PATH" => &self.bids_path,
            "NI_DATAOPS_GITLAB_ROOT" => &self.root,
            "BIDS_DEV_BRANCH" => &self.dev_branch,
            "BIDS_BASE_BRANCH" => &self.base_branch,
            _ => return None,
        })
    }
}

/// One set of files: `(path in the dataset, text with placeholders)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateSet {
    files: Vec<(String, String)>,
}

impl TemplateSet {
    fn builtin(files: &[(&str, &str)]) -> Self {
        Self { files: files.iter().map(|(p, t)| ((*p).to_owned(), (*t).to_owned())).collect() }
    }

    /// The files, placeholders replaced.
    pub fn render(&self, values: &Values) -> Vec<(String, String)> {
        self.files.iter().map(|(path, text)| (path.clone(), substitute(text, values))).collect()
    }

    /// The paths of the files.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.files.iter().map(|(p, _)| p.as_str())
    }
}

/// The three sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Templates {
    /// Added to every new session dataset.
    pub session: TemplateSet,
    /// The study superdataset.
    pub study: TemplateSet,
    /// The BIDS dataset.
    pub bids: TemplateSet,
}

impl Default for Templates {
    fn default() -> Self {
        Self {
            session: TemplateSet::builtin(BUILTIN_SESSION),
            study: TemplateSet::builtin(BUILTIN_STUDY),
            bids: TemplateSet::builtin(BUILTIN_BIDS),
        }
    }
}

impl Templates {
    /// The built-in sets, each replaced by `<dir>/session`, `<dir>/study` or
    /// `<dir>/bids` where that directory exists. Errors name the file.
    pub fn load(dir: &Path) -> Result<Self, String> {
        if !dir.is_dir() {
            return Err(format!("{} is not a directory", dir.display()));
        }
        let mut t = Self::default();
        for (kind, set) in [("session", &mut t.session), ("study", &mut t.study), ("bids", &mut t.bids)] {
            let sub = dir.join(kind);
            if sub.is_dir() {
                let mut files = Vec::new();
                read_dir(&sub, &sub, &mut files)?;
                files.sort();
                if kind == "bids"
                    && let Some((p, _)) = files.iter().find(|(p, _)| p.starts_with("sourcedata/dicoms/"))
                {
                    return Err(format!(
                        "{}: sourcedata/dicoms is where the indexer installs the study superdataset",
                        sub.join(p).display()
                    ));
                }
                *set = TemplateSet { files };
            }
        }
        Ok(t)
    }
}

fn read_dir(root: &Path, dir: &Path, out: &mut Vec<(String, String)>) -> Result<(), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("read {}: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("read {}: {e}", dir.display()))?;
        let path = entry.path();
        // Followed: a mounted directory of symlinks (a swarm config, a ConfigMap) works.
        let kind = std::fs::metadata(&path).map_err(|e| format!("read {}: {e}", path.display()))?.file_type();
        if kind.is_dir() {
            read_dir(root, &path, out)?;
            continue;
        }
        let rel = path.strip_prefix(root).map_err(|e| format!("{}: {e}", path.display()))?;
        let rel = rel.to_str().ok_or_else(|| format!("{}: the name is not UTF-8", path.display()))?.to_owned();
        if !kind.is_file() {
            return Err(format!("{}: not a regular file", path.display()));
        }
        if rel == ".gitmodules" || rel.starts_with(".datalad/") || rel.split('/').any(|s| s == ".git") {
            return Err(format!("{}: the indexer writes {rel} itself", path.display()));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| format!("read {}: {e}", path.display()))?;
        if let Some(unknown) = unknown_placeholder(&text) {
            return Err(format!(
                "{}: unknown placeholder {{{{{unknown}}}}} (known: {})",
                path.display(),
                PLACEHOLDERS.join(", ")
            ));
        }
        out.push((rel, text));
    }
    Ok(())
}

/// The first `{{NAME}}` that is not a known placeholder.
fn unknown_placeholder(text: &str) -> Option<String> {
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let end = after.find("}}")?;
        let name = &after[..end];
        if !PLACEHOLDERS.contains(&name) {
            return Some(name.to_owned());
        }
        rest = &after[end + 2..];
    }
    None
}

/// `text` with every known `{{NAME}}` replaced by its escaped value.
fn substitute(text: &str, values: &Values) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find("}}").and_then(|end| values.get(&after[..end]).map(|v| (end, v))) {
            Some((end, value)) => {
                out.push_str(&value.replace('\\', "\\\\").replace('"', "\\\""));
                rest = &after[end + 2..];
            }
            None => {
                out.push_str("{{");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values() -> Values {
        Values {
            study_path: "PI/Study1/sourcedata/dicoms/study".into(),
            bids_path: "PI/Study1/bids".into(),
            root: "ni-dataops".into(),
            dev_branch: "dev".into(),
            base_branch: "base".into(),
        }
    }

    #[test]
    fn builtin_templates_render_every_placeholder() {
        let t = Templates::default();
        for set in [&t.session, &t.study, &t.bids] {
            for (path, text) in set.render(&values()) {
                assert!(!text.contains("{{"), "{path}: {text}");
            }
        }
        let study: Vec<_> = t.study.render(&values());
        let env = &study.iter().find(|(p, _)| p == ".ci-env.yml").unwrap().1;
        assert!(env.contains("STUDY_PATH: \"PI/Study1/sourcedata/dicoms/study\""), "{env}");
        assert!(env.contains("BIDS_PATH: \"PI/Study1/bids\""), "{env}");
        let ci = &study.iter().find(|(p, _)| p == ".gitlab-ci.yml").unwrap().1;
        assert!(ci.contains("project: \"ni-dataops/ci-pipelines\""), "{ci}");
        let bids: Vec<&str> = t.bids.paths().collect();
        for f in [".gitlab-ci.yml", ".gitattributes", ".bids_init", ".derivatives", ".gitignore", ".bidsignore"] {
            assert!(bids.contains(&f), "{f} missing from the BIDS template");
        }
        let derivatives = t.bids.render(&values()).into_iter().find(|(p, _)| p == ".derivatives").unwrap().1;
        assert_eq!(derivatives, "qc/mriqc\n");
    }

    #[test]
    fn values_cannot_break_out_of_yaml_strings() {
        let mut v = values();
        v.study_path = "a\"b\\c/sourcedata/dicoms/study".into();
        assert_eq!(substitute("x: \"{{STUDY_PATH}}\"", &v), "x: \"a\\\"b\\\\c/sourcedata/dicoms/study\"");
        assert_eq!(substitute("{{ NOPE }} {{", &v), "{{ NOPE }} {{");
    }

    #[test]
    fn a_site_directory_replaces_a_set_and_unknown_placeholders_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("bids/code")).unwrap();
        std::fs::write(dir.path().join("bids/README.md"), "Our lab: {{BIDS_PATH}}\n").unwrap();
        std::fs::write(dir.path().join("bids/code/setup.sh"), "echo hi\n").unwrap();
        let t = Templates::load(dir.path()).unwrap();
        assert_eq!(t.study, Templates::default().study);
        assert_eq!(
            t.bids.render(&values()),
            vec![
                ("README.md".to_owned(), "Our lab: PI/Study1/bids\n".to_owned()),
                ("code/setup.sh".to_owned(), "echo hi\n".to_owned())
            ]
        );
        std::fs::write(dir.path().join("bids/README.md"), "{{PatientName}}\n").unwrap();
        let e = Templates::load(dir.path()).unwrap_err();
        assert!(e.contains("README.md") && e.contains("{{PatientName}}"), "{e}");
        std::fs::write(dir.path().join("bids/README.md"), "ok\n").unwrap();
        std::fs::create_dir_all(dir.path().join("study/.datalad")).unwrap();
        std::fs::write(dir.path().join("study/.datalad/config"), "x").unwrap();
        let e = Templates::load(dir.path()).unwrap_err();
        assert!(e.contains(".datalad/config"), "{e}");
    }
}
