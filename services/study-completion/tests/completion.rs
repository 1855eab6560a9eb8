//! Study completion against a real nats-server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use async_nats::jetstream::consumer::{self, pull};
use bidsflux_config::Env;
use bidsflux_messaging::{Bus, subjects as s, topology};
use bidsflux_proto::v1 as pb;
use bidsflux_study_completion::{Config, run};
use bidsflux_testsupport::{NatsServer, wait_until};
use futures::StreamExt as _;
use prost::Message as _;
use tokio_util::sync::CancellationToken;

fn instance(study: &str, series: &str, sop: &str) -> pb::InstanceStored {
    pb::InstanceStored {
        study_instance_uid: study.into(),
        series_instance_uid: series.into(),
        sop_instance_uid: sop.into(),
        spool_path: format!("{study}/{series}/{sop}.dcm"),
        dataset_sha256: "00".repeat(32),
        ..Default::default()
    }
}

async fn setup() -> (NatsServer, Bus) {
    bidsflux_telemetry::init_for_tests();
    let nats = NatsServer::start().await.unwrap();
    let bus = Bus::connect(&nats.url, "study-completion", Duration::from_secs(5)).await.unwrap();
    topology::declare(&bus.js).await.unwrap();
    (nats, bus)
}

fn config(nats: &NatsServer, quiet: &str) -> Config {
    Config::from_env(&Env::from_pairs([("NATS_URL", nats.url.as_str()), ("BIDSFLUX_QUIET_PERIOD", quiet)])).unwrap()
}

async fn completions(bus: &Bus) -> Vec<pb::StudyCompleted> {
    let st = bus.js.get_stream(s::STREAM_STUDIES).await.unwrap();
    let c = st
        .create_consumer(pull::Config { deliver_policy: consumer::DeliverPolicy::All, ..Default::default() })
        .await
        .unwrap();
    let mut out = Vec::new();
    let mut batch = c.fetch().max_messages(100).expires(Duration::from_millis(300)).messages().await.unwrap();
    while let Some(Ok(m)) = batch.next().await {
        out.push(pb::StudyCompleted::decode(m.payload.as_ref()).unwrap());
    }
    out
}

async fn publish(bus: &Bus, ev: &pb::InstanceStored) {
    let id = s::instance_msg_id(&ev.sop_instance_uid, &ev.dataset_sha256);
    bus.publish(s::INSTANCE_STORED, ev, Some(&id)).await.unwrap();
}

#[tokio::test]
async fn restart_during_quiet_period_completes_exactly_once() {
    let (nats, bus) = setup().await;
    let study = "1.2.826.0.1.3680043.2.1";
    let stop = CancellationToken::new();
    let svc = tokio::spawn(run(config(&nats, "2s"), bus.clone(), stop.clone()));
    for i in 0..5 {
        publish(&bus, &instance(study, "1.2.3.1", &format!("1.2.3.1.{i}"))).await;
    }
    publish(&bus, &instance(study, "1.2.3.2", "1.2.3.2.1")).await;
    // Wait until the state has all six, then stop mid-quiet-period.
    let kv = bus.js.get_key_value(s::KV_STUDIES).await.unwrap();
    wait_until("state with 6 instances", Duration::from_secs(10), || {
        let kv = kv.clone();
        async move {
            let v = kv.get(study).await.ok()??;
            (pb::StudyState::decode(v.as_ref()).ok()?.instance_hashes.len() == 6).then_some(())
        }
    })
    .await
    .unwrap();
    stop.cancel();
    svc.await.unwrap().unwrap();
    assert!(completions(&bus).await.is_empty(), "completed before the quiet period");

    // A redelivered duplicate while down must not count twice.
    publish(&bus, &pb::InstanceStored { dataset_sha256: "11".repeat(32), ..instance(study, "1.2.3.2", "1.2.3.2.1") })
        .await;

    let stop = CancellationToken::new();
    let svc = tokio::spawn(run(config(&nats, "2s"), bus.clone(), stop.clone()));
    let done = wait_until("study completed", Duration::from_secs(20), || {
        let bus = bus.clone();
        async move {
            let c = completions(&bus).await;
            (!c.is_empty()).then_some(c)
        }
    })
    .await
    .unwrap();
    // Stay up well past another quiet period: still exactly one.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let all = completions(&bus).await;
    assert_eq!(all.len(), 1, "{all:?}");
    let c = &done[0];
    assert_eq!(c.study_instance_uid, study);
    assert_eq!((c.instance_count, c.series_count, c.generation), (6, 2, 0));
    assert_eq!(c.spool_study_dir, study);
    let reason = c.reason.clone().unwrap();
    assert_eq!(reason.criterion, pb::CompletionCriterion::QuietPeriod as i32);
    assert_eq!(reason.detail, "quiet 2s");
    let st = pb::StudyState::decode(kv.get(study).await.unwrap().unwrap().as_ref()).unwrap();
    assert_eq!(st.status, pb::StudyStatus::Completed as i32);
    stop.cancel();
    svc.await.unwrap().unwrap();
}

#[tokio::test]
async fn late_instance_opens_an_amendment() {
    let (nats, bus) = setup().await;
    let study = "1.2.826.0.1.3680043.2.2";
    let stop = CancellationToken::new();
    let svc = tokio::spawn(run(config(&nats, "500ms"), bus.clone(), stop.clone()));
    publish(&bus, &instance(study, "1.5.1", "1.5.1.1")).await;
    wait_until("first completion", Duration::from_secs(10), || {
        let bus = bus.clone();
        async move { (completions(&bus).await.len() == 1).then_some(()) }
    })
    .await
    .unwrap();
    publish(&bus, &instance(study, "1.5.2", "1.5.2.1")).await;
    let all = wait_until("amendment", Duration::from_secs(10), || {
        let bus = bus.clone();
        async move {
            let c = completions(&bus).await;
            (c.len() == 2).then_some(c)
        }
    })
    .await
    .unwrap();
    assert_eq!(all[1].generation, 1);
    stop.cancel();
    svc.await.unwrap().unwrap();
}

#[tokio::test]
async fn refuses_to_start_without_topology() {
    bidsflux_telemetry::init_for_tests();
    let nats = NatsServer::start().await.unwrap();
    let bus = Bus::connect(&nats.url, "study-completion", Duration::from_secs(5)).await.unwrap();
    let err = bus.require(bidsflux_study_completion::REQUIRES).await.unwrap_err().to_string();
    assert!(err.contains("missing") && err.contains("provisioner"), "{err}");
}

#[test]
fn config_errors_name_the_variable() {
    let e = Config::from_env(&Env::from_pairs([("BIDSFLUX_QUIET_PERIOD", "soon")])).unwrap_err().to_string();
    assert!(e.contains("BIDSFLUX_QUIET_PERIOD"), "{e}");
    let e = Config::from_env(&Env::from_pairs([("BIDSFLUX_QUIET_PERIOD", "0")])).unwrap_err().to_string();
    assert!(e.contains("BIDSFLUX_QUIET_PERIOD"), "{e}");
    assert_eq!(Config::from_env(&Env::default()).unwrap().quiet_period, Duration::from_secs(60));
}
