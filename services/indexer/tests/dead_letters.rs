//! Messages the indexer must refuse: dead-lettered as invalid input, nothing
//! created in the forge.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use bidsflux_messaging::subjects;
use bidsflux_proto::v1 as pb;
use bidsflux_testsupport::dicom::StudySpec;
use futures::{FutureExt as _, StreamExt as _};
use prost::Message as _;
use support::{Harness, archive_study, next_dead_letter, publish};

/// A PatientID used in the group template: it must never be in a dead letter's reason.
const PATIENT_ID: &str = ".SECRET-ID-4711";

#[tokio::test]
async fn hostile_values_are_dead_lettered_and_nothing_reaches_the_forge() {
    let h = Harness::start().await;
    let mut dead = h.bus.client.subscribe(subjects::deadletter("indexer")).await.unwrap();
    let mut indexed = h.bus.client.subscribe(subjects::STUDY_INDEXED).await.unwrap();
    let spec = StudySpec { series: 1, instances_per_series: 2, ..StudySpec::default() };
    let good = archive_study(&h, spec).await.message;
    let study = good.study_instance_uid.clone();

    // A group value that would climb out of the forge namespace.
    let mut hostile_group = good.clone();
    hostile_group.metas.as_mut().unwrap().referring_physician_name = "..".into();
    publish(&h, &hostile_group).await;
    let letter = next_dead_letter(&mut dead).await;
    assert_eq!(letter.kind(), pb::FailureKind::InvalidInput, "{}", letter.reason);
    assert_eq!(letter.service, "indexer");
    assert_eq!(letter.subject, subjects::ARCHIVE_STORED);
    assert_eq!(letter.study_instance_uid, study);
    assert!(letter.reason.contains("GITLAB_INDEXER_GROUP_TEMPLATE"), "{}", letter.reason);
    assert!(!letter.reason.contains("Doe"), "patient value in reason: {}", letter.reason);
    assert_eq!(pb::ArchiveStored::decode(letter.payload.as_ref()).unwrap(), hostile_group);

    // A manifest path that would write outside the dataset.
    let mut hostile_path = good.clone();
    hostile_path.manifest[0].path = format!("{study}/../../escape.dcm");
    publish(&h, &hostile_path).await;
    let letter = next_dead_letter(&mut dead).await;
    assert_eq!(letter.kind(), pb::FailureKind::InvalidInput, "{}", letter.reason);
    assert!(letter.reason.contains("manifest path"), "{}", letter.reason);

    // Not a protobuf at all.
    h.bus.client.publish(subjects::ARCHIVE_STORED, "not protobuf".into()).await.unwrap();
    h.bus.client.flush().await.unwrap();
    let letter = next_dead_letter(&mut dead).await;
    assert_eq!(letter.kind(), pb::FailureKind::Malformed, "{}", letter.reason);

    let forge_entries = match std::fs::read_dir(&h.forge_dir) {
        Ok(entries) => entries.count(),
        Err(_) => 0,
    };
    assert_eq!(forge_entries, 0, "something was created in the forge dir");
    assert!(indexed.next().now_or_never().flatten().is_none(), "a StudyIndexed was published");
    h.shutdown().await;
}

#[tokio::test]
async fn a_group_from_patient_values_is_not_shown_when_refused() {
    let h = Harness::start_with(&[("GITLAB_INDEXER_GROUP_TEMPLATE", "{ReferringPhysicianName}/{PatientID}")]).await;
    let mut dead = h.bus.client.subscribe(subjects::deadletter("indexer")).await.unwrap();
    // A value the renderer accepts but the forge refuses (a segment starting with '.').
    let spec = StudySpec { series: 1, instances_per_series: 1, patient_id: PATIENT_ID.into(), ..StudySpec::default() };
    let msg = archive_study(&h, spec).await.message;
    publish(&h, &msg).await;
    let letter = next_dead_letter(&mut dead).await;
    assert_eq!(letter.kind(), pb::FailureKind::InvalidInput, "{}", letter.reason);
    assert!(letter.reason.contains("{ReferringPhysicianName}/{PatientID}"), "{}", letter.reason);
    assert!(letter.reason.contains("starts with '.'"), "{}", letter.reason);
    assert!(letter.reason.contains(&format!("[redacted]/sourcedata/dicoms/{}", msg.study_instance_uid)));
    assert!(!letter.reason.contains("SECRET-ID"), "patient value in reason: {}", letter.reason);
    assert!(!letter.reason.contains("Investigator"), "group shown: {}", letter.reason);
    h.shutdown().await;
}
