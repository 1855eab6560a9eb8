//! The receiver against real DICOM peers (DCMTK, pynetdicom) and a real nats-server.

mod common;

use std::collections::HashMap;

use bidsflux_messaging::subjects;
use bidsflux_testsupport::dicom::{StudySpec, dataset_bytes, generate_study, sop_instance_uid};
use common::{AE, Harness, echoscu, pynetdicom_store, storescu, successes};
use sha2::{Digest as _, Sha256};

#[tokio::test]
async fn echo_succeeds() {
    let h = Harness::start().await;
    let out = echoscu(h.port, AE).await;
    assert!(out.status.success(), "echoscu failed: {}", String::from_utf8_lossy(&out.stderr));
    h.stop().await;
}

/// Two studies sent at once on two associations: every instance lands at its
/// spool path with the sent data set bytes, and one event per instance is on
/// the stream; a resend changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_studies_and_deduplicates_resends() {
    let h = Harness::start().await;
    let src = tempfile::tempdir().unwrap();
    let spec = StudySpec { series: 2, instances_per_series: 5, ..Default::default() };
    let (dir_a, dir_b) = (src.path().join("a"), src.path().join("b"));
    let a = generate_study(&dir_a, &spec).unwrap();
    let b = generate_study(&dir_b, &spec).unwrap();

    let (out_a, out_b) = tokio::join!(storescu(h.port, AE, &dir_a), storescu(h.port, AE, &dir_b));
    for out in [&out_a, &out_b] {
        assert!(out.status.success(), "storescu failed: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(successes(out), 10, "{}", String::from_utf8_lossy(&out.stderr));
    }

    // Files: the right path, the sent data set bytes.
    let mut expected = HashMap::new();
    for (study, dir) in [(&a, "a"), (&b, "b")] {
        for file in &study.files {
            let obj = dicom_object::open_file(file).unwrap();
            let series =
                obj.element_by_name("SeriesInstanceUID").unwrap().to_str().unwrap().trim_end_matches('\0').to_owned();
            let sop = sop_instance_uid(file).unwrap();
            let rel = format!("{}/{series}/{sop}.dcm", study.study_instance_uid);
            let spooled = h.spool.path().join(&rel);
            assert!(spooled.is_file(), "{rel} missing (from {dir})");
            let sent = dataset_bytes(file).unwrap();
            assert_eq!(dataset_bytes(&spooled).unwrap(), sent, "{rel} differs");
            expected.insert(sop, (rel, hex::encode(Sha256::digest(&sent))));
        }
    }
    assert_eq!(h.spool_files().len(), 20, "{:?}", h.spool_files());
    assert!(h.temp_files().is_empty(), "{:?}", h.temp_files());

    // Events: one per instance, consistent with the files.
    let events = h.events().await;
    assert_eq!(events.len(), 20);
    for (ev, msg_id, traceparent) in &events {
        let (rel, sha) = &expected[&ev.sop_instance_uid];
        assert_eq!(&ev.spool_path, rel);
        assert_eq!(&ev.dataset_sha256, sha);
        assert_eq!(msg_id, &subjects::instance_msg_id(&ev.sop_instance_uid, sha));
        assert_eq!(ev.file_size, std::fs::metadata(h.spool.path().join(rel)).unwrap().len());
        assert_eq!(ev.calling_ae_title, "SCANNER");
        assert_eq!(ev.called_ae_title, AE);
        assert_eq!(ev.modality, "MR");
        // Rule attributes: the default keywords present in the data set, and no patient value.
        assert_eq!(ev.attributes.get("StudyDescription").map(String::as_str), Some(spec.study_description.as_str()));
        assert!(!ev.attributes.contains_key("PatientName") && !ev.attributes.contains_key("PatientID"));
        assert_eq!(ev.sop_class_uid, "1.2.840.10008.5.1.4.1.1.4");
        assert_eq!(ev.transfer_syntax_uid, "1.2.840.10008.1.2.1");
        assert!(["1", "2"].contains(&ev.series_number.as_str()));
        assert!(ev.series_description == "anat-T1w" || ev.series_description.starts_with("func-bold"));
        assert!(traceparent.is_some(), "no trace context on the event");
    }

    // Spooled meta: SourceApplicationEntityTitle is the calling AE.
    let (rel, _) = expected.values().next().unwrap();
    let obj = dicom_object::OpenFileOptions::new()
        .read_until(dicom_dictionary_std::tags::PIXEL_DATA)
        .open_file(h.spool.path().join(rel))
        .unwrap();
    assert_eq!(obj.meta().source_application_entity_title().map(str::trim), Some("SCANNER"));

    // Resend: success, nothing new on the stream, same files.
    let out = storescu(h.port, AE, &dir_a).await;
    assert_eq!(successes(&out), 10, "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(h.stream_count().await, 20);
    assert_eq!(h.spool_files().len(), 20);
    h.stop().await;
}

#[tokio::test]
async fn wrong_called_ae_is_rejected() {
    let h = Harness::start().await;
    let src = tempfile::tempdir().unwrap();
    generate_study(src.path(), &StudySpec { series: 1, instances_per_series: 2, ..Default::default() }).unwrap();
    let out = storescu(h.port, "NOT_BIDSFLUX", src.path()).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "storescu succeeded: {stderr}");
    assert!(stderr.contains("Called AE Title Not Recognized"), "no A-ASSOCIATE-RJ: {stderr}");
    assert_eq!(successes(&out), 0);
    assert!(h.spool_files().is_empty());
    assert_eq!(h.stream_count().await, 0);
    // The server goes on serving.
    assert!(echoscu(h.port, AE).await.status.success());
    h.stop().await;
}

#[tokio::test]
async fn invalid_study_uid_is_refused_and_nothing_is_spooled() {
    let h = Harness::start().await;
    let src = tempfile::tempdir().unwrap();
    let study =
        generate_study(src.path(), &StudySpec { series: 1, instances_per_series: 1, ..Default::default() }).unwrap();
    let status = pynetdicom_store(h.port, &study.files[0], Some("../x")).await;
    assert_eq!(status, Some(0xC000));
    assert!(h.spool_files().is_empty(), "{:?}", h.spool_files());
    assert!(h.temp_files().is_empty(), "{:?}", h.temp_files());
    assert!(!h.spool.path().parent().unwrap().join("x").exists());
    assert_eq!(h.stream_count().await, 0);
    // The same instance with its real UID is then accepted.
    assert_eq!(pynetdicom_store(h.port, &study.files[0], None).await, Some(0x0000));
    assert_eq!(h.spool_files().len(), 1);
    assert_eq!(h.stream_count().await, 1);
    h.stop().await;
}
