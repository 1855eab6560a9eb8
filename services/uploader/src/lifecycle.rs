//! Spool lifecycle: a study's spool files are deleted once it is indexed (or
//! discarded), never before, and never with `BIDSFLUX_SPOOL_KEEP=true`.
//!
//! - **Indexed** (`StudyIndexed`, durable consumer `uploader-lifecycle` on
//!   `BIDSFLUX_V1_INDEXED`): the manifest of the indexed generation is read
//!   back from the object store `bidsflux_v1_manifests` (the uploader puts
//!   every manifest there under [`manifest::object_name`] before it publishes
//!   `ArchiveStored`; the archive MD5 comes from the event's MD5E annex key).
//!   Exactly the files it lists are deleted, and only when the file on disk
//!   still has the manifest's size and SHA-256: a different file under that
//!   name (written after the archive was built) is kept and logged. Files of
//!   later generations are not in the manifest, so they stay.
//! - **Discarded** (`StudyDiscarded`, durable consumer `uploader-lifecycle` on
//!   `BIDSFLUX_V1_STUDIES`): only with `BIDSFLUX_SPOOL_DELETE_DISCARDED=true`,
//!   the study's `<series>/<sop>.dcm` files last modified before the discard
//!   are deleted. Off by default: the event does not list its instances, so a
//!   file written before the discard may still belong to a later generation
//!   (study-completion lagging behind the receiver) or to an earlier one not
//!   yet archived; the files stay and the janitor reports them. Only names
//!   that are spool paths ([`SpoolPath`]) are deleted: conflict
//!   (`.conflict-…`) and torn (`.torn-…`) files are always left for operators.
//!
//! - **Resent** (every `BIDSFLUX_SPOOL_JANITOR_INTERVAL`, [`Lifecycle::sweep_resends`]): a
//!   scanner that sends a study again after it was indexed puts the instances back in the
//!   spool; study-completion counts them as duplicates, so no generation ever takes them and
//!   no `StudyIndexed` would delete them. Once a generation's files are handled, the lifecycle
//!   leaves a marker in the manifests store ([`indexed_marker`], naming the manifest); the
//!   sweep matches each study directory against the manifests of its indexed generations
//!   (markers from generation 0 up to the first missing one) and deletes the files with the
//!   listed size and SHA-256 — byte-identical copies of what is archived and indexed. A
//!   resent instance that differs, or is new, is not listed and stays.
//!
//! All are idempotent: a file already gone counts as deleted, so a
//! redelivery deletes nothing more. Directories are never removed here (the
//! deletions just changed them): the janitor removes series and study
//! directories that are empty and have not changed for
//! `BIDSFLUX_SPOOL_EMPTY_DIR_AGE` (see [`crate::janitor`]). `.tmp/` and
//! `.journal/` at the spool root belong to the receiver and are never looked at.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use bidsflux_messaging::{Bus, Delivery, HandlerError, manifest, subjects};
use bidsflux_proto::v1 as pb;
use bidsflux_session::{SpoolPath, Uid, annex};
use prost::Message as _;
use tokio::io::AsyncReadExt as _;
use tracing::Instrument as _;

use crate::metrics::Metrics;
pub use crate::report::Outcome;
use crate::spool;

/// Deletes spool files of indexed and discarded studies.
#[derive(Debug)]
pub struct Lifecycle {
    /// Reads manifests from the object store.
    pub bus: Bus,
    /// The receiver's spool.
    pub spool_dir: PathBuf,
    /// `BIDSFLUX_SPOOL_KEEP`: log, never delete.
    pub keep: bool,
    /// `BIDSFLUX_SPOOL_DELETE_DISCARDED`: delete discarded studies' files (off: keep them).
    pub delete_discarded: bool,
    /// Counters for `/metrics`.
    pub metrics: Arc<Metrics>,
}

/// Name of the marker, in the manifests store, of an indexed generation whose files the
/// lifecycle handled: its content is the name of the generation's manifest object.
pub fn indexed_marker(study: &str, generation: u32) -> String {
    format!("{study}.{generation}.indexed")
}

/// The files `entries` of manifest `object` lists, checked to be `study`'s spool paths.
fn targets(
    study: &Uid,
    object: &str,
    entries: Vec<pb::ManifestEntry>,
) -> Result<Vec<(SpoolPath, u64, String)>, HandlerError> {
    entries
        .into_iter()
        .map(|e| {
            checked_path(study, &e.path).map(|rel| (rel, e.size, e.sha256)).ok_or_else(|| {
                HandlerError::invalid(format!("manifest {object} lists a path outside the study's spool layout"))
            })
        })
        .collect()
}

/// Checks a manifest path: `<study>/<series>/<sop>.dcm` of `study` (archives hold no conflict files).
fn checked_path(study: &Uid, path: &str) -> Option<SpoolPath> {
    SpoolPath::parse(path).ok().filter(|p| p.study() == study && !p.is_conflict())
}

fn transient(e: impl Into<anyhow::Error>, what: &'static str) -> HandlerError {
    HandlerError::Transient(e.into().context(what))
}

impl Lifecycle {
    /// Handles one `StudyIndexed`.
    pub async fn handle_indexed(self: Arc<Self>, delivery: Delivery) -> Result<(), HandlerError> {
        let msg: pb::StudyIndexed = delivery.decode()?;
        let study = Uid::parse("StudyInstanceUID", &msg.study_instance_uid)
            .map_err(|e| HandlerError::malformed(format!("StudyIndexed: {e}")))?;
        let span = tracing::info_span!("spool_indexed", study_uid = %study, generation = msg.generation);
        self.indexed(study, msg).instrument(span).await
    }

    async fn indexed(&self, study: Uid, msg: pb::StudyIndexed) -> Result<(), HandlerError> {
        let md5 = annex::md5_of_md5e_key(&msg.archive_annex_key).ok_or_else(|| {
            HandlerError::malformed(format!(
                "StudyIndexed: archive_annex_key {:?} is not an MD5E key",
                msg.archive_annex_key
            ))
        })?;
        let object = manifest::object_name(study.as_str(), msg.generation, md5);
        let Some(entries) = self.read_manifest(&object).await? else {
            // Archived before the lifecycle existed, or by something else: nothing
            // says which files were archived, so nothing is deleted (the janitor
            // reports the study if its files stay).
            tracing::warn!(object, "no manifest for the indexed archive; spool files kept");
            return Ok(());
        };
        let targets = targets(&study, &object, entries)?;
        let (spool_dir, keep) = (self.spool_dir.clone(), self.keep);
        let outcome = tokio::task::spawn_blocking(move || delete_matching(&spool_dir, &targets, keep))
            .await
            .context("join spool deletion task")
            .map_err(HandlerError::Transient)?
            .map_err(|e| transient(e, "delete indexed spool files"))?;
        self.metrics.record_deletion(&outcome);
        // For the resend sweep: this generation's files are handled, its manifest names them.
        self.manifests()
            .await?
            .put(indexed_marker(study.as_str(), msg.generation).as_str(), &mut object.as_bytes())
            .await
            .map_err(|e| transient(e, "record the indexed generation"))?;
        tracing::info!(
            deleted = outcome.deleted,
            already_gone = outcome.gone,
            kept_different = outcome.kept,
            would_delete = outcome.would_delete,
            keep = self.keep,
            "spool files of the indexed generation handled"
        );
        Ok(())
    }

    /// The manifest object's entries; `None` when there is no such object.
    async fn manifests(&self) -> Result<async_nats::jetstream::object_store::ObjectStore, HandlerError> {
        self.bus
            .js
            .get_object_store(subjects::OBJ_MANIFESTS)
            .await
            .map_err(|e| transient(e, "open the manifests object store"))
    }

    /// The bytes of object `name` of the manifests store; `None` when there is no such object.
    async fn read_object(&self, name: &str) -> Result<Option<Vec<u8>>, HandlerError> {
        use async_nats::jetstream::object_store::GetErrorKind;
        let mut obj = match self.manifests().await?.get(name).await {
            Ok(o) => o,
            Err(e) if e.kind() == GetErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(transient(e, "read the manifests store")),
        };
        let mut bytes = Vec::new();
        obj.read_to_end(&mut bytes).await.map_err(|e| transient(e, "read the manifests store"))?;
        Ok(Some(bytes))
    }

    /// Deletes the resent copies of indexed instances in the whole spool (see the module
    /// docs): each study directory is matched against the manifests of its indexed generations.
    pub async fn sweep_resends(&self) -> Result<Outcome, HandlerError> {
        let spool_dir = self.spool_dir.clone();
        let studies = tokio::task::spawn_blocking(move || spool::study_dirs(&spool_dir))
            .await
            .context("join spool listing task")
            .map_err(HandlerError::Transient)?
            .map_err(|e| transient(e, "list the spool's studies"))?;
        let mut total = Outcome::default();
        for study in studies {
            // One study's trouble (an undecodable manifest) must not stop the others' sweep.
            match self.sweep_study(&study).await {
                Ok(outcome) => {
                    total.deleted += outcome.deleted;
                    total.would_delete += outcome.would_delete;
                }
                Err(e) => {
                    tracing::warn!(study_uid = %study, error = %format!("{e:#}"), "resend sweep of a study failed")
                }
            }
        }
        Ok(total)
    }

    /// [`Self::sweep_resends`] for one study.
    async fn sweep_study(&self, study: &Uid) -> Result<Outcome, HandlerError> {
        let mut all = Vec::new();
        for generation in 0.. {
            let Some(name) = self.read_object(&indexed_marker(study.as_str(), generation)).await? else { break };
            let object = String::from_utf8_lossy(&name).into_owned();
            if let Some(entries) = self.read_manifest(&object).await? {
                all.extend(targets(study, &object, entries)?);
            }
        }
        if all.is_empty() {
            return Ok(Outcome::default());
        }
        let (spool_dir, keep) = (self.spool_dir.clone(), self.keep);
        let outcome = tokio::task::spawn_blocking(move || delete_matching(&spool_dir, &all, keep))
            .await
            .context("join spool deletion task")
            .map_err(HandlerError::Transient)?
            .map_err(|e| transient(e, "delete resent spool files"))?;
        // With BIDSFLUX_SPOOL_KEEP the same copies would be reported every pass: the janitor's
        // stale report says it instead.
        if outcome.deleted > 0 {
            self.metrics.record_deletion(&outcome);
            tracing::info!(
                study_uid = %study,
                deleted = outcome.deleted,
                "resent copies of indexed instances deleted from the spool"
            );
        }
        Ok(outcome)
    }

    /// Runs [`Self::sweep_resends`] every `interval` until `shutdown`.
    pub async fn run_resend_sweep(self: Arc<Self>, interval: Duration, shutdown: tokio_util::sync::CancellationToken) {
        let mut every = bidsflux_service::tasks::Every::new(interval, shutdown);
        while every.tick().await {
            if let Err(e) = self.sweep_resends().await {
                tracing::warn!(error = %format!("{e:#}"), "resend sweep failed; next one at the next interval");
            }
        }
    }

    async fn read_manifest(&self, object: &str) -> Result<Option<Vec<pb::ManifestEntry>>, HandlerError> {
        let Some(bytes) = self.read_object(object).await? else { return Ok(None) };
        let m = pb::Manifest::decode(bytes.as_slice())
            .map_err(|e| HandlerError::invalid(format!("manifest {object} cannot be decoded: {e}")))?;
        Ok(Some(m.entries))
    }

    /// Handles one `StudyDiscarded`.
    pub async fn handle_discarded(self: Arc<Self>, delivery: Delivery) -> Result<(), HandlerError> {
        let msg: pb::StudyDiscarded = delivery.decode()?;
        let study = Uid::parse("StudyInstanceUID", &msg.study_instance_uid)
            .map_err(|e| HandlerError::malformed(format!("StudyDiscarded: {e}")))?;
        let dir = msg.spool_study_dir.trim_end_matches('/');
        if !dir.is_empty() && dir != study.as_str() {
            return Err(HandlerError::malformed("StudyDiscarded: spool_study_dir is not the StudyInstanceUID"));
        }
        let span = tracing::info_span!("spool_discarded", study_uid = %study, generation = msg.generation);
        // The event has millisecond resolution, file times nanoseconds: a file written in the
        // discard's own millisecond counts as before it (the end of that millisecond).
        let until = SystemTime::UNIX_EPOCH
            + Duration::from_millis(u64::try_from(msg.discarded_at_unix_ms).unwrap_or(0))
            + Duration::from_nanos(999_999);
        // Without the opt-in, nothing is deleted (counted as kept by configuration).
        let (spool_dir, keep) = (self.spool_dir.clone(), self.keep || !self.delete_discarded);
        let outcome = tokio::task::spawn_blocking(move || delete_discarded(&spool_dir, &study, until, keep))
            .instrument(span.clone())
            .await
            .context("join spool deletion task")
            .map_err(HandlerError::Transient)?
            .map_err(|e| transient(e, "delete discarded spool files"))?;
        self.metrics.record_deletion(&outcome);
        span.in_scope(|| {
            tracing::info!(
                deleted = outcome.deleted,
                already_gone = outcome.gone,
                newer_kept = outcome.kept,
                would_delete = outcome.would_delete,
                keep = self.keep,
                delete_discarded = self.delete_discarded,
                "spool files of the discarded study handled"
            );
        });
        Ok(())
    }
}

/// Removes a file; a file already gone is success.
fn remove(path: &Path) -> io::Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Deletes each `(rel, size, sha256)` whose file still has that size and SHA-256.
pub fn delete_matching(spool: &Path, targets: &[(SpoolPath, u64, String)], keep: bool) -> io::Result<Outcome> {
    let mut out = Outcome::default();
    for (rel, size, sha256) in targets {
        let path = rel.to_path(spool);
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                out.gone += 1;
                continue;
            }
            Err(e) => return Err(e),
        };
        let same = meta.is_file()
            && meta.len() == *size
            && match spool::hash_file(&path) {
                Ok(d) => d.sha256.eq_ignore_ascii_case(sha256),
                Err(e) if e.is_transient() => return Err(io::Error::other(e.to_string())),
                Err(_) => false,
            };
        if !same {
            out.kept += 1;
            tracing::warn!(path = %rel, "spool file differs from the indexed manifest; kept");
        } else if keep {
            out.would_delete += 1;
            tracing::debug!(path = %rel, "would delete (BIDSFLUX_SPOOL_KEEP)");
        } else if remove(&path)? {
            out.deleted += 1;
        } else {
            out.gone += 1;
        }
    }
    Ok(out)
}

/// Deletes the `<series>/<sop>.dcm` files of `study` last modified at or before `until` (only
/// names that are spool paths, and no conflict files).
pub fn delete_discarded(spool: &Path, study: &Uid, until: SystemTime, keep: bool) -> io::Result<Outcome> {
    let mut out = Outcome::default();
    let study_dir = SpoolPath::study_dir(spool, study);
    let series_dirs = match std::fs::read_dir(&study_dir) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for series in series_dirs {
        let series = series?;
        let series_name = series.file_name();
        let Some(series_name) = series_name.to_str().filter(|n| Uid::parse_exact("SeriesInstanceUID", n).is_ok())
        else {
            continue;
        };
        if !series.file_type()?.is_dir() {
            continue;
        }
        let files = match std::fs::read_dir(series.path()) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for f in files {
            let f = f?;
            let name = f.file_name();
            let Some(name) = name.to_str() else { continue };
            match SpoolPath::from_names(study.as_str(), series_name, name) {
                Ok(path) if !path.is_conflict() => {}
                _ => continue,
            }
            let meta = match f.metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if !meta.is_file() {
                continue;
            }
            if meta.modified()? > until {
                out.kept += 1;
            } else if keep {
                out.would_delete += 1;
                tracing::debug!(file = %name, "would delete (BIDSFLUX_SPOOL_KEEP)");
            } else if remove(&f.path())? {
                out.deleted += 1;
            } else {
                out.gone += 1;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_paths_must_stay_in_the_study() {
        let study = Uid::parse("StudyInstanceUID", "1.2.3").unwrap();
        assert!(checked_path(&study, "1.2.3/4.5/6.7.dcm").is_some());
        for bad in ["1.2.4/4.5/6.7.dcm", "1.2.3/../6.7.dcm", "1.2.3/4.5/6.7.dcm/x", "1.2.3/4.5/6.7", "/1.2.3/4.5/6.dcm"]
        {
            assert!(checked_path(&study, bad).is_none(), "{bad}");
        }
    }
}
