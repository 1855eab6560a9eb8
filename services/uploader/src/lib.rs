//! The uploader: completed studies from the spool to S3.
//!
//! For each `StudyCompleted` (durable consumer `uploader` on
//! `BIDSFLUX_V1_STUDIES`):
//!
//! 1. [`completion`]: the event is validated (UIDs are safe path components);
//! 2. [`spool`]: the study's files of this generation (named as
//!    [`bidsflux_session::SpoolPath`] says; the generation's instances are the
//!    ones study-completion's state counts as its own, [`generation`]) are
//!    listed in sorted order, the session metas read from the first
//!    one, and every file hashed (MD5, SHA-256) for the manifest — the spool
//!    is only read, never changed;
//! 3. [`archive`]: `<study>.7z` is written in a fresh temp directory of the
//!    work dir, one file per block, the files compressed in parallel
//!    (LZMA2, liblzma) — reproducible: no timestamps, sorted names;
//! 4. [`s3`]: the archive is stored in the bucket the `S3_URL_PATTERN`
//!    gives for the study, at `<fileprefix><MD5E annex key>` where git-annex's
//!    S3 remote will look for it — one PutObject, or a parallel [`multipart`]
//!    upload above `BIDSFLUX_S3_PART_SIZE` — and verified by HEAD (size,
//!    `x-amz-meta-sha256`, ETag); an identical object already there is kept;
//!    [`s3_error`] sorts S3 failures into retryable and refused;
//! 5. `ArchiveStored` is published with the location, hashes and manifest,
//!    de-duplicated by `archive:<study>:<generation>:<md5>`, and the temp
//!    archive is removed.
//!
//! Spool [`lifecycle`] (durable consumers `uploader-lifecycle` on
//! `StudyIndexed` and `StudyDiscarded`): the files of an indexed generation's
//! manifest, or of a discarded study, are deleted — never with
//! `BIDSFLUX_SPOOL_KEEP=true`. The [`janitor`] reports studies left in the
//! spool longer than `BIDSFLUX_SPOOL_STALE_AFTER` (log + gauges on `/metrics`,
//! from [`metrics`], which counts the plain values of [`report`]).
//!
//! Failures that retries can fix (network, S3 5xx, disk) are retried by the
//! consumer; refused credentials, a study the templates cannot place, or a
//! spool that does not hold the study are dead-lettered with a reason that
//! names UIDs and templates, never patient values. Settings come from the
//! environment ([`config`]).

pub mod archive;
pub mod completion;
pub mod config;
pub mod generation;
pub mod janitor;
pub mod lifecycle;
pub mod metrics;
pub mod multipart;
pub mod report;
pub mod s3;
pub mod s3_error;
pub mod spool;

mod handler;

use std::sync::Arc;

use anyhow::Context as _;
use bidsflux_messaging::topology::Requirement;
use bidsflux_messaging::{Bus, ConsumerOptions, Delivery, run_consumer, subjects};
use bidsflux_proto::v1 as pb;
use bidsflux_service::tasks::SHUTDOWN_GRACE;
use bidsflux_service::{Tasks, WorkDir, listen};
use prost::Message as _;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use handler::Uploader;
pub use janitor::Janitor;
pub use lifecycle::Lifecycle;
pub use metrics::Metrics;

/// The JetStream objects the uploader needs.
pub const REQUIRES: &[Requirement] = &[
    Requirement::Consumer { stream: subjects::STREAM_STUDIES, name: subjects::CONSUMER_UPLOADER },
    Requirement::Consumer { stream: subjects::STREAM_STUDIES, name: subjects::CONSUMER_UPLOADER_LIFECYCLE },
    Requirement::Consumer { stream: subjects::STREAM_INDEXED, name: subjects::CONSUMER_UPLOADER_LIFECYCLE },
    Requirement::Stream(subjects::STREAM_ARCHIVES),
    Requirement::Stream(subjects::STREAM_DEADLETTER),
    Requirement::ObjectStore(subjects::OBJ_MANIFESTS),
    // Which instances a generation has (study-completion's state), read only.
    Requirement::KeyValue(subjects::KV_STUDIES),
];

/// The study UID of a delivery, for dead letters.
fn study_of(d: &Delivery) -> Option<String> {
    let m = pb::StudyCompleted::decode(d.payload.as_ref()).ok()?;
    bidsflux_session::Uid::parse("StudyInstanceUID", &m.study_instance_uid).ok().map(|u| u.to_string())
}

/// The study UID of a `StudyIndexed` delivery, for dead letters.
fn indexed_study_of(d: &Delivery) -> Option<String> {
    let m = pb::StudyIndexed::decode(d.payload.as_ref()).ok()?;
    bidsflux_session::Uid::parse("StudyInstanceUID", &m.study_instance_uid).ok().map(|u| u.to_string())
}

/// The study UID of a `StudyDiscarded` delivery, for dead letters.
fn discarded_study_of(d: &Delivery) -> Option<String> {
    let m = pb::StudyDiscarded::decode(d.payload.as_ref()).ok()?;
    bidsflux_session::Uid::parse("StudyInstanceUID", &m.study_instance_uid).ok().map(|u| u.to_string())
}

/// Runs the spool lifecycle (both consumers) and the janitor until `shutdown`.
pub async fn run_lifecycle(
    config: &Config,
    bus: Bus,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let lifecycle = Arc::new(Lifecycle {
        bus: bus.clone(),
        spool_dir: config.spool_dir.clone(),
        keep: config.spool_keep,
        delete_discarded: config.spool_delete_discarded,
        metrics: metrics.clone(),
    });
    let janitor = Janitor {
        spool_dir: config.spool_dir.clone(),
        stale_after: config.stale_after,
        empty_dir_age: config.empty_dir_age,
        keep: config.spool_keep,
    };
    tracing::info!(
        keep = config.spool_keep,
        janitor_interval_s = config.janitor_interval.as_secs(),
        stale_after_s = config.stale_after.as_secs(),
        "spool lifecycle ready"
    );
    let tasks = Tasks::new(&shutdown);
    let janitor = janitor.run(config.janitor_interval, metrics, tasks.shutdown().clone());
    tasks.spawn("spool janitor", async move {
        janitor.await;
        Ok(())
    });
    let sweep = lifecycle.clone().run_resend_sweep(config.janitor_interval, tasks.shutdown().clone());
    tasks.spawn("spool resend sweep", async move {
        sweep.await;
        Ok(())
    });
    let l = lifecycle.clone();
    let indexed = run_consumer(
        bus.clone(),
        ConsumerOptions::new(subjects::STREAM_INDEXED, subjects::CONSUMER_UPLOADER_LIFECYCLE),
        shutdown.clone(),
        indexed_study_of,
        move |d| l.clone().handle_indexed(d),
    );
    let discarded = run_consumer(
        bus,
        ConsumerOptions::new(subjects::STREAM_STUDIES, subjects::CONSUMER_UPLOADER_LIFECYCLE),
        shutdown,
        discarded_study_of,
        move |d| lifecycle.clone().handle_discarded(d),
    );
    let result = tokio::try_join!(indexed, discarded).map(|_| ());
    tasks.stop(SHUTDOWN_GRACE).await;
    result
}

/// Consumes `StudyCompleted` (and runs the spool lifecycle, the janitor and
/// `/metrics`) until `shutdown` is cancelled.
///
/// Fails at start when the 7-Zip program cannot be run, the work directory
/// cannot be created or the HTTP address cannot be bound.
pub async fn run(config: Config, bus: Bus, shutdown: CancellationToken) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let tasks = Tasks::new(&shutdown);
    let listener = listen::bind_optional(config.http_bind, config::HTTP_BIND_VAR).await?;
    bidsflux_service::http::spawn(&tasks, listener, Arc::new(bus.clone()), metrics.clone());
    // This process's own scratch directory; what a killed predecessor left is removed.
    let work = WorkDir::claim_at_start(&config.work_dir, "uploader")?;
    let mut config = config;
    config.work_dir = work.path().to_owned();
    let studies = bus.js.get_key_value(subjects::KV_STUDIES).await.context("open the studies KV bucket")?;
    let uploader = Arc::new(Uploader::new(&config, bus.clone(), studies));
    if !config.spool_dir.is_dir() {
        tracing::warn!(spool = %config.spool_dir.display(), "spool directory does not exist yet");
    }
    tracing::info!(
        spool = %config.spool_dir.display(),
        work = %config.work_dir.display(),
        endpoint = config.endpoint_url,
        "uploader ready"
    );
    let opts = ConsumerOptions {
        concurrency: config.concurrency,
        // Archives take minutes: hold only those being made.
        pull_batch: config.concurrency,
        ..ConsumerOptions::new(subjects::STREAM_STUDIES, subjects::CONSUMER_UPLOADER)
    };
    let lifecycle = run_lifecycle(&config, bus.clone(), metrics, shutdown.clone());
    let uploads = run_consumer(bus, opts, shutdown, study_of, move |d| uploader.clone().handle(d));
    let result = tokio::try_join!(uploads, lifecycle).map(|_| ());
    tasks.stop(SHUTDOWN_GRACE).await;
    result
}
