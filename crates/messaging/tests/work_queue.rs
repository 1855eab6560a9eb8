//! Replicas sharing a work queue: a replica busy with a long job does not hold
//! the next messages, another replica takes them (against a real nats-server).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use bidsflux_messaging::{Bus, ConsumerOptions, run_consumer, subjects, topology};
use bidsflux_proto::v1 as pb;
use bidsflux_testsupport::NatsServer;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

/// Starts a replica on the indexer's queue; it reports each delivery's
/// payload on `seen` and, if `hold` is given, works on it until notified.
fn replica(
    bus: &Bus,
    name: &'static str,
    seen: mpsc::UnboundedSender<(&'static str, String)>,
    hold: Option<Arc<Notify>>,
    stop: &CancellationToken,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let mut opts = ConsumerOptions::new(subjects::STREAM_ARCHIVES, subjects::CONSUMER_INDEXER);
    opts.pull_batch = opts.concurrency;
    let handler = move |d: bidsflux_messaging::Delivery| {
        let (seen, hold) = (seen.clone(), hold.clone());
        async move {
            let msg: pb::ArchiveStored = d.decode()?;
            seen.send((name, msg.study_instance_uid)).unwrap();
            if let Some(hold) = hold {
                hold.notified().await;
            }
            Ok(())
        }
    };
    tokio::spawn(run_consumer(bus.clone(), opts, stop.clone(), |_| None, handler))
}

#[tokio::test]
async fn a_busy_replica_leaves_the_next_message_to_another() {
    bidsflux_telemetry::init_for_tests();
    let nats = NatsServer::start().await.unwrap();
    let bus = Bus::connect(&nats.url, "test", Duration::from_secs(5)).await.unwrap();
    topology::declare(&bus.js).await.unwrap();
    let stop = CancellationToken::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());

    // The busy replica starts first and takes the first message.
    let busy = replica(&bus, "busy", tx.clone(), Some(Arc::clone(&release)), &stop);
    let first = pb::ArchiveStored { study_instance_uid: "1.2.3.1".into(), ..Default::default() };
    bus.publish(subjects::ARCHIVE_STORED, &first, None).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(20), rx.recv()).await.unwrap().unwrap();
    assert_eq!(got, ("busy", "1.2.3.1".to_owned()));

    // While it works, the next messages go to the idle replica.
    let idle = replica(&bus, "idle", tx, None, &stop);
    for i in 2..=3 {
        let m = pb::ArchiveStored { study_instance_uid: format!("1.2.3.{i}"), ..Default::default() };
        bus.publish(subjects::ARCHIVE_STORED, &m, None).await.unwrap();
    }
    for i in 2..=3 {
        let got = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("message {i} was held by the busy replica"))
            .unwrap();
        assert_eq!(got, ("idle", format!("1.2.3.{i}")));
    }
    release.notify_one();
    stop.cancel();
    busy.await.unwrap().unwrap();
    idle.await.unwrap().unwrap();
}
