//! Spool lifecycle against a real nats-server and real files: what an indexed
//! or discarded study deletes, what it keeps, and what the janitor reports.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bidsflux_config::Env;
use bidsflux_messaging::{Bus, manifest, subjects};
use bidsflux_proto::v1 as pb;
use bidsflux_testsupport::{NatsServer, wait_until};
use bidsflux_uploader::{Config, Janitor, Metrics, run_lifecycle};
use prost::Message as _;
use sha2::{Digest as _, Sha256};
use tokio_util::sync::CancellationToken;

const STUDY: &str = "1.2.826.0.1.3680043.99.1";
const MD5: &str = "0123456789abcdef0123456789abcdef";

struct Setup {
    _nats: NatsServer,
    bus: Bus,
    spool: tempfile::TempDir,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start(keep: bool) -> Setup {
    start_with(keep, true).await
}

async fn start_with(keep: bool, delete_discarded: bool) -> Setup {
    bidsflux_telemetry::init_for_tests();
    let nats = NatsServer::start().await.unwrap();
    let bus = Bus::connect(&nats.url, "uploader", Duration::from_secs(10)).await.unwrap();
    bidsflux_messaging::topology::declare(&bus.js).await.unwrap();
    let spool = tempfile::tempdir().unwrap();
    let env = Env::from_pairs([
        ("S3_URL_PATTERN", "s3://s3.example.org/b.{ReferringPhysicianName}"),
        ("AWS_ACCESS_KEY_ID", "id"),
        ("AWS_SECRET_ACCESS_KEY", "secret"),
        ("BIDSFLUX_SPOOL_DIR", &spool.path().display().to_string()),
        ("BIDSFLUX_SPOOL_KEEP", if keep { "true" } else { "false" }),
        ("BIDSFLUX_SPOOL_DELETE_DISCARDED", if delete_discarded { "true" } else { "false" }),
        ("BIDSFLUX_SPOOL_JANITOR_INTERVAL", "1s"),
    ]);
    let config = Config::from_env(&env).unwrap();
    let metrics = Arc::new(Metrics::default());
    let shutdown = CancellationToken::new();
    let (b, m, s) = (bus.clone(), metrics.clone(), shutdown.clone());
    tokio::spawn(async move { run_lifecycle(&config, b, m, s).await.unwrap() });
    Setup { _nats: nats, bus, spool, metrics, shutdown }
}

fn write(spool: &Path, rel: &str, bytes: &[u8]) -> PathBuf {
    let p = spool.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, bytes).unwrap();
    p
}

fn entry(rel: &str, bytes: &[u8]) -> pb::ManifestEntry {
    pb::ManifestEntry {
        path: rel.to_owned(),
        size: bytes.len() as u64,
        sha256: hex::encode(Sha256::digest(bytes)),
        ..Default::default()
    }
}

async fn put_manifest(bus: &Bus, generation: u32, entries: Vec<pb::ManifestEntry>) {
    let store = bus.js.get_object_store(subjects::OBJ_MANIFESTS).await.unwrap();
    let bytes = pb::Manifest { entries }.encode_to_vec();
    store.put(manifest::object_name(STUDY, generation, MD5).as_str(), &mut bytes.as_slice()).await.unwrap();
}

async fn publish_indexed(bus: &Bus, generation: u32, n: u32) {
    let ev = pb::StudyIndexed {
        study_instance_uid: STUDY.to_owned(),
        generation,
        archive_annex_key: format!("MD5E-s100--{MD5}.7z"),
        ..Default::default()
    };
    // A new id per publication: a redelivery as the server would make it.
    let id = format!("{}:{n}", subjects::indexed_msg_id(STUDY, generation));
    bus.publish(subjects::STUDY_INDEXED, &ev, Some(&id)).await.unwrap();
}

/// Waits until the lifecycle consumer has acked everything on `stream`.
async fn settled(bus: &Bus, stream: &str) {
    wait_until("lifecycle consumer settled", Duration::from_secs(20), || async {
        let mut st = bus.js.get_stream(stream).await.ok()?;
        let last = st.info().await.ok()?.state.last_sequence;
        let mut c: async_nats::jetstream::consumer::PullConsumer =
            st.get_consumer(subjects::CONSUMER_UPLOADER_LIFECYCLE).await.ok()?;
        let info = c.info().await.ok()?;
        let done = info.num_pending == 0 && info.num_ack_pending == 0 && info.ack_floor.stream_sequence >= last;
        (last > 0 && done).then_some(())
    })
    .await
    .unwrap();
}

const A: &str = "1.2.826.0.1.3680043.99.1/1.1/1.1.1.dcm";
const B: &str = "1.2.826.0.1.3680043.99.1/1.1/1.1.2.dcm";
const C: &str = "1.2.826.0.1.3680043.99.1/1.2/1.2.1.dcm";
const LATE: &str = "1.2.826.0.1.3680043.99.1/1.2/1.2.9.dcm";

/// Indexed → exactly the manifest's matching files go; a late file of the next
/// generation and a different file under a manifest name stay; a redelivery
/// changes nothing.
#[tokio::test]
async fn indexed_deletes_exactly_the_manifest_files_and_redelivery_is_a_no_op() {
    let s = start(false).await;
    let root = s.spool.path();
    let (a, b) = (write(root, A, b"aaaa"), write(root, B, b"bbbb"));
    let c = write(root, C, b"different now");
    let late = write(root, LATE, b"late instance of generation 1");
    put_manifest(&s.bus, 0, vec![entry(A, b"aaaa"), entry(B, b"bbbb"), entry(C, b"cccc")]).await;

    publish_indexed(&s.bus, 0, 1).await;
    settled(&s.bus, subjects::STREAM_INDEXED).await;
    assert!(!a.exists() && !b.exists(), "manifest files deleted");
    assert_eq!(std::fs::read(&c).unwrap(), b"different now", "a different file under a manifest name is kept");
    assert!(late.exists(), "a file of a later generation is kept");
    assert_eq!(s.metrics.deleted_files(), 2);
    assert!(root.join("1.2.826.0.1.3680043.99.1/1.1").is_dir(), "directories are left to the janitor");

    publish_indexed(&s.bus, 0, 2).await;
    settled(&s.bus, subjects::STREAM_INDEXED).await;
    assert!(c.exists() && late.exists());
    assert_eq!(s.metrics.deleted_files(), 2, "a redelivery deletes nothing more");
}

/// A study resent after it was indexed: the copies identical to what the indexed generation
/// archived are swept away; a resent instance that differs and a new one stay.
#[tokio::test]
async fn a_resend_after_indexing_is_swept_keeping_what_differs() {
    let s = start(false).await;
    let root = s.spool.path();
    write(root, A, b"aaaa");
    write(root, B, b"bbbb");
    put_manifest(&s.bus, 0, vec![entry(A, b"aaaa"), entry(B, b"bbbb")]).await;
    publish_indexed(&s.bus, 0, 1).await;
    settled(&s.bus, subjects::STREAM_INDEXED).await;
    assert!(!root.join(A).exists() && !root.join(B).exists());
    // The scanner sends the study again: A as it was, B changed, and a new instance.
    let (a, b, late) = (write(root, A, b"aaaa"), write(root, B, b"b changed"), write(root, LATE, b"new"));
    wait_until("the resent copy swept", Duration::from_secs(20), || {
        let gone = !a.exists();
        async move { gone.then_some(()) }
    })
    .await
    .unwrap();
    // Another pass or two changes nothing more.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(std::fs::read(&b).unwrap(), b"b changed", "a resent instance that differs stays");
    assert!(late.exists(), "a new instance stays for its generation");
    assert_eq!(s.metrics.deleted_files(), 3);
}

/// `BIDSFLUX_SPOOL_KEEP=true`: neither indexed nor discarded deletes anything.
#[tokio::test]
async fn keep_deletes_nothing() {
    let s = start(true).await;
    let root = s.spool.path();
    let a = write(root, A, b"aaaa");
    put_manifest(&s.bus, 0, vec![entry(A, b"aaaa")]).await;
    publish_indexed(&s.bus, 0, 1).await;
    publish_discarded(&s.bus, 0).await;
    settled(&s.bus, subjects::STREAM_INDEXED).await;
    settled(&s.bus, subjects::STREAM_STUDIES).await;
    assert!(a.exists());
    assert_eq!(s.metrics.deleted_files(), 0);
    assert!(s.metrics.render().contains("bidsflux_uploader_spool_kept_by_config_files_total 2"));
}

async fn publish_discarded(bus: &Bus, generation: u32) {
    let ev = pb::StudyDiscarded {
        study_instance_uid: STUDY.to_owned(),
        generation,
        spool_study_dir: STUDY.to_owned(),
        discarded_at_unix_ms: bidsflux_messaging::now_unix_ms(),
        ..Default::default()
    };
    bus.publish(subjects::STUDY_DISCARDED, &ev, Some(&subjects::discarded_msg_id(STUDY, generation))).await.unwrap();
}

/// Discarded → the study's files written before the discard are deleted,
/// conflict files and files written after it are kept.
#[tokio::test]
async fn discarded_deletes_the_study_files() {
    let s = start(false).await;
    let root = s.spool.path();
    let (a, c) = (write(root, A, b"aaaa"), write(root, C, b"cccc"));
    let conflict = write(root, &format!("{A}.conflict-abcd"), b"other");
    let newer = write(root, LATE, b"after the discard");
    let future = SystemTime::now() + Duration::from_secs(3600);
    std::fs::File::options().write(true).open(&newer).unwrap().set_modified(future).unwrap();
    publish_discarded(&s.bus, 0).await;
    settled(&s.bus, subjects::STREAM_STUDIES).await;
    assert!(!a.exists() && !c.exists());
    assert!(conflict.exists() && newer.exists());
    assert_eq!(s.metrics.deleted_files(), 2);
}

/// By default a discarded study's files stay (the event does not say which generation they are).
#[tokio::test]
async fn discarded_studies_are_kept_by_default() {
    let s = start_with(false, false).await;
    let a = write(s.spool.path(), A, b"aaaa");
    publish_discarded(&s.bus, 0).await;
    settled(&s.bus, subjects::STREAM_STUDIES).await;
    assert!(a.exists());
    assert_eq!(s.metrics.deleted_files(), 0);
}

/// The janitor reports a study older than the threshold and deletes nothing.
#[tokio::test]
async fn janitor_reports_a_stale_study_and_keeps_it() {
    let spool = tempfile::tempdir().unwrap();
    let a = write(spool.path(), A, b"aaaa");
    let old = SystemTime::now() - Duration::from_secs(48 * 3600);
    std::fs::File::options().write(true).open(&a).unwrap().set_modified(old).unwrap();
    write(spool.path(), ".journal/seg-1", b"journal");
    let metrics = Arc::new(Metrics::default());
    let shutdown = CancellationToken::new();
    let janitor = Janitor {
        spool_dir: spool.path().to_path_buf(),
        stale_after: Duration::from_secs(24 * 3600),
        empty_dir_age: Duration::from_secs(600),
        keep: false,
    };
    let task = tokio::spawn(janitor.run(Duration::from_millis(50), metrics.clone(), shutdown.clone()));
    wait_until("janitor pass", Duration::from_secs(10), || async { (metrics.stale_studies() == 1).then_some(()) })
        .await
        .unwrap();
    shutdown.cancel();
    task.await.unwrap();
    assert_eq!(metrics.stale_files(), 1);
    let text = metrics.render();
    assert!(text.contains("bidsflux_uploader_spool_stale_studies 1"), "{text}");
    assert!(!text.contains(STUDY), "no UIDs in metrics");
    assert!(a.exists() && spool.path().join(".journal/seg-1").exists());
}
