//! Each generation of a study archives exactly its own instances, whatever else the spool holds:
//! an amendment's instances that reach the spool before the first generation is archived stay
//! out of its archive, survive the lifecycle's deletion of the indexed generation, and make the
//! amendment's archive. Against real nats-server, S3 server and files.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use bidsflux_messaging::{manifest, subjects};
use bidsflux_proto::v1 as pb;
use bidsflux_session::instance_fingerprint;
use bidsflux_testsupport::dicom::StudySpec;
use bidsflux_testsupport::wait_until;
use common::{Harness, spool_study};
use prost::Message as _;

const PATTERN: &str = "s3://{host}/test.{ReferringPhysicianName}.{StudyDescriptionPath[1]}.dicoms/sourcedata";

/// The SOP Instance UID of a spool path `<study>/<series>/<sop>.dcm`.
fn sop(rel: &str) -> &str {
    rel.rsplit('/').next().unwrap().trim_end_matches(".dcm")
}

/// The manifest paths of `ev`, sorted.
async fn manifest_paths(h: &Harness, ev: &pb::ArchiveStored) -> Vec<String> {
    let mut ev = ev.clone();
    manifest::resolve(&h.bus.js, &mut ev).await.unwrap();
    let mut paths: Vec<String> = ev.manifest.iter().map(|m| m.path.clone()).collect();
    paths.sort();
    paths
}

#[tokio::test]
async fn an_amendment_in_the_spool_early_is_neither_archived_nor_deleted_with_the_first_generation() {
    let mut h = Harness::start().await;
    // Ten instances in the spool: the first seven are generation 0; the last three arrived
    // after its completion (an amendment) but before the uploader got to it.
    let study = spool_study(h.spool.path(), StudySpec::default());
    let (first, late) = study.rel_paths.split_at(7);
    // Study-completion's state, as it is once the amendment's instances were counted.
    let state = pb::StudyState {
        study_instance_uid: study.uid.clone(),
        generation: 1,
        instance_hashes: study.rel_paths.iter().map(|p| instance_fingerprint(sop(p))).collect(),
        ..Default::default()
    };
    let kv = h.bus.js.get_key_value(subjects::KV_STUDIES).await.unwrap();
    kv.put(&study.uid, state.encode_to_vec().into()).await.unwrap();
    h.run_uploader(&h.env(PATTERN)).await;
    let completed = |generation: u32, instance_count: u64, generation_instance_count: u64| pb::StudyCompleted {
        study_instance_uid: study.uid.clone(),
        generation,
        reason: Some(pb::CompletionReason {
            rule: "default".into(),
            criterion: pb::CompletionCriterion::QuietPeriod.into(),
            detail: "quiet 1s".into(),
        }),
        series_count: 2,
        instance_count,
        spool_study_dir: study.uid.clone(),
        generation_series_count: 2,
        generation_instance_count,
        ..Default::default()
    };

    // Generation 0: exactly its seven.
    let msg = completed(0, 7, 7);
    h.bus.publish(subjects::STUDY_COMPLETED, &msg, Some(&subjects::completed_msg_id(&study.uid, 0))).await.unwrap();
    let g0: pb::ArchiveStored = h.read(subjects::STREAM_ARCHIVES, subjects::ARCHIVE_STORED, 1).await.remove(0);
    assert_eq!(g0.generation, 0);
    assert_eq!(manifest_paths(&h, &g0).await, first, "generation 0's archive holds its own instances only");

    // Indexed: the lifecycle deletes generation 0's files, and only those.
    let indexed = pb::StudyIndexed {
        study_instance_uid: study.uid.clone(),
        generation: 0,
        archive_annex_key: g0.annex_key.clone(),
        ..Default::default()
    };
    h.bus.publish(subjects::STUDY_INDEXED, &indexed, Some(&subjects::indexed_msg_id(&study.uid, 0))).await.unwrap();
    let spool = h.spool.path().to_owned();
    let gone = first.to_vec();
    wait_until("generation 0's files deleted", Duration::from_secs(20), || {
        let (spool, gone) = (spool.clone(), gone.clone());
        async move { gone.iter().all(|p| !spool.join(p).exists()).then_some(()) }
    })
    .await
    .unwrap();
    for p in late {
        assert!(spool.join(p).exists(), "{p}: the amendment's file was deleted with generation 0");
    }

    // The amendment: its three, no dead letter.
    let msg = completed(1, 10, 3);
    h.bus.publish(subjects::STUDY_COMPLETED, &msg, Some(&subjects::completed_msg_id(&study.uid, 1))).await.unwrap();
    let g1: pb::ArchiveStored = h.read(subjects::STREAM_ARCHIVES, subjects::ARCHIVE_STORED, 2).await.remove(1);
    assert_eq!(g1.generation, 1);
    assert_eq!(manifest_paths(&h, &g1).await, late, "the amendment's archive holds its own instances");
    assert_eq!(h.count(subjects::STREAM_DEADLETTER).await, 0, "nothing dead-lettered");
    h.stop().await;
}

/// A completion study-completion has no state for (published by hand, or by a version before
/// generations were told apart) archives the whole directory, as before.
#[tokio::test]
async fn without_a_state_the_whole_directory_is_archived() {
    let mut h = Harness::start().await;
    let study = spool_study(h.spool.path(), StudySpec::default());
    h.run_uploader(&h.env(PATTERN)).await;
    h.complete(&study, 10, "completed:test:1").await;
    let ev: pb::ArchiveStored = h.read(subjects::STREAM_ARCHIVES, subjects::ARCHIVE_STORED, 1).await.remove(0);
    assert_eq!(manifest_paths(&h, &ev).await, study.rel_paths);
    h.stop().await;
}
