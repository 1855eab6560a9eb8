//! Study completion against a real nats-server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{self, pull};
use bidsflux_config::Env;
use bidsflux_messaging::{Bus, subjects as s, topology};
use bidsflux_proto::v1 as pb;
use bidsflux_study_completion::{Config, HTTP_BIND_VAR, Listeners, RULES_VAR, serve};
use bidsflux_testsupport::{NatsServer, wait_until};
use futures::StreamExt as _;
use prost::Message as _;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

fn instance(study: &str, series: &str, sop: &str) -> pb::InstanceStored {
    pb::InstanceStored {
        study_instance_uid: study.into(),
        series_instance_uid: series.into(),
        sop_instance_uid: sop.into(),
        spool_path: format!("{study}/{series}/{sop}.dcm"),
        dataset_sha256: "00".repeat(32),
        modality: "MR".into(),
        ..Default::default()
    }
}

/// An instance of a series described `description` in a study described `study_description`.
fn described(study: &str, study_description: &str, series: &str, description: &str, sop: &str) -> pb::InstanceStored {
    let mut ev = instance(study, series, sop);
    ev.series_description = description.into();
    ev.attributes.insert("StudyDescription".into(), study_description.into());
    ev
}

struct World {
    nats: NatsServer,
    bus: Bus,
    _dir: tempfile::TempDir,
    env: Env,
}

/// A server with the topology, and the service's environment (with `rules` as its rules file).
async fn world(rules: Option<&str>, quiet: &str) -> World {
    bidsflux_telemetry::init_for_tests();
    let nats = NatsServer::start().await.unwrap();
    let bus = Bus::connect(&nats.url, "study-completion", Duration::from_secs(5)).await.unwrap();
    topology::declare(&bus.js).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut env =
        Env::from_pairs([("NATS_URL", nats.url.as_str()), ("BIDSFLUX_QUIET_PERIOD", quiet), (HTTP_BIND_VAR, "off")]);
    if let Some(rules) = rules {
        let path = dir.path().join("rules.toml");
        std::fs::write(&path, rules).unwrap();
        env.set(RULES_VAR, path.display().to_string());
    }
    World { nats, bus, _dir: dir, env }
}

struct Running {
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
    /// `/metrics` and `/healthz`.
    http: std::net::SocketAddr,
}

impl Running {
    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

async fn start(w: &World) -> Running {
    let config = Config::from_env(&w.env).unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = http.local_addr().unwrap();
    let stop = CancellationToken::new();
    let listeners = Listeners { http: Some(http), grpc: None };
    let task = tokio::spawn(serve(config, w.bus.clone(), listeners, stop.clone()));
    Running { stop, task, http: addr }
}

/// Every message of the studies stream as (subject, payload).
async fn events(bus: &Bus) -> Vec<(String, bytes::Bytes)> {
    let st = bus.js.get_stream(s::STREAM_STUDIES).await.unwrap();
    let c = st
        .create_consumer(pull::Config { deliver_policy: consumer::DeliverPolicy::All, ..Default::default() })
        .await
        .unwrap();
    let mut out = Vec::new();
    let mut batch = c.fetch().max_messages(100).expires(Duration::from_millis(300)).messages().await.unwrap();
    while let Some(Ok(m)) = batch.next().await {
        out.push((m.subject.to_string(), m.payload.clone()));
    }
    out
}

async fn of<M: prost::Message + Default>(bus: &Bus, subject: &str) -> Vec<M> {
    events(bus)
        .await
        .into_iter()
        .filter(|(sub, _)| sub == subject)
        .map(|(_, p)| M::decode(p.as_ref()).unwrap())
        .collect()
}

async fn completions(bus: &Bus) -> Vec<pb::StudyCompleted> {
    of(bus, s::STUDY_COMPLETED).await
}

/// Waits until `n` events are on `subject`.
async fn wait_for<M: prost::Message + Default>(bus: &Bus, subject: &str, n: usize, timeout: Duration) -> Vec<M> {
    wait_until(subject, timeout, || {
        let bus = bus.clone();
        async move {
            let all: Vec<M> = of(&bus, subject).await;
            (all.len() >= n).then_some(all)
        }
    })
    .await
    .unwrap()
}

async fn publish(bus: &Bus, ev: &pb::InstanceStored) {
    let id = s::instance_msg_id(&ev.sop_instance_uid, &ev.dataset_sha256);
    bus.publish(s::INSTANCE_STORED, ev, Some(&id)).await.unwrap();
}

async fn state(bus: &Bus, study: &str) -> Option<pb::StudyState> {
    let kv = bus.js.get_key_value(s::KV_STUDIES).await.unwrap();
    let v = kv.get(study).await.unwrap()?;
    Some(pb::StudyState::decode(v.as_ref()).unwrap())
}

/// The body of `GET path`, which must answer 200.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let (status, body) = bidsflux_testsupport::scrape::http_get(addr, path).await.unwrap();
    assert_eq!(status, 200, "{path}: {body}");
    body
}

fn reason(r: &Option<pb::CompletionReason>) -> (String, pb::CompletionCriterion, String) {
    let r = r.clone().unwrap();
    (r.rule, pb::CompletionCriterion::try_from(r.criterion).unwrap(), r.detail)
}

#[tokio::test]
async fn restart_during_quiet_period_completes_exactly_once() {
    let w = world(None, "2s").await;
    let (bus, study) = (&w.bus, "1.2.826.0.1.3680043.2.1");
    let svc = start(&w).await;
    for i in 0..5 {
        publish(bus, &instance(study, "1.2.3.1", &format!("1.2.3.1.{i}"))).await;
    }
    publish(bus, &instance(study, "1.2.3.2", "1.2.3.2.1")).await;
    // Wait until the state has all six, then stop mid-quiet-period.
    wait_until("state with 6 instances", Duration::from_secs(10), || async move {
        (state(bus, study).await?.generation_instances == 6).then_some(())
    })
    .await
    .unwrap();
    let deadline = state(bus, study).await.unwrap().deadline_unix_ms;
    svc.stop().await;
    assert!(completions(bus).await.is_empty(), "completed before the quiet period");

    // A redelivered duplicate while down must not count twice.
    publish(bus, &pb::InstanceStored { dataset_sha256: "11".repeat(32), ..instance(study, "1.2.3.2", "1.2.3.2.1") })
        .await;

    let svc = start(&w).await;
    let done = wait_for::<pb::StudyCompleted>(bus, s::STUDY_COMPLETED, 1, Duration::from_secs(20)).await;
    // Resumed from the stored deadline, not a fresh quiet period from the restart.
    assert!(done[0].completed_at_unix_ms >= deadline && done[0].completed_at_unix_ms < deadline + 1500, "{done:?}");
    // Stay up well past another quiet period: still exactly one.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let all = completions(bus).await;
    assert_eq!(all.len(), 1, "{all:?}");
    let c = &done[0];
    assert_eq!(c.study_instance_uid, study);
    assert_eq!((c.instance_count, c.series_count, c.generation), (6, 2, 0));
    assert_eq!(c.spool_study_dir, study);
    assert_eq!(reason(&c.reason), ("default".into(), pb::CompletionCriterion::QuietPeriod, "quiet 2s".into()));
    let st = state(bus, study).await.unwrap();
    assert_eq!((st.status, st.outbox.len()), (pb::StudyStatus::Completed as i32, 0));
    svc.stop().await;
}

const LISTED: &str = r#"
[[rule]]
name = "mrsi"
select = 'StudyDescription contains "MRSI"'
action = "index"
[rule.completion]
quiet_period = "10m"
series_received = '"MRSI" and "STAGE_preproc"'
"#;

#[tokio::test]
async fn the_listed_series_rule_fires_when_the_last_listed_series_arrives() {
    let w = world(Some(LISTED), "60s").await;
    let (bus, study) = (&w.bus, "1.2.826.0.1.3680043.2.3");
    let svc = start(&w).await;
    for i in 0..20 {
        publish(bus, &described(study, "Brain^MRSI", "1.3.1", "T1w", &format!("1.3.1.{i}"))).await;
    }
    publish(bus, &described(study, "Brain^MRSI", "1.3.2", "MRSI", "1.3.2.1")).await;
    wait_until("22 instances counted", Duration::from_secs(10), || async move {
        (state(bus, study).await?.generation_instances == 21).then_some(())
    })
    .await
    .unwrap();
    assert!(completions(bus).await.is_empty());

    let sent = Instant::now();
    publish(bus, &described(study, "Brain^MRSI", "1.3.3", "STAGE_preproc", "1.3.3.1")).await;
    let done = wait_for::<pb::StudyCompleted>(bus, s::STUDY_COMPLETED, 1, Duration::from_secs(10)).await;
    let latency = sent.elapsed();
    // The quiet period is 10 minutes: only the listed-series criterion can have fired.
    assert!(latency < Duration::from_secs(5), "{latency:?}");
    assert_eq!(
        reason(&done[0].reason),
        ("mrsi".into(), pb::CompletionCriterion::SeriesReceived, "series_received: MRSI, STAGE_preproc".into())
    );
    assert_eq!((done[0].instance_count, done[0].series_count), (22, 3));
    let metrics = http_get(svc.http, "/metrics").await;
    assert!(
        metrics.contains("bidsflux_completion_decisions_total{criterion=\"series_received\",outcome=\"indexed\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("bidsflux_completion_last_instance_to_completion_seconds_count 1"), "{metrics}");
    assert_eq!(http_get(svc.http, "/healthz").await, "ok\n");
    svc.stop().await;
}

const FORCED: &str = r#"
[[rule]]
name = "proceed"
select = 'StudyDescription == "proceed"'
action = "index"
[rule.completion]
quiet_period = "off"
force_after = "2s"
force_action = "proceed"

[[rule]]
name = "discard"
select = 'StudyDescription == "discard"'
action = "index"
[rule.completion]
quiet_period = "off"
force_after = "2s"
force_action = "discard"

[[rule]]
name = "held"
select = 'StudyDescription == "hold"'
action = "index"
[rule.completion]
quiet_period = "off"
force_after = "2s"
force_action = "hold"
"#;

#[tokio::test]
async fn forced_completion_proceeds_discards_or_holds() {
    let w = world(Some(FORCED), "60s").await;
    let bus = &w.bus;
    let svc = start(&w).await;
    let (p, d, h) = ("1.2.826.0.1.3680043.2.41", "1.2.826.0.1.3680043.2.42", "1.2.826.0.1.3680043.2.43");
    for (study, action) in [(p, "proceed"), (d, "discard"), (h, "hold")] {
        publish(bus, &described(study, action, &format!("{study}.1"), "T1w", &format!("{study}.1.1"))).await;
    }
    let held = wait_for::<pb::StudyHeld>(bus, s::STUDY_HELD, 1, Duration::from_secs(15)).await;
    let discarded = wait_for::<pb::StudyDiscarded>(bus, s::STUDY_DISCARDED, 1, Duration::from_secs(15)).await;
    let completed = wait_for::<pb::StudyCompleted>(bus, s::STUDY_COMPLETED, 1, Duration::from_secs(15)).await;

    assert_eq!(completed.len(), 1, "discard and hold publish no completion: {completed:?}");
    assert_eq!(completed[0].study_instance_uid, p);
    assert_eq!(
        reason(&completed[0].reason),
        ("proceed".into(), pb::CompletionCriterion::Forced, "forced after 2s: proceed".into())
    );

    assert_eq!((discarded[0].study_instance_uid.as_str(), discarded[0].instance_count), (d, 1));
    assert_eq!(reason(&discarded[0].reason).2, "forced after 2s: discard");
    assert_eq!(state(bus, d).await.unwrap().status, pb::StudyStatus::Discarded as i32);

    assert_eq!((held[0].study_instance_uid.as_str(), held[0].cause), (h, pb::HoldCause::Rule as i32));
    assert_eq!(reason(&held[0].reason).2, "forced after 2s: hold");
    assert_eq!(state(bus, h).await.unwrap().status, pb::StudyStatus::Held as i32);
    let metrics = http_get(svc.http, "/metrics").await;
    assert!(metrics.contains("bidsflux_completion_studies_held 1\n"), "{metrics}");
    svc.stop().await;

    // The held gauge is counted again from the bucket after a restart.
    let svc = start(&w).await;
    wait_until("held gauge after restart", Duration::from_secs(5), || async {
        http_get(svc.http, "/metrics").await.contains("bidsflux_completion_studies_held 1\n").then_some(())
    })
    .await
    .unwrap();
    svc.stop().await;
}

#[tokio::test]
async fn a_late_series_opens_an_amendment_completed_by_the_same_rule() {
    let rules = "[[rule]]\nname = \"site\"\naction = \"index\"\n[rule.completion]\nquiet_period = \"500ms\"\n";
    let w = world(Some(rules), "60s").await;
    let (bus, study) = (&w.bus, "1.2.826.0.1.3680043.2.2");
    let svc = start(&w).await;
    publish(bus, &instance(study, "1.5.1", "1.5.1.1")).await;
    publish(bus, &instance(study, "1.5.1", "1.5.1.2")).await;
    wait_for::<pb::StudyCompleted>(bus, s::STUDY_COMPLETED, 1, Duration::from_secs(10)).await;
    publish(bus, &instance(study, "1.5.2", "1.5.2.1")).await;
    let all = wait_for::<pb::StudyCompleted>(bus, s::STUDY_COMPLETED, 2, Duration::from_secs(10)).await;
    let amended = &all[1];
    assert_eq!((amended.generation, amended.instance_count, amended.series_count), (1, 3, 2));
    assert_eq!((amended.generation_instance_count, amended.generation_series_count), (1, 1));
    assert_eq!(reason(&amended.reason).0, "site");
    // A resend of the first generation is a duplicate, not a third completion.
    publish(bus, &pb::InstanceStored { dataset_sha256: "22".repeat(32), ..instance(study, "1.5.1", "1.5.1.1") }).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(completions(bus).await.len(), 2);
    svc.stop().await;
}

#[tokio::test]
async fn a_study_no_rule_selects_is_held_never_dropped() {
    let w = world(Some(LISTED), "60s").await;
    let (bus, study) = (&w.bus, "1.2.826.0.1.3680043.2.5");
    let svc = start(&w).await;
    publish(bus, &described(study, "Knee", "1.6.1", "PD", "1.6.1.1")).await;
    let held = wait_for::<pb::StudyHeld>(bus, s::STUDY_HELD, 1, Duration::from_secs(10)).await;
    assert_eq!((held[0].cause, held[0].instance_count), (pb::HoldCause::NoRule as i32, 1));
    assert_eq!(reason(&held[0].reason).1, pb::CompletionCriterion::NoRule);
    // More instances are still counted while it waits.
    publish(bus, &described(study, "Knee", "1.6.1", "PD", "1.6.1.2")).await;
    wait_until("second instance counted", Duration::from_secs(10), || async move {
        let st = state(bus, study).await?;
        (st.generation_instances == 2 && st.status == pb::StudyStatus::Held as i32).then_some(())
    })
    .await
    .unwrap();
    assert!(completions(bus).await.is_empty());
    svc.stop().await;
}

/// A crash after a completion was recorded (with its event in the outbox) but before the event was
/// published — or after it was published but before it left the outbox: the start publishes it,
/// once, and empties the outbox.
#[tokio::test]
async fn an_event_left_in_the_outbox_by_a_crash_is_published_once_at_start() {
    let w = world(None, "60s").await;
    let (bus, kv) = (&w.bus, w.bus.js.get_key_value(s::KV_STUDIES).await.unwrap());
    let mut ids = Vec::new();
    for (i, published_before_crash) in [false, true].into_iter().enumerate() {
        let study = format!("1.2.826.0.1.3680043.2.6{i}");
        let ev = pb::StudyCompleted { study_instance_uid: study.clone(), instance_count: 1, ..Default::default() };
        let id = s::completed_msg_id(&study, 0);
        if published_before_crash {
            bus.publish(s::STUDY_COMPLETED, &ev, Some(&id)).await.unwrap();
        }
        let st = pb::StudyState {
            study_instance_uid: study.clone(),
            status: pb::StudyStatus::Completed as i32,
            outbox: vec![pb::OutboxEntry {
                kind: pb::OutboxKind::StudyCompleted as i32,
                msg_id: id.clone(),
                payload: ev.encode_to_vec(),
            }],
            ..Default::default()
        };
        kv.create(&study, st.encode_to_vec().into()).await.unwrap();
        ids.push(study);
    }
    let svc = start(&w).await;
    wait_until("outboxes emptied", Duration::from_secs(10), || async {
        for study in &ids {
            if !state(bus, study).await?.outbox.is_empty() {
                return None;
            }
        }
        Some(())
    })
    .await
    .unwrap();
    let all = completions(bus).await;
    let mut got: Vec<&str> = all.iter().map(|c| c.study_instance_uid.as_str()).collect();
    got.sort();
    assert_eq!(got, [ids[0].as_str(), ids[1].as_str()], "each exactly once");
    svc.stop().await;
}

#[tokio::test]
async fn an_invalid_rules_file_stops_the_service_at_start() {
    let w = world(Some("[[rule]]\nname = \"x\"\naction = \"indx\"\n"), "60s").await;
    let e = Config::from_env(&w.env).unwrap_err().to_string();
    assert!(e.contains(RULES_VAR) && e.contains("rule \"x\": field \"action\": unknown action \"indx\""), "{e}");
    drop(w.nats);
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
