//! One real study through the whole pipeline.
//!
//! Real `nats-server`, an embedded S3 server (s3s-fs), the five services
//! in-process through their `run` functions, DCMTK's `storescu` as the
//! scanner, the local forge, and DataLad (PyPI) as the compatibility oracle:
//! a fresh `datalad clone` + `datalad get` must give back the data set bytes
//! that were sent.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bidsflux_config::Env;
use bidsflux_messaging::{Bus, subjects as s, trace};
use bidsflux_proto::v1 as pb;
use bidsflux_testsupport::dicom::{StudySpec, generate_study};
use bidsflux_testsupport::{NatsServer, S3Server, wait_until};
use common::{decode, messages, run_ok};
use prost::Message as _;

fn trace_id(m: &async_nats::jetstream::Message) -> String {
    let tp = m.headers.as_ref().and_then(|h| h.get("traceparent")).map(|v| v.as_str().to_owned()).unwrap_or_default();
    trace::trace_id_of(&tp).unwrap_or_default().to_owned()
}

fn commit_count(bare: &Path) -> usize {
    run_ok(Command::new("git").arg("-C").arg(bare).args(["rev-list", "--count", "main"])).trim().parse().unwrap()
}

struct World {
    _tmp: tempfile::TempDir,
    nats: NatsServer,
    s3: S3Server,
    forge: PathBuf,
    env: Env,
}

async fn world(quiet: &str) -> World {
    bidsflux_telemetry::init_for_tests();
    let tmp = tempfile::tempdir().unwrap();
    let nats = NatsServer::start().await.unwrap();
    let s3 = S3Server::start().await.unwrap();
    let forge = tmp.path().join("forge");
    let host = format!("127.0.0.1:{}", s3.addr.port());
    let env = Env::from_pairs([
        ("NATS_URL", nats.url.clone()),
        ("BIDSFLUX_SPOOL_DIR", tmp.path().join("spool").display().to_string()),
        ("BIDSFLUX_WORK_DIR", tmp.path().join("work").display().to_string()),
        ("BIDSFLUX_FORGE", "local".into()),
        ("BIDSFLUX_FORGE_DIR", forge.display().to_string()),
        ("BIDSFLUX_AE_TITLE", "BIDSFLUX".into()),
        // The receiver denies unknown callers: storescu's default calling AE title, from loopback.
        ("BIDSFLUX_DICOM_ALLOWLIST", "STORESCU@127.0.0.1=BIDSFLUX".into()),
        ("BIDSFLUX_QUIET_PERIOD", quiet.into()),
        ("S3_URL_PATTERN", format!("s3://{host}/test.{{ReferringPhysicianName}}.{{StudyDescriptionPath[1]}}.dicoms")),
        ("AWS_ENDPOINT_URL", s3.endpoint.clone()),
        // Where datalad (git-annex) reaches the server: the datasets' S3 remote.
        ("BIDSFLUX_S3_PUBLIC_URL", s3.endpoint.clone()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ACCESS_KEY_ID", s3.access_key.clone()),
        ("AWS_SECRET_ACCESS_KEY", s3.secret_key.clone()),
        ("GITLAB_INDEXER_GROUP_TEMPLATE", "{ReferringPhysicianName}/{StudyDescriptionPath[1]}".into()),
        // Small enough that the 40-entry manifest travels through the object store
        // (the uploader's own tests cover inline manifests).
        ("BIDSFLUX_MANIFEST_INLINE_MAX", "1024".into()),
    ]);
    World { _tmp: tmp, nats, s3, forge, env }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_study_travels_from_storescu_to_a_datalad_dataset() {
    let w = world("3s").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut pipeline = bidsflux_dev::Pipeline::start(w.env.clone(), listener).await.unwrap();
    let bus = Bus::connect(&w.nats.url, "e2e", Duration::from_secs(5)).await.unwrap();

    // A synthetic MR study: 2 series x 20 instances, sent by DCMTK.
    let sent_dir = w._tmp.path().join("sent");
    let study =
        generate_study(&sent_dir, &StudySpec { series: 2, instances_per_series: 20, ..Default::default() }).unwrap();
    let out = Command::new("/usr/bin/storescu")
        .env("TCP_NODELAY", "1")
        .args(["-aec", "BIDSFLUX", "127.0.0.1", &port.to_string(), "+sd", "+r"])
        .arg(&sent_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "storescu failed: {}", String::from_utf8_lossy(&out.stderr));

    // Restart study-completion during the quiet period: still exactly one completion.
    let stored = wait_until("40 instances stored", Duration::from_secs(20), || {
        let bus = bus.clone();
        async move {
            let m = messages(&bus, s::STREAM_INSTANCES).await;
            (m.len() == 40).then_some(m)
        }
    })
    .await
    .unwrap();
    pipeline.restart_study_completion().await.unwrap();

    let indexed = wait_until("study indexed", Duration::from_secs(120), || {
        let bus = bus.clone();
        async move {
            let m = messages(&bus, s::STREAM_INDEXED).await;
            (!m.is_empty()).then_some(m)
        }
    })
    .await
    .unwrap();
    let completed: Vec<pb::StudyCompleted> = decode(&messages(&bus, s::STREAM_STUDIES).await);
    assert_eq!(completed.len(), 1, "{completed:?}");
    assert_eq!((completed[0].instance_count, completed[0].series_count), (40, 2));
    let ev = pb::StudyIndexed::decode(indexed[0].payload.as_ref()).unwrap();
    assert_eq!(ev.study_instance_uid, study.study_instance_uid);
    assert_eq!(ev.project_path, format!("Investigator/Study1/sourcedata/dicoms/{}", study.study_instance_uid));

    // One trace from the first stored instance to the study indexed.
    let first_trace = trace_id(&stored[0]);
    assert_eq!(first_trace.len(), 32, "instance stored carries a traceparent");
    assert_eq!(trace_id(&indexed[0]), first_trace, "study indexed is in the study's trace");

    // The archive is in the bucket named from the template (lower-cased for S3).
    let archives: Vec<pb::ArchiveStored> = decode(&messages(&bus, s::STREAM_ARCHIVES).await);
    let loc = archives[0].location.clone().unwrap();
    assert_eq!(loc.bucket, "test.investigator.study1.dicoms");
    assert_eq!(loc.public_url, w.s3.endpoint);
    assert!(w.s3.root().join(&loc.bucket).join(&loc.key).is_file());
    assert!(archives[0].manifest.is_empty(), "manifest should be in the object store");
    assert_eq!(archives[0].manifest_ref.as_ref().map(|r| r.entries), Some(40));

    // DataLad as the oracle: clone from the forge, get everything, compare bytes.
    let bare = w.forge.join(format!("{}.git", ev.project_path));
    assert!(bare.is_dir(), "{} missing", bare.display());
    let clone = w._tmp.path().join("clone");
    common::assert_datalad_gets_every_instance(&bare, &clone, &w.s3.annex_user_env(), &study.files);

    // A redelivered archive stored: handled (acked), no second commit, nothing dead-lettered.
    let commits = commit_count(&bare);
    bus.publish(s::ARCHIVE_STORED, &archives[0], Some("e2e-redelivery")).await.unwrap();
    wait_until("redelivery handled", Duration::from_secs(60), || {
        let bus = bus.clone();
        async move {
            let st = bus.js.get_stream(s::STREAM_ARCHIVES).await.ok()?;
            let info = st.consumer_info(s::CONSUMER_INDEXER).await.ok()?;
            (info.ack_floor.stream_sequence >= 2 && info.num_ack_pending == 0).then_some(())
        }
    })
    .await
    .unwrap();
    assert_eq!(commit_count(&bare), commits, "redelivery made a new commit");
    // The group's layout: the session, the study superdataset listing it at the
    // PatientName (Doe^Jane), the BIDS dataset and the derivatives and qc groups.
    let group = w.forge.join("Investigator/Study1");
    let mut dicoms: Vec<String> = group
        .join("sourcedata/dicoms")
        .read_dir()
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    dicoms.sort();
    assert_eq!(dicoms, [format!("{}.git", ev.study_instance_uid), "study.git".to_owned()]);
    for dir in ["bids.git", "derivatives", "qc"] {
        assert!(group.join(dir).is_dir(), "{dir} missing from the group");
    }
    let superdataset = group.join("sourcedata/dicoms/study.git");
    let out = std::process::Command::new("git")
        .arg("--git-dir")
        .arg(&superdataset)
        .args(["rev-parse", "main:Doe/Jane"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), ev.commit, "the superdataset records the session");
    assert!(messages(&bus, s::STREAM_DEADLETTER).await.is_empty(), "something was dead-lettered");

    assert!(pipeline.finished().is_empty(), "a service stopped: {:?}", pipeline.finished());
    pipeline.stop().await.unwrap();
}
