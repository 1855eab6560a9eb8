//! A bus outage makes stores fail (never Success), keeps the spooled file, and
//! the receiver recovers by itself when NATS is back.

mod common;

use std::time::Duration;

use async_nats::connection::State;
use bidsflux_messaging::subjects;
use bidsflux_testsupport::dicom::{StudySpec, generate_study, sop_instance_uid};
use bidsflux_testsupport::wait_until;
use common::{Harness, pynetdicom_store};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_fail_while_nats_is_down_and_succeed_after_it_is_back() {
    let mut h = Harness::start().await;
    let src = tempfile::tempdir().unwrap();
    let study =
        generate_study(src.path(), &StudySpec { series: 1, instances_per_series: 2, ..Default::default() }).unwrap();
    let (first, second) = (&study.files[0], &study.files[1]);

    assert_eq!(h.http_get("/healthz").await.0, 200);
    h.nats.stop().await.unwrap();
    let probe = &h;
    wait_until("/healthz to report the lost bus", Duration::from_secs(20), || async move {
        (probe.http_get("/healthz").await.0 == 503).then_some(())
    })
    .await
    .unwrap();
    let status = pynetdicom_store(h.port, first, None).await;
    assert_eq!(status, Some(0xA700), "a store without the bus must fail with out-of-resources");
    // The spool file is durable and kept; no temp file is left.
    assert_eq!(h.spool_files().len(), 1, "{:?}", h.spool_files());
    assert!(h.temp_files().is_empty(), "{:?}", h.temp_files());

    h.nats.restart().await.unwrap();
    let bus = h.bus.clone();
    wait_until("the receiver to reconnect and JetStream to answer", Duration::from_secs(20), || {
        let bus = bus.clone();
        async move {
            if bus.client.connection_state() != State::Connected {
                return None;
            }
            bus.js.get_stream(subjects::STREAM_INSTANCES).await.ok().map(|_| ())
        }
    })
    .await
    .unwrap();

    assert_eq!(pynetdicom_store(h.port, second, None).await, Some(0x0000));
    // The failed instance, resent, succeeds; its event is on the stream once.
    assert_eq!(pynetdicom_store(h.port, first, None).await, Some(0x0000));
    assert_eq!(h.spool_files().len(), 2);
    let first_sop = sop_instance_uid(first).unwrap();
    let events = h.events().await;
    assert_eq!(events.iter().filter(|(e, _, _)| e.sop_instance_uid == first_sop).count(), 1);
    assert_eq!(events.len(), 2);
    h.stop().await;
}
