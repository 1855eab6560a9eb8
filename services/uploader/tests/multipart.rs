//! Multipart uploads against real servers: nats-server, an embedded S3
//! (s3s-fs) stopped and restarted mid-upload, and 7z.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt as _;
use std::time::{Duration, Instant};

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use bidsflux_messaging::subjects;
use bidsflux_proto::v1 as pb;
use bidsflux_testsupport::dicom::StudySpec;
use bidsflux_testsupport::{S3Server, wait_until};
use common::{Harness, snapshot, spool_study, spool_study_sized};
use sha2::{Digest as _, Sha256};

/// A short bucket and no extra prefix: s3s-fs names the metadata file of a
/// multipart upload `.bucket-<base64 bucket>.object-<base64 key>.upload-<uuid>.metadata.json`,
/// which with the deployed pattern's ~110-character keys passes the 255-byte
/// file name limit (CreateMultipartUpload then fails with InternalError).
/// Real S3 servers have no such limit; the key layout is the same.
const PATTERN: &str = "s3://{host}/{StudyDescriptionPath[1]}";
const BUCKET: &str = "study1";
const MIB: u64 = 1 << 20;

/// An SDK client for the test server, to look at objects as any S3 client would.
fn client(s3: &S3Server) -> aws_sdk_s3::Client {
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(&s3.endpoint)
        .credentials_provider(Credentials::new(&s3.access_key, &s3.secret_key, None, None, "test"))
        .force_path_style(true)
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

/// `(upload id, part number)` of each UploadPart request in `log`.
fn part_requests(log: &[String]) -> Vec<(String, u32)> {
    log.iter()
        .filter(|l| l.starts_with("PUT ") && l.contains("partNumber="))
        .map(|l| {
            let query = l.split_once('?').map(|(_, q)| q).unwrap_or("");
            let get = |k: &str| {
                query.split('&').find_map(|kv| kv.strip_prefix(k).and_then(|v| v.strip_prefix('='))).unwrap_or("")
            };
            (get("uploadId").to_owned(), get("partNumber").parse().unwrap())
        })
        .collect()
}

/// Regular files under `dir` (objects of a bucket: s3s-fs keeps its metadata elsewhere).
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() { stack.push(p) } else { out.push(p) }
        }
    }
    out
}

fn sha256_file(path: &std::path::Path) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).unwrap();
    hex::encode(h.finalize())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_archive_survives_an_s3_outage_mid_upload() {
    let mut h = Harness::start().await;
    // 2 × 106 instances of 512×512 16-bit pixels: ~106 MiB, stored as is by -mx0.
    let spec = StudySpec { series: 2, instances_per_series: 106, rows: 512, columns: 512, ..StudySpec::default() };
    let study = spool_study_sized(h.spool.path(), &spec);
    let env = h
        .env(PATTERN)
        .with("BIDSFLUX_7Z_LEVEL", "0")
        .with("BIDSFLUX_S3_PART_SIZE", "8MiB")
        .with("BIDSFLUX_S3_UPLOAD_CONCURRENCY", "4");
    h.run_uploader(&env).await;
    // Slow parts down so the stop lands mid-upload, whatever the machine's speed.
    h.s3.delay_parts(Duration::from_millis(400));
    let started = Instant::now();
    h.complete(&study, 212, "completed:test:large").await;

    // Stop the server once five parts were sent, long before the upload completes.
    let first = h.s3.root().to_path_buf();
    let s3 = &h.s3;
    wait_until("five parts sent", Duration::from_secs(180), || async {
        (part_requests(&s3.requests()).len() >= 5).then_some(())
    })
    .await
    .unwrap();
    let (addr, root) = (h.s3.addr, first);
    let stored_before = h.s3.pending_uploads().iter().filter(|n| n.contains(".part-")).count();
    h.s3.stop();
    let stopped_at = started.elapsed();
    let bucket_dir = root.join(BUCKET);
    assert!(!bucket_dir.exists() || files_under(&bucket_dir).is_empty(), "the upload finished before the outage");
    tokio::time::sleep(Duration::from_secs(10)).await;
    let back = S3Server::start_at(&root, &addr.to_string(), &h.s3.access_key, &h.s3.secret_key).await.unwrap();

    let bus = h.bus.clone();
    wait_until("ArchiveStored", Duration::from_secs(240), || {
        let bus = bus.clone();
        async move {
            let mut st = bus.js.get_stream(subjects::STREAM_ARCHIVES).await.ok()?;
            (st.info().await.ok()?.state.messages >= 1).then_some(())
        }
    })
    .await
    .unwrap();
    let elapsed = started.elapsed();
    let ev: pb::ArchiveStored = h.read(subjects::STREAM_ARCHIVES, subjects::ARCHIVE_STORED, 1).await.remove(0);
    assert!(ev.size > 100 * MIB, "archive of {} bytes is not > 100 MiB", ev.size);
    let parts = ev.size.div_ceil(8 * MIB) as usize;

    // One object, where git-annex looks, with the announced bytes.
    let loc = ev.location.clone().unwrap();
    assert_eq!(loc.key, format!("{}/MD5E-s{}--{}.7z", study.uid, ev.size, ev.md5));
    let objects = files_under(&bucket_dir);
    assert_eq!(objects, vec![bucket_dir.join(&loc.key)], "exactly one object in the bucket");
    assert_eq!(std::fs::metadata(&objects[0]).unwrap().len(), ev.size);
    assert_eq!(sha256_file(&objects[0]), ev.sha256, "stored bytes differ from the archive");

    // As any S3 client sees it: a multipart object with the archive's SHA-256 as metadata.
    let head = client(&back).head_object().bucket(&loc.bucket).key(&loc.key).send().await.unwrap();
    assert_eq!(head.content_length(), Some(ev.size as i64));
    assert_eq!(head.metadata().and_then(|m| m.get("sha256")), Some(&ev.sha256));
    let etag = head.e_tag().unwrap().trim_matches('"').to_owned();
    assert!(etag.ends_with(&format!("-{parts}")), "ETag {etag} for {parts} parts");

    // Parts were retried inside the same upload after the restart; nothing is left over.
    let (before, after) = (part_requests(&h.s3.requests()), part_requests(&back.requests()));
    let uploads: BTreeSet<_> = before.iter().chain(&after).map(|(id, _)| id.clone()).collect();
    assert_eq!(uploads.len(), 1, "one multipart upload, resumed after the outage: {uploads:?}");
    let numbers: BTreeSet<u32> = before.iter().chain(&after).map(|(_, n)| *n).collect();
    assert_eq!(numbers, (1..=parts as u32).collect(), "every part sent");
    assert!(!after.is_empty(), "no part was sent after the restart");
    assert_eq!(back.pending_uploads(), Vec::<String>::new(), "multipart leftovers on the server");
    h.wait_handled(1).await;
    assert_eq!(h.count(subjects::STREAM_DEADLETTER).await, 0);
    assert_eq!(h.work_leftovers(), Vec::<std::path::PathBuf>::new());
    eprintln!(
        "multipart outage: archive {} bytes ({:.1} MiB), {parts} parts of 8 MiB, {} parts stored before the stop at \
         {:.1} s, UploadPart requests {} before + {} after the restart ({} resent), done in {:.1} s",
        ev.size,
        ev.size as f64 / MIB as f64,
        stored_before,
        stopped_at.as_secs_f64(),
        before.len(),
        after.len(),
        before.len() + after.len() - parts,
        elapsed.as_secs_f64()
    );
    h.stop().await;
}

#[tokio::test]
async fn a_redelivered_completion_does_not_upload_a_multipart_archive_again() {
    let mut h = Harness::start().await;
    // 2 × 50 instances of 256×256: ~12.5 MiB, three parts of 5 MiB.
    let spec = StudySpec { series: 2, instances_per_series: 50, rows: 256, columns: 256, ..StudySpec::default() };
    let study = spool_study_sized(h.spool.path(), &spec);
    let env = h.env(PATTERN).with("BIDSFLUX_7Z_LEVEL", "0").with("BIDSFLUX_S3_PART_SIZE", "5MiB");
    h.run_uploader(&env).await;
    h.complete(&study, 100, "completed:test:mp").await;
    let ev: pb::ArchiveStored = h.read(subjects::STREAM_ARCHIVES, subjects::ARCHIVE_STORED, 1).await.remove(0);
    h.wait_handled(1).await;
    let parts = ev.size.div_ceil(5 * MIB) as usize;
    assert!(parts >= 3, "{} bytes", ev.size);
    let first = h.s3.requests();
    assert_eq!(part_requests(&first).len(), parts, "{first:#?}");

    let loc = ev.location.clone().unwrap();
    let object = h.s3.root().join(&loc.bucket).join(&loc.key);
    let meta = std::fs::metadata(&object).unwrap();
    let (ino, mtime) = (meta.ino(), meta.modified().unwrap());

    // The same completion again (a new message id, as after a replay).
    h.complete(&study, 100, "completed:test:mp:again").await;
    h.wait_handled(2).await;
    let meta = std::fs::metadata(&object).unwrap();
    assert_eq!((meta.ino(), meta.modified().unwrap()), (ino, mtime), "object was rewritten");
    let later: Vec<String> = h.s3.requests().split_off(first.len());
    assert!(later.iter().all(|r| r.starts_with("HEAD ")), "the redelivery wrote to S3: {later:?}");
    assert!(!later.is_empty(), "the redelivery did not look at S3");
    // Announced again (same message id: the stream may de-duplicate it).
    let n = h.count(subjects::STREAM_ARCHIVES).await as usize;
    assert!((1..=2).contains(&n), "{n} ArchiveStored");
    for again in h.read::<pb::ArchiveStored>(subjects::STREAM_ARCHIVES, subjects::ARCHIVE_STORED, n).await {
        assert_eq!((again.sha256, again.location), (ev.sha256.clone(), ev.location.clone()));
    }
    assert_eq!(h.count(subjects::STREAM_DEADLETTER).await, 0);
    assert_eq!(h.s3.pending_uploads(), Vec::<String>::new());
    h.stop().await;
}

#[tokio::test]
async fn an_unknown_access_key_is_dead_lettered_with_a_clear_reason_and_the_spool_kept() {
    let mut h = Harness::start().await;
    let study = spool_study(h.spool.path(), StudySpec::default());
    let before = snapshot(h.spool.path());
    let env = h.env(PATTERN).with("AWS_ACCESS_KEY_ID", "not-the-key");
    h.run_uploader(&env).await;
    h.complete(&study, 10, "completed:test:key").await;

    let dl: pb::DeadLetter = h.read(subjects::STREAM_DEADLETTER, &subjects::deadletter("uploader"), 1).await.remove(0);
    assert_eq!(dl.kind(), pb::FailureKind::Permanent);
    assert_eq!(dl.study_instance_uid, study.uid);
    assert!(dl.reason.contains("check the credentials") && dl.reason.contains("403"), "{}", dl.reason);
    assert!(!dl.reason.contains("not-the-key"), "credential in the reason: {}", dl.reason);
    h.wait_handled(1).await;
    assert_eq!(h.count(subjects::STREAM_ARCHIVES).await, 0);
    assert_eq!(snapshot(h.spool.path()), before, "spool changed");
    assert_eq!(h.work_leftovers(), Vec::<std::path::PathBuf>::new());
    assert_eq!(h.s3.pending_uploads(), Vec::<String>::new());
    h.stop().await;
}
