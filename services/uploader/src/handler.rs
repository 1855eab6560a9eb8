//! One `StudyCompleted` → one verified archive in S3 → one `ArchiveStored`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use bidsflux_messaging::{Bus, Delivery, HandlerError, manifest, subjects};
use bidsflux_proto::v1 as pb;
use bidsflux_session::annex::md5e_key;
use bidsflux_session::s3::{Placement, S3UrlPattern};
use bidsflux_session::{SessionMetas, Uid};
use prost::Message as _;
use tracing::Instrument as _;
use tracing::field::Empty;

use crate::archive::{Archive, SevenZip};
use crate::completion::Completion;
use crate::config::Config;
use crate::generation::{self, Generation, GenerationError};
use crate::s3::{PutOutcome, Store};
use crate::s3_error::S3Error;
use crate::spool::{self, HashedFile, SpoolError, StudyFiles};

/// Room left in a NATS message for headers (trace context, message id).
const HEADER_ROOM: usize = 1024;

/// Handles completions; shared by the concurrent handlers of the consumer.
#[derive(Debug)]
pub struct Uploader {
    bus: Bus,
    store: Store,
    sevenzip: SevenZip,
    pattern: S3UrlPattern,
    spool_dir: PathBuf,
    work_dir: PathBuf,
    endpoint_url: String,
    /// Where users and git-annex reach the bucket (`BIDSFLUX_S3_PUBLIC_URL`).
    public_url: String,
    region: String,
    path_style: bool,
    /// Inline manifest limit (`None`: derived from the server's max_payload).
    manifest_inline_max: Option<usize>,
    /// `BIDSFLUX_SPOOL_KEEP`: earlier generations stay in the spool.
    spool_keep: bool,
    /// Study-completion's state (KV `bidsflux_v1_studies`): which instances are a generation's.
    studies: async_nats::jetstream::kv::Store,
}

/// A spool error, with what was being done if it is retried.
fn spool_failure(e: SpoolError) -> HandlerError {
    HandlerError::from(e).context("read spool")
}

/// An S3 error, with what was being done if it is retried.
fn s3_failure(e: S3Error) -> HandlerError {
    HandlerError::from(e).context("store archive")
}

/// Refuses an event the NATS server would reject as too large (a study with
/// very many files: the manifest has one entry per file).
fn fits_in_a_message(event: &pb::ArchiveStored, max_payload: usize) -> Result<(), HandlerError> {
    let len = event.encoded_len();
    if len + HEADER_ROOM > max_payload {
        return Err(HandlerError::permanent(format!(
            "ArchiveStored for {} files is {len} bytes, more than the NATS server's max_payload of {max_payload} \
             bytes (less {HEADER_ROOM} for headers); raise max_payload or split the study",
            event.manifest.len()
        )));
    }
    Ok(())
}

/// Where the archive was stored.
struct Stored {
    placement: Placement,
    key: String,
    annex_key: String,
}

/// What was read from the spool before archiving.
struct StudyInput {
    listing: StudyFiles,
    metas: SessionMetas,
}

impl Uploader {
    /// An uploader for `config`, publishing on `bus`.
    pub fn new(config: &Config, bus: Bus, studies: async_nats::jetstream::kv::Store) -> Self {
        Self {
            studies,
            bus,
            store: Store::new(config),
            sevenzip: SevenZip { level: config.sevenzip_level, threads: config.sevenzip_threads },
            pattern: config.s3_url_pattern.clone(),
            spool_dir: config.spool_dir.clone(),
            work_dir: config.work_dir.clone(),
            endpoint_url: config.endpoint_url.clone(),
            public_url: config.public_url.clone(),
            region: config.region.clone(),
            path_style: config.path_style,
            manifest_inline_max: config.manifest_inline_max,
            spool_keep: config.spool_keep,
        }
    }

    /// Handles one delivery of `StudyCompleted`.
    pub async fn handle(self: Arc<Self>, delivery: Delivery) -> Result<(), HandlerError> {
        let msg: pb::StudyCompleted = delivery.decode()?;
        let completion = Completion::try_from(&msg).map_err(|e| HandlerError::malformed(e.to_string()))?;
        let span = tracing::info_span!(
            "upload_study",
            study_uid = %completion.study,
            generation = completion.generation,
            files = Empty,
            archive_size = Empty,
            bucket = Empty,
        );
        self.upload(completion).instrument(span).await
    }

    /// The instances of `c`'s generation, from study-completion's state; `None` (take the whole
    /// spool directory, as before generations were told apart) for an event study-completion
    /// has no state for, or one without a count of its own.
    async fn generation(&self, c: &Completion) -> Result<Option<Generation>, GenerationError> {
        let Some(state) = generation::read_state(&self.studies, subjects::KV_STUDIES, c.study.as_str()).await? else {
            tracing::warn!(
                "study-completion has no state for the study: archiving every instance in its spool directory"
            );
            return Ok(None);
        };
        Generation::from_state(&state, c.instance_count, c.generation_instance_count)
    }

    async fn read_study(&self, c: &Completion, generation: Option<Generation>) -> Result<StudyInput, SpoolError> {
        let expected = match &generation {
            Some(g) => g.len() as u64,
            // Once an earlier generation is indexed the lifecycle deletes its files:
            // an amendment then finds only its own share in the spool.
            None if self.spool_keep || c.generation == 0 => c.instance_count,
            None => c.generation_instance_count,
        };
        let (spool_dir, study) = (self.spool_dir.clone(), c.study.clone());
        tokio::task::spawn_blocking(move || {
            let belongs = |sop: &Uid| generation.as_ref().is_none_or(|g| g.contains(sop.as_str()));
            let listing = spool::list_study(&spool_dir, &study, expected, &belongs)?;
            let first = listing.files.first().ok_or_else(|| SpoolError::Empty { dir: listing.dir.clone() })?;
            let metas = spool::read_metas(&spool_dir, first, &study)?;
            Ok(StudyInput { listing, metas })
        })
        .await
        .unwrap_or_else(|e| {
            Err(SpoolError::Io {
                what: "join the spool task for",
                path: self.spool_dir.clone(),
                source: std::io::Error::other(e),
            })
        })
    }

    fn place(&self, metas: &SessionMetas) -> Result<Placement, HandlerError> {
        self.pattern.place(metas).map_err(|e| HandlerError::invalid(format!("cannot place the study in S3: {e}")))
    }

    async fn hash_files(&self, listing: &StudyFiles) -> Result<Vec<HashedFile>, HandlerError> {
        let (spool_dir, files) = (self.spool_dir.clone(), listing.files.clone());
        tokio::task::spawn_blocking(move || {
            files.iter().map(|f| spool::hash_dicom(&spool_dir, f)).collect::<Result<Vec<_>, _>>()
        })
        .await
        .context("join hashing task")?
        .map_err(spool_failure)
    }

    async fn build_archive(&self, c: &Completion, listing: &StudyFiles) -> Result<Archive, HandlerError> {
        let name = format!("{}.7z", c.study);
        self.sevenzip
            .build(&self.spool_dir, &self.work_dir, &name, &listing.files)
            .await
            .context("build archive")
            .map_err(HandlerError::Transient)
    }

    async fn upload(&self, c: Completion) -> Result<(), HandlerError> {
        let span = tracing::Span::current();
        // A re-index announces what the first run stored: by now the spool may have lost this
        // generation's files (the lifecycle deletes them once indexed) or hold later
        // generations' files too, which must not be archived under this generation.
        if c.reindex > 0
            && let Recorded::InS3(event) = self.recorded(&c).await?
        {
            return self.announce(&c, &event, "re-index").await;
        }
        // Exactly this generation's instances: an amendment's that reached the spool already
        // wait for their own completion.
        let generation = self.generation(&c).await?;
        let input = match self.read_study(&c, generation).await {
            Ok(input) => input,
            // A late redelivery after the lifecycle cleared the spool.
            Err(e @ (SpoolError::NoStudyDir { .. } | SpoolError::TooFew { .. } | SpoolError::Empty { .. })) => {
                return match self.recorded(&c).await? {
                    Recorded::InS3(event) => self.announce(&c, &event, "spool already cleared").await,
                    Recorded::Nothing => Err(spool_failure(e)),
                    Recorded::Gone { bucket_shown } => Err(HandlerError::permanent(format!(
                        "{e}; the archive recorded for generation {} is not in S3 as recorded (bucket {bucket_shown}), \
                         so it cannot be announced again",
                        c.generation
                    ))),
                };
            }
            Err(e) => return Err(spool_failure(e)),
        };
        span.record("files", input.listing.files.len());
        if input.listing.ignored > 0 {
            tracing::warn!(ignored = input.listing.ignored, "spool entries outside the layout were left out");
        }
        if input.listing.other_generations > 0 {
            tracing::info!(
                other_generations = input.listing.other_generations,
                "instances of another generation in the spool were left for its own archive"
            );
        }
        let placement = self.place(&input.metas)?;
        // "[redacted]" when the bucket template uses a patient variable.
        span.record("bucket", placement.bucket_shown());

        // Hash the files while 7z reads them too: the second read hits the page cache.
        let (hashed, archive) =
            tokio::try_join!(self.hash_files(&input.listing), self.build_archive(&c, &input.listing))?;
        span.record("archive_size", archive.digests.size);

        let annex_key = md5e_key(archive.digests.size, &archive.digests.md5, &archive.name);
        let key = placement.key(&annex_key);
        let outcome =
            self.store.put_archive(&placement, &key, &archive.path, &archive.digests).await.map_err(s3_failure)?;

        let mut event = self.event(&c, &input.metas, Stored { placement, key, annex_key }, &archive, hashed);
        let max_payload = self.bus.client.server_info().max_payload;
        let limit = self.manifest_inline_max.unwrap_or_else(|| manifest::inline_limit(max_payload));
        let offloaded = manifest::offload(&self.bus.js, &mut event, limit)
            .await
            .context("store the manifest in the object store")
            .map_err(HandlerError::Transient)?;
        if offloaded {
            tracing::info!(
                entries = event.manifest_ref.as_ref().map(|r| r.entries),
                "manifest kept in the object store"
            );
        } else {
            // The spool lifecycle reads it back when the study is indexed
            // (`StudyIndexed` names the archive, not its files).
            self.keep_manifest(&event).await?;
        }
        fits_in_a_message(&event, max_payload)?;
        self.record(&event).await?;
        let msg_id = subjects::archive_msg_id(c.study.as_str(), c.generation, &archive.digests.md5, c.reindex);
        self.bus
            .publish(subjects::ARCHIVE_STORED, &event, Some(&msg_id))
            .await
            .context("publish ArchiveStored")
            .map_err(HandlerError::Transient)?;
        tracing::info!(
            uploaded = outcome == PutOutcome::Uploaded,
            archive_size = archive.digests.size,
            annex_key = event.annex_key,
            "archive stored"
        );
        drop(archive); // removes the temp directory
        Ok(())
    }

    /// Keeps `event` (the manifest inline or as a reference) in the object store, so that a
    /// re-index after the spool was cleared can announce the archive again.
    async fn record(&self, event: &pb::ArchiveStored) -> Result<(), HandlerError> {
        let store = self.manifests().await?;
        let name = record_name(&event.study_instance_uid, event.generation);
        store
            .put(name.as_str(), &mut event.encode_to_vec().as_slice())
            .await
            .context("record the archive in the object store")
            .map_err(HandlerError::Transient)?;
        Ok(())
    }

    async fn manifests(&self) -> Result<async_nats::jetstream::object_store::ObjectStore, HandlerError> {
        self.bus
            .js
            .get_object_store(subjects::OBJ_MANIFESTS)
            .await
            .context("open the manifests object store")
            .map_err(HandlerError::Transient)
    }

    /// This generation's recorded `ArchiveStored`, and whether its object is still in S3 as
    /// recorded (same bucket under today's pattern, same size and SHA-256).
    async fn recorded(&self, c: &Completion) -> Result<Recorded, HandlerError> {
        use tokio::io::AsyncReadExt as _;
        let store = self.manifests().await?;
        let name = record_name(c.study.as_str(), c.generation);
        let mut object = match store.get(name.as_str()).await {
            Ok(o) => o,
            Err(e) if e.kind() == async_nats::jetstream::object_store::GetErrorKind::NotFound => {
                return Ok(Recorded::Nothing);
            }
            Err(e) => return Err(HandlerError::Transient(anyhow::Error::new(e).context("read the archive record"))),
        };
        let mut bytes = Vec::new();
        object.read_to_end(&mut bytes).await.context("read the archive record").map_err(HandlerError::Transient)?;
        let event = pb::ArchiveStored::decode(bytes.as_slice())
            .map_err(|e| HandlerError::permanent(format!("archive record {name} does not decode: {e}")))?;
        let (Some(metas), Some(location)) = (event.metas.as_ref(), event.location.as_ref()) else {
            return Err(HandlerError::permanent(format!("archive record {name} has no metas or location")));
        };
        let metas = SessionMetas::from_raw(
            &metas.study_instance_uid,
            &metas.patient_id,
            &metas.patient_name,
            &metas.referring_physician_name,
            &metas.study_date,
            &metas.study_description,
        )
        .map_err(|e| HandlerError::permanent(format!("archive record {name}: {e}")))?;
        let placement = self.place(&metas)?;
        let digests = spool::Digests { size: event.size, md5: event.md5.clone(), sha256: event.sha256.clone() };
        if placement.bucket == location.bucket
            && self.store.is_stored(&placement, &location.key, &digests).await.map_err(s3_failure)?
        {
            Ok(Recorded::InS3(Box::new(event)))
        } else {
            Ok(Recorded::Gone { bucket_shown: placement.bucket_shown().to_owned() })
        }
    }

    /// Publishes a recorded `ArchiveStored` again (under the re-index's id when it is one).
    async fn announce(&self, c: &Completion, event: &pb::ArchiveStored, why: &str) -> Result<(), HandlerError> {
        let msg_id = subjects::archive_msg_id(c.study.as_str(), c.generation, &event.md5, c.reindex);
        self.bus
            .publish(subjects::ARCHIVE_STORED, event, Some(&msg_id))
            .await
            .context("publish ArchiveStored")
            .map_err(HandlerError::Transient)?;
        tracing::info!(
            reindex = c.reindex,
            annex_key = event.annex_key,
            "{why}; the recorded archive is in S3, announced again"
        );
        Ok(())
    }

    /// Puts the inline manifest of `event` into the object store under the
    /// name an offloaded one would have (same bytes either way; idempotent).
    async fn keep_manifest(&self, event: &pb::ArchiveStored) -> Result<(), HandlerError> {
        let bytes = pb::Manifest { entries: event.manifest.clone() }.encode_to_vec();
        let object = manifest::object_name(&event.study_instance_uid, event.generation, &event.md5);
        let store = self.manifests().await?;
        store
            .put(object.as_str(), &mut bytes.as_slice())
            .await
            .context("keep the manifest for the spool lifecycle")
            .map_err(HandlerError::Transient)?;
        Ok(())
    }

    fn event(
        &self,
        c: &Completion,
        metas: &SessionMetas,
        stored: Stored,
        archive: &Archive,
        hashed: Vec<HashedFile>,
    ) -> pb::ArchiveStored {
        let Stored { placement, key, annex_key } = stored;
        pb::ArchiveStored {
            study_instance_uid: c.study.to_string(),
            generation: c.generation,
            metas: Some(metas.to_proto()),
            location: Some(pb::S3Location {
                endpoint_url: self.endpoint_url.clone(),
                region: self.region.clone(),
                bucket: placement.bucket,
                fileprefix: placement.fileprefix,
                key,
                path_style: self.path_style,
                public_url: self.public_url.clone(),
            }),
            archive_name: archive.name.clone(),
            size: archive.digests.size,
            md5: archive.digests.md5.clone(),
            sha256: archive.digests.sha256.clone(),
            annex_key,
            manifest: hashed
                .into_iter()
                .map(|h| pb::ManifestEntry {
                    path: h.file.rel_path,
                    size: h.digests.size,
                    md5: h.digests.md5,
                    sha256: h.digests.sha256,
                    sop_instance_uid: h.file.sop_instance_uid.to_string(),
                    series_instance_uid: h.file.series_instance_uid.to_string(),
                    sop_class_uid: h.sop_class_uid,
                })
                .collect(),
            reason: c.reason.clone(),
            manifest_ref: None,
        }
    }
}

/// What the object store says about a generation's earlier `ArchiveStored`.
enum Recorded {
    /// No record (never archived, or archived before records were kept).
    Nothing,
    /// Recorded, and the object is in S3 as recorded.
    InS3(Box<pb::ArchiveStored>),
    /// Recorded, but the object is not (or no longer) in S3 as recorded.
    Gone {
        /// The bucket as messages may show it.
        bucket_shown: String,
    },
}

/// Object name of the record of a generation's `ArchiveStored` in `bidsflux_v1_manifests`.
fn record_name(study: &str, generation: u32) -> String {
    format!("{study}.{generation}.archive-stored")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_events_are_refused_with_a_reason() {
        let entry = pb::ManifestEntry { path: "1.2/3.4/5.6.dcm".into(), md5: "0".repeat(32), ..Default::default() };
        let event = pb::ArchiveStored { manifest: vec![entry; 1000], ..Default::default() };
        assert!(fits_in_a_message(&event, 1 << 20).is_ok());
        match fits_in_a_message(&event, 16 * 1024) {
            Err(HandlerError::Permanent { kind, reason }) => {
                assert_eq!(kind, pb::FailureKind::Permanent);
                assert!(reason.contains("max_payload") && reason.contains("1000 files"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }
}
