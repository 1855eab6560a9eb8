//! The spool free-space guard, `/metrics` and `/healthz`, with real peers.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bidsflux_testsupport::dicom::{StudySpec, dataset_bytes, generate_study};
use bidsflux_testsupport::wait_until;
use common::{AE, Harness, echoscu_with, pynetdicom_store, storescu, successes, text};

/// Below `BIDSFLUX_SPOOL_MIN_FREE`, stores get 0xA700 and nothing is stored (no file, no temp
/// file, no event); with a normal threshold the same instances store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nearly_full_spool_refuses_stores_with_out_of_resources() {
    let src = tempfile::tempdir().unwrap();
    let study =
        generate_study(src.path(), &StudySpec { series: 1, instances_per_series: 3, ..Default::default() }).unwrap();
    let huge = (u64::MAX / 2).to_string();
    let h = Harness::start_with(&[("BIDSFLUX_SPOOL_MIN_FREE", huge.as_str())]).await;

    assert_eq!(pynetdicom_store(h.port, &study.files[0], None).await, Some(0xA700));
    let out = storescu(h.port, AE, src.path()).await;
    assert_eq!(successes(&out), 0, "{}", text(&out));
    assert!(h.spool_files().is_empty(), "{:?}", h.spool_files());
    assert!(h.temp_files().is_empty(), "{:?}", h.temp_files());
    assert_eq!(h.stream_count().await, 0);
    // pynetdicom's store, and storescu's first (storescu stops at a failure status).
    assert!(h.metric("bidsflux_receiver_instances_total{result=\"failed\"}").await >= 2.0);
    assert_eq!(h.metric("bidsflux_receiver_instances_total{result=\"stored\"}").await, 0.0);
    assert!(h.metric("bidsflux_receiver_spool_free_bytes").await > 0.0);
    h.stop().await;

    let h = Harness::start().await;
    let out = storescu(h.port, AE, src.path()).await;
    assert_eq!(successes(&out), 3, "{}", text(&out));
    assert_eq!(h.spool_files().len(), 3);
    h.stop().await;
}

/// `/healthz` answers 200 while running and connected; `/metrics` counts stores, duplicates,
/// bytes, latencies, rejections and open associations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health() {
    let h = Harness::start().await;
    assert_eq!(h.http_get("/healthz").await, (200, "ok\n".to_owned()));
    assert_eq!(h.http_get("/nothing").await.0, 404);

    let src = tempfile::tempdir().unwrap();
    let study =
        generate_study(src.path(), &StudySpec { series: 1, instances_per_series: 3, ..Default::default() }).unwrap();
    let sent: usize = study.files.iter().map(|f| dataset_bytes(f).unwrap().len()).sum();
    let out = storescu(h.port, AE, src.path()).await;
    assert_eq!(successes(&out), 3, "{}", text(&out));
    let out = storescu(h.port, AE, src.path()).await;
    assert_eq!(successes(&out), 3, "{}", text(&out));
    // Unknown calling AE, then a wrong called AE.
    echoscu_with(h.port, &["-aet", "STRANGER", "-aec", AE]).await;
    echoscu_with(h.port, &["-aet", "SCANNER", "-aec", "ELSEWHERE"]).await;

    let m = |s: &'static str| {
        let h = &h;
        async move { h.metric(s).await }
    };
    assert_eq!(m("bidsflux_receiver_instances_total{result=\"stored\"}").await, 3.0);
    assert_eq!(m("bidsflux_receiver_instances_total{result=\"duplicate\"}").await, 3.0);
    assert_eq!(m("bidsflux_receiver_instances_total{result=\"failed\"}").await, 0.0);
    assert_eq!(m("bidsflux_receiver_bytes_total").await, 2.0 * sent as f64);
    assert_eq!(m("bidsflux_receiver_store_seconds_count").await, 6.0);
    assert_eq!(m("bidsflux_receiver_store_seconds_bucket{le=\"+Inf\"}").await, 6.0);
    assert_eq!(m("bidsflux_receiver_association_rejects_total{reason=\"calling_ae\"}").await, 1.0);
    assert_eq!(m("bidsflux_receiver_association_rejects_total{reason=\"called_ae\"}").await, 1.0);
    assert!(m("bidsflux_receiver_spool_free_bytes").await > 0.0);
    let h2 = &h;
    wait_until("the associations to close", Duration::from_secs(10), || async move {
        (h2.metric("bidsflux_receiver_associations_active").await == 0.0).then_some(())
    })
    .await
    .unwrap();
    h.stop().await;
}

/// Sends `file` with pynetdicom after setting its SeriesDescription (different bytes, same UIDs);
/// returns the C-STORE status.
async fn store_altered(port: u16, file: &std::path::Path, description: &str) -> String {
    const SCRIPT: &str = r#"
import sys
from pydicom import dcmread
from pynetdicom import AE
port, path, called, description = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
ds = dcmread(path)
ds.SeriesDescription = description
ae = AE(ae_title="PYSCU")
ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
assoc = ae.associate("127.0.0.1", port, ae_title=called)
status = assoc.send_c_store(ds)
print("STATUS 0x%04X" % status.Status)
assoc.release()
"#;
    common::python(SCRIPT, &[&port.to_string(), file.to_str().unwrap(), AE, description]).await.trim().to_owned()
}

/// The same SOP Instance UID with different bytes: both files kept, one InstanceConflict event
/// (a resend of the same conflicting bytes adds none), the conflict counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflicting_instance_is_kept_and_announced() {
    use bidsflux_messaging::subjects;
    use prost::Message as _;

    let h = Harness::start().await;
    let src = tempfile::tempdir().unwrap();
    let study =
        generate_study(src.path(), &StudySpec { series: 1, instances_per_series: 1, ..Default::default() }).unwrap();
    let file = &study.files[0];
    assert_eq!(pynetdicom_store(h.port, file, None).await, Some(0));
    assert_eq!(store_altered(h.port, file, "altered").await, "STATUS 0x0000");
    assert_eq!(store_altered(h.port, file, "altered").await, "STATUS 0x0000");
    assert_eq!(h.spool_files().len(), 2, "{:?}", h.spool_files());

    let stream = h.bus.js.get_stream(subjects::STREAM_CONFLICTS).await.unwrap();
    let info = stream.get_info().await.unwrap();
    assert_eq!(info.state.messages, 1);
    let msg = stream.get_raw_message(info.state.last_sequence).await.unwrap();
    let ev = bidsflux_proto::v1::InstanceConflict::decode(msg.payload).unwrap();
    let sop = bidsflux_testsupport::dicom::sop_instance_uid(file).unwrap();
    assert_eq!(ev.sop_instance_uid, sop);
    assert_eq!(ev.study_instance_uid, study.study_instance_uid);
    assert!(ev.existing_spool_path.ends_with(&format!("{sop}.dcm")), "{}", ev.existing_spool_path);
    assert!(ev.conflict_spool_path.starts_with(&format!("{}.conflict-", ev.existing_spool_path)));
    assert_ne!(ev.existing_dataset_sha256, ev.conflict_dataset_sha256);
    for (path, sha) in
        [(&ev.existing_spool_path, &ev.existing_dataset_sha256), (&ev.conflict_spool_path, &ev.conflict_dataset_sha256)]
    {
        let bytes = dataset_bytes(&h.spool.path().join(path)).unwrap();
        assert_eq!(&hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes)), sha);
    }
    assert_eq!(ev.calling_ae_title, "PYSCU");
    assert!(ev.received_at_unix_ms > 0);
    // The newcomer is announced as stored too (once: same bytes, same message id).
    assert_eq!(h.stream_count().await, 2);
    assert_eq!(h.metric("bidsflux_receiver_instances_total{result=\"conflict\"}").await, 2.0);
    h.stop().await;
}
