//! Handling one `ArchiveStored`: validate, place, index, announce.

use std::path::PathBuf;

use anyhow::Context as _;
use bidsflux_messaging::manifest::{self, ManifestError};
use bidsflux_messaging::{Bus, Delivery, HandlerError, now_unix_ms, subjects};
use bidsflux_proto::v1 as pb;
use bidsflux_session::{Template, Uid};
use tracing::Instrument as _;

use crate::dataset;
use crate::forge::{Forge, ForgeError, ProjectPath};
use crate::git::Git;
use crate::job::{IndexJob, JobError};

/// Everything a handler needs, shared by concurrent deliveries.
#[derive(Debug)]
pub(crate) struct Indexer<F> {
    pub(crate) bus: Bus,
    pub(crate) git: Git,
    pub(crate) forge: F,
    pub(crate) work_dir: PathBuf,
    pub(crate) group_template: Template,
}

/// The StudyInstanceUID of a delivery, for dead letters (only if it is a valid UID).
pub(crate) fn study_of(d: &Delivery) -> Option<String> {
    let msg: pb::ArchiveStored = d.decode().ok()?;
    Uid::parse("StudyInstanceUID", &msg.study_instance_uid).ok().map(|u| u.to_string())
}

/// The project path of a study: `<group>/sourcedata/dicoms/<StudyInstanceUID>`.
///
/// When the template uses a patient variable the group is patient data: the
/// path is then shown as `[redacted]/sourcedata/dicoms/<uid>` everywhere.
pub(crate) fn project_path(template: &Template, job: &IndexJob) -> Result<ProjectPath, HandlerError> {
    let group = template
        .render(&job.metas)
        .map_err(|e| HandlerError::invalid(format!("GITLAB_INDEXER_GROUP_TEMPLATE: {e}")))?;
    ProjectPath::in_group(&group, &format!("sourcedata/dicoms/{}", job.study), template.uses_patient_values())
        .map_err(|e| HandlerError::invalid(format!("GITLAB_INDEXER_GROUP_TEMPLATE {:?}: {e}", template.as_str())))
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

fn forge_error(e: ForgeError) -> HandlerError {
    match e {
        ForgeError::InvalidPath { .. } => HandlerError::invalid(e.to_string()),
        ForgeError::Refused(_) => HandlerError::permanent(e.to_string()),
        ForgeError::Unavailable(_) => HandlerError::Transient(anyhow::Error::new(e)),
    }
}

impl<F: Forge> Indexer<F> {
    /// Handles one delivery.
    pub(crate) async fn handle(&self, d: Delivery) -> Result<(), HandlerError> {
        let mut msg: pb::ArchiveStored = d.decode()?;
        manifest::resolve(&self.bus.js, &mut msg).await.map_err(|e| match e {
            ManifestError::Invalid { .. } => HandlerError::invalid(e.to_string()),
            ManifestError::Unavailable { .. } => HandlerError::Transient(anyhow::Error::new(e)),
        })?;
        let job = IndexJob::try_from(&msg).map_err(|e| match e {
            JobError::Malformed(_) => HandlerError::malformed(e.to_string()),
            JobError::Invalid(_) => HandlerError::invalid(e.to_string()),
        })?;
        let span = tracing::info_span!(
            "index",
            study_uid = %job.study,
            generation = job.generation,
            files = job.files.len(),
            archive_key = %job.archive.key,
        );
        self.index(&job).instrument(span).await
    }

    async fn index(&self, job: &IndexJob) -> Result<(), HandlerError> {
        let path = project_path(&self.group_template, job)?;
        self.index_at(job, &path).await.map_err(|e| redacted(&path, e))
    }

    async fn index_at(&self, job: &IndexJob, path: &ProjectPath) -> Result<(), HandlerError> {
        let project = self.forge.ensure_project(path).await.map_err(forge_error)?;
        let work = tempfile::Builder::new()
            .prefix(&format!("{}-", job.study))
            .tempdir_in(&self.work_dir)
            .with_context(|| format!("create a work directory in {}", self.work_dir.display()))?;
        let result = dataset::index(&self.git, work.path(), job, &project).await;
        // Thousands of small git files: remove them off the async threads.
        let _ = tokio::task::spawn_blocking(move || drop(work)).await;
        let indexed = result?;
        // "[redacted]/sourcedata/dicoms/<uid>" when the group is patient data.
        let shown = path.shown();
        if indexed.pushed {
            tracing::info!(project = shown, commit = %indexed.commit, "study indexed and pushed");
        } else {
            tracing::info!(project = shown, commit = %indexed.commit, "study already indexed, announcing it again");
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
        };
        let id = subjects::indexed_msg_id(job.study.as_str(), job.generation);
        self.bus.publish(subjects::STUDY_INDEXED, &event, Some(&id)).await.context("publish StudyIndexed")?;
        Ok(())
    }
}
