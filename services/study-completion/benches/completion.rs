//! Benchmarks of study-completion, against a real nats-server (they measure, they do
//! not judge):
//!
//! ```sh
//! cargo bench -p bidsflux-study-completion --bench completion
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::print_stdout)]

use std::time::{Duration, Instant};

use bidsflux_config::Env;
use bidsflux_messaging::{Bus, subjects as s, topology};
use bidsflux_proto::v1 as pb;
use bidsflux_study_completion::{Config, HTTP_BIND_VAR, Listeners, RULES_VAR, serve};
use bidsflux_testsupport::{NatsServer, wait_until};
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;

const RULES: &str = r#"
[[rule]]
name = "mrsi"
action = "index"
[rule.completion]
quiet_period = "10m"
series_received = '"MRSI" and "STAGE_preproc"'
"#;

fn instance(study: &str, series: &str, description: &str, sop: &str) -> pb::InstanceStored {
    pb::InstanceStored {
        study_instance_uid: study.into(),
        series_instance_uid: series.into(),
        sop_instance_uid: sop.into(),
        series_description: description.into(),
        dataset_sha256: "00".repeat(32),
        ..Default::default()
    }
}

/// A server with the topology, and the service's configuration with `rules`.
async fn setup(rules: &str) -> (NatsServer, Bus, tempfile::TempDir, Config) {
    bidsflux_telemetry::init_for_tests();
    let nats = NatsServer::start().await.unwrap();
    let bus = Bus::connect(&nats.url, "study-completion", Duration::from_secs(5)).await.unwrap();
    topology::declare(&bus.js).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.toml");
    std::fs::write(&path, rules).unwrap();
    let env = Env::from_pairs([
        ("NATS_URL", nats.url.clone()),
        (RULES_VAR, path.display().to_string()),
        (HTTP_BIND_VAR, "off".to_owned()),
    ]);
    (nats, bus, dir, Config::from_env(&env).unwrap())
}

fn start(config: Config, bus: &Bus) -> CancellationToken {
    let stop = CancellationToken::new();
    tokio::spawn(serve(config, bus.clone(), Listeners::default(), stop.clone()));
    stop
}

async fn publish(bus: &Bus, ev: &pb::InstanceStored) {
    bus.publish(s::INSTANCE_STORED, ev, Some(&s::instance_msg_id(&ev.sop_instance_uid, &ev.dataset_sha256)))
        .await
        .unwrap();
}

/// Waits until the study-completion consumer has acknowledged everything.
async fn drained(bus: &Bus) {
    wait_until("consumer drained", Duration::from_secs(600), || async {
        let mut c: async_nats::jetstream::consumer::PullConsumer =
            bus.js.get_stream(s::STREAM_INSTANCES).await.ok()?.get_consumer(s::CONSUMER_STUDY_COMPLETION).await.ok()?;
        let info = c.info().await.ok()?;
        (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
    })
    .await
    .unwrap();
}

async fn latency_from_the_last_listed_series_to_study_completed_with_1000_instances() {
    let (_nats, bus, _dir, config) = setup(RULES).await;
    let stop = start(config, &bus);
    let study = "1.2.826.0.1.3680043.7.1";
    for i in 0..999 {
        let (series, description) = if i < 990 { ("1.1", "T1w") } else { ("1.2", "MRSI") };
        publish(&bus, &instance(study, series, description, &format!("1.{i}"))).await;
    }
    drained(&bus).await;
    let mut completed = bus.client.subscribe(s::STUDY_COMPLETED).await.unwrap();
    let sent = Instant::now();
    publish(&bus, &instance(study, "1.3", "STAGE_preproc", "1.999")).await;
    let m = tokio::time::timeout(Duration::from_secs(30), completed.next()).await.unwrap().unwrap();
    let latency = sent.elapsed();
    let ev: pb::StudyCompleted = prost::Message::decode(m.payload.as_ref()).unwrap();
    assert_eq!(ev.instance_count, 1000);
    println!("last instance -> study completed (listed series, 1000 instances): {} ms", latency.as_millis());
    stop.cancel();
}

async fn instance_events_absorbed_per_second_with_10_concurrent_studies() {
    let rules = "[[rule]]\nname = \"q\"\naction = \"index\"\n[rule.completion]\nquiet_period = \"10m\"\n";
    let (_nats, bus, _dir, config) = setup(rules).await;
    const STUDIES: usize = 10;
    const PER_STUDY: usize = 300;
    // Published first (a backlog, as after an outage or a burst), then absorbed by a service
    // started afterwards.
    for i in 0..PER_STUDY {
        for st in 0..STUDIES {
            let study = format!("1.2.826.0.1.3680043.7.2{st}");
            publish(&bus, &instance(&study, &format!("{study}.1"), "T1w", &format!("{study}.1.{i}"))).await;
        }
    }
    let t0 = Instant::now();
    let stop = start(config, &bus);
    drained(&bus).await;
    let elapsed = t0.elapsed();
    let n = STUDIES * PER_STUDY;
    println!(
        "{n} instance events over {STUDIES} studies absorbed in {} ms: {:.0} events/s",
        elapsed.as_millis(),
        n as f64 / elapsed.as_secs_f64()
    );
    stop.cancel();
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(latency_from_the_last_listed_series_to_study_completed_with_1000_instances());
    rt.block_on(instance_events_absorbed_per_second_with_10_concurrent_studies());
}
