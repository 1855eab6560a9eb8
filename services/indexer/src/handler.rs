//! Handling one `ArchiveStored`: validate, place, index, announce.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context as _;
use bidsflux_messaging::manifest;
use bidsflux_messaging::{Bus, Delivery, HandlerError, now_unix_ms, subjects};
use bidsflux_proto::v1 as pb;
use bidsflux_session::{Template, Uid};
use tracing::Instrument as _;

use crate::dataset;
use crate::forge::Project;
use crate::forge::{Forge, ProjectPath};
use crate::git::{Git, GitError};
use crate::job::IndexJob;
use crate::metrics::{Metrics, Outcome, Step};
use crate::superdataset::{self, Conflict, StudyUpdate, Subdataset};
use crate::templates::{Templates, Values};

/// Everything a handler needs, shared by concurrent deliveries.
#[derive(Debug)]
pub(crate) struct Indexer<F> {
    pub(crate) bus: Bus,
    pub(crate) git: Git,
    pub(crate) forge: F,
    pub(crate) work_dir: PathBuf,
    pub(crate) group_template: Template,
    pub(crate) session_name_template: Template,
    pub(crate) templates: Templates,
    pub(crate) ni_dataops_root: String,
    pub(crate) bids_dev_branch: String,
    pub(crate) bids_base_branch: String,
    /// BIDS projects known to be complete (all branches pushed): not checked again.
    pub(crate) bids_ready: Mutex<HashSet<String>>,
    /// What `/metrics` shows.
    pub(crate) metrics: Arc<Metrics>,
}

/// Where one study's datasets go.
pub(crate) struct Paths {
    /// `G/sourcedata/dicoms/<StudyInstanceUID>`.
    pub(crate) session: ProjectPath,
    /// `G/sourcedata/dicoms/study`.
    pub(crate) study: ProjectPath,
    /// `G/bids`.
    pub(crate) bids: ProjectPath,
    /// `G/derivatives` and `G/qc`.
    pub(crate) subgroups: [ProjectPath; 2],
    /// The session's path in the study superdataset (patient data: never log).
    pub(crate) session_name: String,
}

/// The StudyInstanceUID of a delivery, for dead letters (only if it is a valid UID).
pub(crate) fn study_of(d: &Delivery) -> Option<String> {
    let msg: pb::ArchiveStored = d.decode().ok()?;
    Uid::parse("StudyInstanceUID", &msg.study_instance_uid).ok().map(|u| u.to_string())
}

/// The project path of a study: `<group>/sourcedata/dicoms/<StudyInstanceUID>`,
/// and the other paths of its group.
///
/// When the template uses a patient variable the group is patient data: the
/// path is then shown as `[redacted]/sourcedata/dicoms/<uid>` everywhere.
/// Everything is checked here, before anything is created.
pub(crate) fn project_paths(
    group_template: &Template,
    session_template: &Template,
    job: &IndexJob,
) -> Result<Paths, HandlerError> {
    let group = group_template
        .render(&job.metas)
        .map_err(|e| HandlerError::invalid(format!("GITLAB_INDEXER_GROUP_TEMPLATE: {e}")))?;
    // As GitLab writes paths (on every forge, so that a site's layout does not depend on it).
    let group = crate::forge::gitlab_group(&group).ok_or_else(|| {
        HandlerError::invalid(format!(
            "GITLAB_INDEXER_GROUP_TEMPLATE {:?} renders a group segment with no character GitLab accepts in a path \
             (letters, digits, '_', '-', '.')",
            group_template.as_str()
        ))
    })?;
    let hidden = group_template.uses_patient_values();
    let in_group = |rest: &str| {
        ProjectPath::in_group(&group, rest, hidden).map_err(|e| {
            HandlerError::invalid(format!("GITLAB_INDEXER_GROUP_TEMPLATE {:?}: {e}", group_template.as_str()))
        })
    };
    // A session whose name cannot be a path (no PatientName, a hostile one)
    // is still indexed: its subdataset is then at its StudyInstanceUID.
    let session_name = match session_template.render(&job.metas) {
        Ok(name) => match superdataset::session_path_problem(&name) {
            None => name,
            Some(why) => {
                tracing::warn!(
                    study_uid = %job.study,
                    template = session_template.as_str(),
                    "BIDSFLUX_SESSION_NAME_TEMPLATE renders a path that cannot be a subdataset ({why}): \
                     the session is recorded at its StudyInstanceUID"
                );
                job.study.to_string()
            }
        },
        Err(e) => {
            // The error names the template and variable, never the value.
            tracing::warn!(study_uid = %job.study, error = %format!("{e:#}"), "the session is recorded at its StudyInstanceUID");
            job.study.to_string()
        }
    };
    Ok(Paths {
        session: in_group(&format!("sourcedata/dicoms/{}", job.study))?,
        study: in_group("sourcedata/dicoms/study")?,
        bids: in_group("bids")?,
        subgroups: [in_group("derivatives")?, in_group("qc")?],
        session_name,
    })
}

/// `text` without the session path `name`, also as git quotes it (`"M\303\274ller"`).
fn hide_session_name(text: &str, name: &str) -> String {
    let mut quoted = String::new();
    for b in name.bytes() {
        match b {
            b'"' => quoted.push_str("\\\""),
            b'\\' => quoted.push_str("\\\\"),
            0x20..=0x7e => quoted.push(char::from(b)),
            _ => quoted.push_str(&format!("\\{b:03o}")),
        }
    }
    bidsflux_session::redact(text, &[name, &quoted])
}

/// Whether commit `a` is an ancestor of (or is) commit `b`, in the session
/// work repository `dir`; a `b` it does not have (pushed by another replica
/// since) is fetched from the session project first. Fails rather than guess.
async fn contains(git: Git, dir: PathBuf, project: Project, a: String, b: String) -> anyhow::Result<bool> {
    let have = |c: String| {
        let (git, dir) = (git.clone(), dir.clone());
        async move { git.run(&dir, &["cat-file", "-e", &format!("{c}^{{commit}}")]).await.is_ok() }
    };
    if !have(b.clone()).await {
        dataset::fetch(&git.with_config(&project.git_config), &dir, &project.push_url, false)
            .await
            .context("fetch the session to compare it with the superdataset's entry")?;
        if !have(b.clone()).await {
            // Not in the session's history (rewritten by hand): ours replaces it.
            return Ok(false);
        }
    }
    match git.run(&dir, &["merge-base", "--is-ancestor", &a, &b]).await {
        Ok(_) => Ok(true),
        Err(GitError::Failed { status, .. }) if status == "exit status: 1" => Ok(false),
        Err(e) => Err(anyhow::Error::new(e).context("compare the session with the superdataset's entry")),
    }
}

/// `e` with the patient part of `path` scrubbed from its text (git errors
/// quote push URLs and directories, which contain the project path).
fn redacted(path: &ProjectPath, e: HandlerError) -> HandlerError {
    if !path.has_patient_data() {
        return e;
    }
    match e {
        HandlerError::Transient(e) => HandlerError::Transient(anyhow::anyhow!(path.redact(&format!("{e:#}")))),
        HandlerError::Permanent { kind, reason } => HandlerError::Permanent { kind, reason: path.redact(&reason) },
    }
}

impl<F: Forge> Indexer<F> {
    /// Handles one delivery, counted in the metrics.
    pub(crate) async fn handle(&self, d: Delivery) -> Result<(), HandlerError> {
        let started = Instant::now();
        let result = self.handle_delivery(d).await;
        match &result {
            Ok(outcome) => self.metrics.session(*outcome, started.elapsed()),
            Err(HandlerError::Transient(_)) => self.metrics.failure(None),
            Err(HandlerError::Permanent { kind, .. }) => self.metrics.failure(Some(*kind)),
        }
        result.map(|_| ())
    }

    async fn handle_delivery(&self, d: Delivery) -> Result<Outcome, HandlerError> {
        let mut msg: pb::ArchiveStored = d.decode()?;
        manifest::resolve(&self.bus.js, &mut msg).await?;
        let job = IndexJob::try_from(&msg)?;
        let span = tracing::info_span!(
            "index",
            study_uid = %job.study,
            generation = job.generation,
            files = job.files.len(),
            archive_key = %job.archive.key,
        );
        self.index(&job).instrument(span).await
    }

    async fn index(&self, job: &IndexJob) -> Result<Outcome, HandlerError> {
        let paths = project_paths(&self.group_template, &self.session_name_template, job)?;
        self.index_at(job, &paths).await.map_err(|e| redacted(&paths.session, e))
    }

    fn values(&self, paths: &Paths) -> Values {
        Values {
            study_path: paths.study.as_str().to_owned(),
            bids_path: paths.bids.as_str().to_owned(),
            root: self.ni_dataops_root.clone(),
            dev_branch: self.bids_dev_branch.clone(),
            base_branch: self.bids_base_branch.clone(),
        }
    }

    async fn index_at(&self, job: &IndexJob, paths: &Paths) -> Result<Outcome, HandlerError> {
        let path = &paths.session;
        let step = Instant::now();
        let project = self.forge.ensure_project(path).await?;
        self.metrics.step(Step::Project, step.elapsed());
        let work = tempfile::Builder::new()
            .prefix(&format!("{}-", job.study))
            .tempdir_in(&self.work_dir)
            .with_context(|| format!("create a work directory in {}", self.work_dir.display()))?;
        let result = self.index_in(job, paths, &project, work.path()).await;
        // Thousands of small git files: remove them off the async threads.
        let _ = tokio::task::spawn_blocking(move || drop(work)).await;
        let (indexed, study) = result?;
        // "[redacted]/sourcedata/dicoms/<uid>" when the group is patient data.
        let shown = path.shown();
        if indexed.pushed {
            tracing::info!(project = shown, commit = %indexed.commit, "study indexed and pushed");
        } else {
            tracing::info!(project = shown, commit = %indexed.commit, "study already indexed, announcing it again");
        }
        if study.pushed {
            tracing::info!(
                superdataset = paths.study.shown(),
                commit = %study.commit,
                created = study.created,
                "session recorded in the study superdataset"
            );
        }
        let event = pb::StudyIndexed {
            study_instance_uid: job.study.to_string(),
            generation: job.generation,
            dataset_id: indexed.dataset_id,
            project_path: path.as_str().to_owned(),
            clone_url: project.clone_url,
            commit: indexed.commit,
            archive_annex_key: job.archive.key.clone(),
            indexed_at_unix_ms: now_unix_ms(),
            study_project_path: paths.study.as_str().to_owned(),
            study_commit: study.commit,
        };
        let id = subjects::indexed_msg_id(job.study.as_str(), job.generation);
        let step = Instant::now();
        self.bus.publish(subjects::STUDY_INDEXED, &event, Some(&id)).await.context("publish StudyIndexed")?;
        self.metrics.step(Step::Publish, step.elapsed());
        Ok(if indexed.pushed { Outcome::Indexed } else { Outcome::AlreadyIndexed })
    }
}

impl<F: Forge> Indexer<F> {
    /// The session dataset, then its entry in the study superdataset, then the
    /// BIDS dataset if the group has none yet: every step converges when a
    /// redelivery repeats it.
    async fn index_in(
        &self,
        job: &IndexJob,
        paths: &Paths,
        project: &Project,
        work: &Path,
    ) -> Result<(dataset::Indexed, StudyUpdate), HandlerError> {
        let values = self.values(paths);
        let session_dir = work.join("session");
        tokio::fs::create_dir_all(&session_dir).await.context("create the session work directory")?;
        let session_files = self.templates.session.render(&values);
        let step = Instant::now();
        let indexed = dataset::index(&self.git, &session_dir, job, project, &session_files).await?;
        self.metrics.step(Step::Session, step.elapsed());

        let step = Instant::now();
        let study_project = self.forge.ensure_project(&paths.study).await?;
        let session = Subdataset {
            path: paths.session_name.clone(),
            url: superdataset::session_url(job.study.as_str()),
            id: indexed.dataset_id.clone(),
            commit: indexed.commit.clone(),
        };
        let git = self.git.clone();
        let study = superdataset::add_session(
            &self.git,
            work,
            &study_project,
            &self.templates.study,
            &values,
            &session,
            |a, b| contains(git.clone(), session_dir.clone(), project.clone(), a, b),
        )
        .await
        .map_err(|e| match e.downcast_ref::<Conflict>() {
            Some(c) => HandlerError::invalid(format!(
                "study {} was indexed in {} but cannot be recorded in the study superdataset {}: {c} \
                 (BIDSFLUX_SESSION_NAME_TEMPLATE {:?}); fix the session's metadata or the template and re-index",
                job.study,
                paths.session.shown(),
                paths.study.shown(),
                self.session_name_template.as_str(),
            )),
            // Belt and braces: no git message may carry the session path.
            None => HandlerError::Transient(anyhow::anyhow!(
                "record the session in the study superdataset: {}",
                hide_session_name(&format!("{e:#}"), &paths.session_name)
            )),
        })?;
        self.metrics.step(Step::Superdataset, step.elapsed());
        self.metrics.push_retries(study.push_retries);
        let step = Instant::now();
        let bids = self.ensure_bids(paths, &values, &study, work).await;
        self.metrics.step(Step::Bids, step.elapsed());
        match bids {
            Ok(()) => {}
            // The session and its entry are pushed: a BIDS project GitLab
            // refuses to set up (e.g. made by hand, the bot not Maintainer)
            // must not hold them back. Tried again with the next session.
            Err(HandlerError::Permanent { reason, .. }) => tracing::error!(
                project = paths.bids.shown(),
                reason = paths.session.redact(&reason),
                "the BIDS dataset of the study could not be set up; fix it in the forge"
            ),
            Err(e) => return Err(e),
        }
        Ok((indexed, study))
    }

    /// Creates the group's BIDS dataset (with branch protection and the
    /// `derivatives` and `qc` subgroups) unless this replica already saw it complete.
    async fn ensure_bids(
        &self,
        paths: &Paths,
        values: &Values,
        study: &StudyUpdate,
        work: &Path,
    ) -> Result<(), HandlerError> {
        let key = paths.bids.as_str().to_owned();
        if self.bids_ready.lock().unwrap_or_else(|e| e.into_inner()).contains(&key) {
            return Ok(());
        }
        let project = self.forge.ensure_project(&paths.bids).await?;
        let protected = ["convert/*".to_owned(), self.bids_dev_branch.clone(), self.bids_base_branch.clone()];
        // Before the first push: the branches are never unprotected.
        self.forge.protect_branches(&paths.bids, &protected).await?;
        for group in &paths.subgroups {
            self.forge.ensure_group(group).await?;
        }
        let sourcedata = Subdataset {
            path: superdataset::BIDS_SOURCEDATA_PATH.to_owned(),
            url: superdataset::STUDY_URL_FROM_BIDS.to_owned(),
            id: study.dataset_id.clone(),
            commit: study.commit.clone(),
        };
        let branches = ["main", self.bids_dev_branch.as_str(), self.bids_base_branch.as_str()];
        let pushed =
            superdataset::init_bids(&self.git, work, &project, &self.templates.bids, values, &sourcedata, &branches)
                .await
                .map_err(|e| match e.downcast_ref::<Conflict>() {
                    Some(c) => HandlerError::permanent(format!("BIDS dataset {}: {c}", paths.bids.shown())),
                    None => HandlerError::Transient(e.context("create the BIDS dataset")),
                })?;
        if pushed {
            tracing::info!(project = paths.bids.shown(), "created the BIDS dataset of the study");
        }
        self.bids_ready.lock().unwrap_or_else(|e| e.into_inner()).insert(key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_names_are_hidden_also_as_git_quotes_them() {
        let e = "fatal: 'Doe/Jane' and \"M\\303\\274ller/ses-1\" failed";
        assert_eq!(hide_session_name(e, "Doe/Jane"), "fatal: '[redacted]' and \"M\\303\\274ller/ses-1\" failed");
        assert_eq!(hide_session_name(e, "Müller/ses-1"), "fatal: 'Doe/Jane' and \"[redacted]\" failed");
    }

    /// A recorded commit another replica pushed after this job fetched the
    /// session is fetched before comparing, never taken as "not newer".
    #[tokio::test]
    async fn commits_pushed_since_are_fetched_before_comparing() {
        let tmp = tempfile::tempdir().unwrap();
        let identity = crate::git::Identity { name: "bot".into(), email: "bot@localhost".into() };
        let git = Git::new("git", identity, std::time::Duration::from_secs(30));
        let (origin, work) = (tmp.path().join("origin"), tmp.path().join("work"));
        for dir in [&origin, &work] {
            std::fs::create_dir_all(dir).unwrap();
            git.run(dir, &["init", "-q", "-b", "main", "."]).await.unwrap();
        }
        let commit = |m: &'static str| {
            let git = git.clone();
            let origin = origin.clone();
            async move {
                git.run(&origin, &["commit", "-q", "--allow-empty", "-m", m]).await.unwrap();
                git.run(&origin, &["rev-parse", "HEAD"]).await.unwrap().trim().to_owned()
            }
        };
        let c1 = commit("generation 0").await;
        let url = origin.to_string_lossy().into_owned();
        git.run(&work, &["fetch", "-q", &url, "main:refs/remotes/origin/main"]).await.unwrap();
        let c2 = commit("generation 1").await;
        let project = Project { push_url: url.clone(), clone_url: url, git_config: Vec::new() };
        let check = |a: &str, b: &str| contains(git.clone(), work.clone(), project.clone(), a.to_owned(), b.to_owned());
        assert!(check(&c1, &c2).await.unwrap(), "c2 (fetched on demand) contains c1");
        assert!(!check(&c2, &c1).await.unwrap());
        assert!(!check(&c1, &"f".repeat(40)).await.unwrap(), "an unknown commit is replaced");
    }
}
