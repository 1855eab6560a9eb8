//! The uploader against real servers: nats-server, an embedded S3 (s3s-fs) and 7z.

mod common;

use std::os::unix::fs::MetadataExt as _;
use std::process::Command;

use bidsflux_messaging::subjects;
use bidsflux_proto::v1 as pb;
use bidsflux_testsupport::dicom::StudySpec;
use common::{Harness, snapshot, spool_study};
use md5::{Digest as _, Md5};
use sha2::Sha256;

const PATTERN: &str = "s3://{host}/test.{ReferringPhysicianName}.{StudyDescriptionPath[1]}.dicoms/sourcedata";

fn md5_hex(b: &[u8]) -> String {
    hex::encode(Md5::digest(b))
}

#[tokio::test]
async fn archives_a_study_to_s3_and_announces_it_once() {
    let mut h = Harness::start().await;
    let study = spool_study(h.spool.path(), StudySpec::default());
    let before = snapshot(h.spool.path());
    h.run_uploader(&h.env(PATTERN)).await;
    let sent = h.complete(&study, 10, "completed:test:1").await;

    // (a) ArchiveStored with a correct manifest.
    let ev: pb::ArchiveStored = h.read(subjects::STREAM_ARCHIVES, subjects::ARCHIVE_STORED, 1).await.remove(0);
    assert_eq!(ev.study_instance_uid, study.uid);
    assert_eq!(ev.generation, 0);
    assert_eq!(ev.reason, sent.reason);
    assert_eq!(ev.archive_name, format!("{}.7z", study.uid));
    let metas = ev.metas.clone().unwrap();
    assert_eq!((metas.study_instance_uid.as_str(), metas.patient_id.as_str()), (study.uid.as_str(), "SUB001"));
    assert_eq!((metas.patient_name.as_str(), metas.study_description.as_str()), ("Doe^Jane", "Brain^Study1"));
    let paths: Vec<_> = ev.manifest.iter().map(|m| m.path.clone()).collect();
    assert_eq!(paths, study.rel_paths, "manifest lists the spool files in sorted order");
    for m in &ev.manifest {
        let bytes = std::fs::read(h.spool.path().join(&m.path)).unwrap();
        assert_eq!(m.size, bytes.len() as u64, "{}", m.path);
        assert_eq!(m.md5, md5_hex(&bytes));
        assert_eq!(m.sha256, hex::encode(Sha256::digest(&bytes)));
        let mut parts = m.path.split('/');
        assert_eq!(parts.next(), Some(study.uid.as_str()));
        assert_eq!(parts.next(), Some(m.series_instance_uid.as_str()));
        assert_eq!(parts.next().map(|f| f.trim_end_matches(".dcm")), Some(m.sop_instance_uid.as_str()));
        assert_eq!(m.sop_class_uid, "1.2.840.10008.5.1.4.1.1.4", "MR Image Storage");
    }

    // The location is where git-annex's S3 remote will look.
    let loc = ev.location.clone().unwrap();
    assert_eq!(loc.bucket, "test.investigator.study1.dicoms");
    assert_eq!(loc.fileprefix, format!("sourcedata/{}/", study.uid));
    assert_eq!(ev.annex_key, format!("MD5E-s{}--{}.7z", ev.size, ev.md5));
    assert_eq!(loc.key, format!("{}{}", loc.fileprefix, ev.annex_key));
    assert_eq!(loc.endpoint_url, h.s3.endpoint);
    // Not set in the harness: https://<host of S3_URL_PATTERN>, like the original.
    assert_eq!(loc.public_url, format!("https://{}", h.s3.addr));
    assert!(loc.path_style);
    assert_eq!(loc.region, "us-east-1");

    // The object is in S3 with the announced size and hashes.
    let object = h.s3.root().join(&loc.bucket).join(&loc.key);
    let bytes = std::fs::read(&object).unwrap();
    assert_eq!(bytes.len() as u64, ev.size);
    assert_eq!(md5_hex(&bytes), ev.md5);
    assert_eq!(hex::encode(Sha256::digest(&bytes)), ev.sha256);

    // Extracting it gives the spool files, byte for byte.
    let out = tempfile::tempdir().unwrap();
    let st =
        Command::new("7z").arg("x").arg("-y").arg(format!("-o{}", out.path().display())).arg(&object).output().unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stdout));
    for rel in &study.rel_paths {
        assert_eq!(
            std::fs::read(out.path().join(rel)).unwrap(),
            std::fs::read(h.spool.path().join(rel)).unwrap(),
            "{rel}"
        );
    }
    let extracted = snapshot(out.path()).len();
    assert_eq!(extracted, study.rel_paths.len(), "nothing else in the archive");

    // (b) The same completion again (new message id): no second upload.
    h.wait_handled(1).await;
    let meta = std::fs::metadata(&object).unwrap();
    let (ino, mtime) = (meta.ino(), meta.modified().unwrap());
    h.complete(&study, 10, "completed:test:replay").await;
    h.wait_handled(2).await;
    let meta = std::fs::metadata(&object).unwrap();
    assert_eq!((meta.ino(), meta.modified().unwrap()), (ino, mtime), "object was uploaded again");
    let n = h.count(subjects::STREAM_ARCHIVES).await as usize;
    assert!((1..=2).contains(&n), "{n} ArchiveStored");
    for again in h.read::<pb::ArchiveStored>(subjects::STREAM_ARCHIVES, subjects::ARCHIVE_STORED, n).await {
        assert_eq!((again.md5, again.location), (ev.md5.clone(), ev.location.clone()));
    }
    assert_eq!(h.count(subjects::STREAM_DEADLETTER).await, 0);

    // The spool is untouched and no temp archive is left.
    assert_eq!(snapshot(h.spool.path()), before, "spool changed");
    assert_eq!(h.work_leftovers(), Vec::<std::path::PathBuf>::new());
    h.stop().await;
}

#[tokio::test]
async fn refused_credentials_are_dead_lettered_and_the_spool_kept() {
    let mut h = Harness::start().await;
    let study = spool_study(h.spool.path(), StudySpec::default());
    let before = snapshot(h.spool.path());
    let env = h.env(PATTERN).with("AWS_SECRET_ACCESS_KEY", "not-the-secret");
    h.run_uploader(&env).await;
    h.complete(&study, 10, "completed:test:creds").await;

    let dl: pb::DeadLetter = h.read(subjects::STREAM_DEADLETTER, &subjects::deadletter("uploader"), 1).await.remove(0);
    assert_eq!(dl.kind(), pb::FailureKind::Permanent);
    assert_eq!(dl.service, "uploader");
    assert_eq!(dl.subject, subjects::STUDY_COMPLETED);
    assert_eq!(dl.study_instance_uid, study.uid);
    assert!(dl.reason.contains("credentials") && dl.reason.contains("AWS_SECRET_ACCESS_KEY"), "{}", dl.reason);
    assert!(dl.reason.contains("403"), "{}", dl.reason);
    for phi in ["Doe", "Jane", "SUB001"] {
        assert!(!dl.reason.contains(phi), "{}", dl.reason);
    }
    h.wait_handled(1).await;
    assert_eq!(h.count(subjects::STREAM_ARCHIVES).await, 0);
    assert_eq!(snapshot(h.spool.path()), before, "spool changed");
    assert_eq!(h.work_leftovers(), Vec::<std::path::PathBuf>::new());
    h.stop().await;
}

#[tokio::test]
async fn an_unplaceable_study_is_invalid_input_naming_the_template() {
    let mut h = Harness::start().await;
    // StudyDescriptionPath[1] = "x": not a valid bucket name (shorter than 3 characters).
    let spec = StudySpec { study_description: "Brain^x".into(), ..StudySpec::default() };
    let study = spool_study(h.spool.path(), spec);
    h.run_uploader(&h.env("s3://{host}/{StudyDescriptionPath[1]}")).await;
    h.complete(&study, 10, "completed:test:template").await;

    let dl: pb::DeadLetter = h.read(subjects::STREAM_DEADLETTER, &subjects::deadletter("uploader"), 1).await.remove(0);
    assert_eq!(dl.kind(), pb::FailureKind::InvalidInput);
    assert_eq!(dl.study_instance_uid, study.uid);
    assert!(dl.reason.contains("{StudyDescriptionPath[1]}"), "{}", dl.reason);
    assert!(dl.reason.contains("shorter than 3 characters"), "{}", dl.reason);
    for phi in ["Doe", "Jane", "SUB001"] {
        assert!(!dl.reason.contains(phi), "{}", dl.reason);
    }
    h.wait_handled(1).await;
    assert_eq!(h.count(subjects::STREAM_ARCHIVES).await, 0);
    assert!(std::fs::read_dir(h.s3.root()).unwrap().next().is_none(), "nothing stored in S3");
    h.stop().await;
}

#[tokio::test]
async fn a_bucket_from_patient_values_is_not_shown_when_refused() {
    let mut h = Harness::start().await;
    // Twice this PatientID is 68 characters: longer than a bucket name may be.
    let patient_id = "SUBJECT-0123456789-0123456789-0123";
    let spec = StudySpec { patient_id: patient_id.into(), ..StudySpec::default() };
    let study = spool_study(h.spool.path(), spec);
    h.run_uploader(&h.env("s3://{host}/{PatientID}{PatientID}")).await;
    h.complete(&study, 10, "completed:test:patient-bucket").await;

    let dl: pb::DeadLetter = h.read(subjects::STREAM_DEADLETTER, &subjects::deadletter("uploader"), 1).await.remove(0);
    assert_eq!(dl.kind(), pb::FailureKind::InvalidInput);
    assert!(dl.reason.contains("{PatientID}{PatientID}"), "{}", dl.reason);
    assert!(dl.reason.contains("longer than 63 characters"), "{}", dl.reason);
    for phi in ["SUBJECT", "subject", "0123456789", "Doe", "Jane"] {
        assert!(!dl.reason.contains(phi), "patient value in reason: {}", dl.reason);
    }
    h.wait_handled(1).await;
    assert_eq!(h.count(subjects::STREAM_ARCHIVES).await, 0);
    h.stop().await;
}

#[tokio::test]
async fn refused_credentials_on_a_patient_bucket_do_not_show_it() {
    let mut h = Harness::start().await;
    let spec = StudySpec { patient_id: "SUB4711".into(), ..StudySpec::default() };
    let study = spool_study(h.spool.path(), spec);
    let env = h.env("s3://{host}/b-{PatientID}").with("AWS_SECRET_ACCESS_KEY", "not-the-secret");
    h.run_uploader(&env).await;
    h.complete(&study, 10, "completed:test:patient-creds").await;

    let dl: pb::DeadLetter = h.read(subjects::STREAM_DEADLETTER, &subjects::deadletter("uploader"), 1).await.remove(0);
    assert_eq!(dl.kind(), pb::FailureKind::Permanent);
    assert!(dl.reason.contains("on bucket [redacted]") && dl.reason.contains("403"), "{}", dl.reason);
    assert!(!dl.reason.to_ascii_lowercase().contains("sub4711"), "patient value in reason: {}", dl.reason);
    h.wait_handled(1).await;
    h.stop().await;
}

#[tokio::test]
async fn a_spool_without_the_study_or_with_too_few_files_is_dead_lettered() {
    let mut h = Harness::start().await;
    let study = spool_study(h.spool.path(), StudySpec::default());
    h.run_uploader(&h.env(PATTERN)).await;
    h.complete(&study, 11, "completed:test:few").await;
    let missing = common::SpooledStudy { uid: "1.2.3.4.5".into(), rel_paths: Vec::new() };
    h.complete(&missing, 1, "completed:test:missing").await;

    let dls: Vec<pb::DeadLetter> = h.read(subjects::STREAM_DEADLETTER, &subjects::deadletter("uploader"), 2).await;
    assert!(dls.iter().all(|d| d.kind() == pb::FailureKind::Permanent), "{dls:?}");
    let few = dls.iter().find(|d| d.study_instance_uid == study.uid).unwrap();
    assert!(few.reason.contains("holds 10") && few.reason.contains("announced 11"), "{}", few.reason);
    let gone = dls.iter().find(|d| d.study_instance_uid == "1.2.3.4.5").unwrap();
    assert!(gone.reason.contains("does not exist"), "{}", gone.reason);
    h.wait_handled(2).await;
    assert_eq!(h.count(subjects::STREAM_ARCHIVES).await, 0);
    h.stop().await;
}

#[tokio::test]
async fn an_s3_outage_is_retried_until_the_archive_is_stored() {
    let mut h = Harness::start().await;
    let study = spool_study(h.spool.path(), StudySpec::default());
    let (root, addr) = (h.s3.root().to_path_buf(), h.s3.addr);
    h.s3.stop();
    h.run_uploader(&h.env(PATTERN)).await;
    h.complete(&study, 10, "completed:test:outage").await;

    // At least one failed attempt, and no dead letter for it.
    let js = h.bus.js.clone();
    bidsflux_testsupport::wait_until("a retry", std::time::Duration::from_secs(20), || {
        let js = js.clone();
        async move {
            let st = js.get_stream(subjects::STREAM_STUDIES).await.ok()?;
            let info = st.consumer_info(subjects::CONSUMER_UPLOADER).await.ok()?;
            (info.delivered.consumer_sequence >= 2).then_some(())
        }
    })
    .await
    .unwrap();
    assert_eq!(h.count(subjects::STREAM_DEADLETTER).await, 0);

    let _back = bidsflux_testsupport::S3Server::start_at(&root, &addr.to_string(), &h.s3.access_key, &h.s3.secret_key)
        .await
        .unwrap();
    let ev: pb::ArchiveStored = h.read(subjects::STREAM_ARCHIVES, subjects::ARCHIVE_STORED, 1).await.remove(0);
    let loc = ev.location.unwrap();
    let bytes = std::fs::read(root.join(&loc.bucket).join(&loc.key)).unwrap();
    assert_eq!(md5_hex(&bytes), ev.md5);
    h.wait_handled(1).await;
    assert_eq!(h.count(subjects::STREAM_DEADLETTER).await, 0);
    h.stop().await;
}

/// An operator's re-index announces the archive recorded in the first run, once HEAD shows it
/// in S3, under the re-index's own message id (so JetStream does not drop it as a repeat):
/// whether the spool meanwhile holds a later generation's file or was cleared by the lifecycle.
/// Nothing is uploaded. Without the object and the spool, the re-index is dead-lettered.
#[tokio::test]
async fn a_reindex_after_the_spool_was_cleared_announces_the_recorded_archive() {
    let mut h = Harness::start().await;
    let study = spool_study(h.spool.path(), StudySpec::default());
    h.run_uploader(&h.env(PATTERN)).await;
    let sent = h.complete(&study, 10, "completed:test:1").await;
    let first: pb::ArchiveStored = h.read(subjects::STREAM_ARCHIVES, subjects::ARCHIVE_STORED, 1).await.remove(0);
    h.wait_handled(1).await;
    let puts = |h: &Harness| h.s3.requests().iter().filter(|r| r.starts_with("PUT") || r.starts_with("POST")).count();
    let uploads = puts(&h);

    // A later generation's file has arrived: a re-index of generation 0 must not archive it.
    let first_file = h.spool.path().join(&study.rel_paths[0]);
    let later = first_file.with_file_name("9.9.9.9.dcm");
    std::fs::copy(&first_file, &later).unwrap();
    let reindex = |n: u32| pb::StudyCompleted { reindex: n, ..sent.clone() };
    h.bus
        .publish(subjects::STUDY_COMPLETED, &reindex(1), Some(&subjects::reindex_msg_id(&study.uid, 0, 1)))
        .await
        .unwrap();
    let events: Vec<pb::ArchiveStored> = h.read(subjects::STREAM_ARCHIVES, subjects::ARCHIVE_STORED, 2).await;
    assert_eq!(events[1], first, "the recorded event, unchanged");

    // The spool cleared by the lifecycle: the recorded event again.
    std::fs::remove_dir_all(h.spool.path().join(&study.uid)).unwrap();
    h.bus
        .publish(subjects::STUDY_COMPLETED, &reindex(2), Some(&subjects::reindex_msg_id(&study.uid, 0, 2)))
        .await
        .unwrap();
    let events: Vec<pb::ArchiveStored> = h.read(subjects::STREAM_ARCHIVES, subjects::ARCHIVE_STORED, 3).await;
    assert_eq!(events[2], first, "the recorded event, unchanged");
    h.wait_handled(3).await;
    assert_eq!(puts(&h), uploads, "uploaded again");
    assert_eq!(h.count(subjects::STREAM_DEADLETTER).await, 0);

    // The object gone from S3 and no spool: the re-index cannot be served, and says why.
    let object = h.s3.root().join(&first.location.as_ref().unwrap().bucket).join(&first.location.as_ref().unwrap().key);
    std::fs::remove_file(&object).unwrap();
    h.bus
        .publish(subjects::STUDY_COMPLETED, &reindex(3), Some(&subjects::reindex_msg_id(&study.uid, 0, 3)))
        .await
        .unwrap();
    let dl: pb::DeadLetter = h.read(subjects::STREAM_DEADLETTER, &subjects::deadletter("uploader"), 1).await.remove(0);
    assert!(dl.reason.contains("does not exist") && dl.reason.contains("not in S3 as recorded"), "{}", dl.reason);
    assert_eq!(h.count(subjects::STREAM_ARCHIVES).await, 3);
    h.stop().await;
}

/// A PI named in the normal PersonName form `Family^Given` is archived
/// where the original put it: the URL is rendered whole (`^` → `/`), its first
/// path element is the bucket and the rest the key prefix.
#[tokio::test]
async fn a_family_given_name_is_archived_where_the_original_put_it() {
    let mut h = Harness::start().await;
    let spec = StudySpec { referring_physician_name: "Smith^John".into(), ..StudySpec::default() };
    let study = spool_study(h.spool.path(), spec);
    h.run_uploader(&h.env(PATTERN)).await;
    h.complete(&study, 10, "completed:test:family-given").await;

    let ev: pb::ArchiveStored = h.read(subjects::STREAM_ARCHIVES, subjects::ARCHIVE_STORED, 1).await.remove(0);
    assert_eq!(ev.study_instance_uid, study.uid);
    assert_eq!(ev.metas.as_ref().unwrap().referring_physician_name, "Smith^John");
    // `test.Smith/John.Study1.dicoms/sourcedata`: bucket `test.Smith` (normalised), the rest the prefix.
    let loc = ev.location.clone().unwrap();
    assert_eq!(loc.bucket, "test.smith");
    assert_eq!(loc.fileprefix, format!("John.Study1.dicoms/sourcedata/{}/", study.uid));
    assert_eq!(loc.key, format!("{}{}", loc.fileprefix, ev.annex_key));
    let bytes = std::fs::read(h.s3.root().join(&loc.bucket).join(&loc.key)).unwrap();
    assert_eq!(md5_hex(&bytes), ev.md5);
    h.wait_handled(1).await;
    assert_eq!(h.count(subjects::STREAM_DEADLETTER).await, 0, "dead-lettered");
    h.stop().await;
}
