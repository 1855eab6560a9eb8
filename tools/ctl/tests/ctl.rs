//! `bidsflux-ctl` against a running study-completion service and a real nats-server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use bidsflux_config::Env;
use bidsflux_ctl::{Args, parse_args, run};
use bidsflux_messaging::{Bus, subjects as s, topology};
use bidsflux_proto::v1 as pb;
use bidsflux_study_completion::{Config, GRPC_BIND_VAR, HTTP_BIND_VAR, Listeners, serve};
use bidsflux_testsupport::{NatsServer, wait_until};
use tokio_util::sync::CancellationToken;

const STUDY: &str = "1.2.826.0.1.3680043.8.1";

fn args(server: &str, line: &str) -> Args {
    let words: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
    parse_args(&words, server).unwrap()
}

#[tokio::test]
async fn lists_shows_completes_and_reindexes_a_study() {
    bidsflux_telemetry::init_for_tests();
    let nats = NatsServer::start().await.unwrap();
    let bus = Bus::connect(&nats.url, "study-completion", Duration::from_secs(5)).await.unwrap();
    topology::declare(&bus.js).await.unwrap();
    let env = Env::from_pairs([
        ("NATS_URL", nats.url.as_str()),
        ("BIDSFLUX_QUIET_PERIOD", "10m"),
        (HTTP_BIND_VAR, "off"),
        (GRPC_BIND_VAR, "off"),
    ]);
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = format!("http://{}", grpc.local_addr().unwrap());
    let stop = CancellationToken::new();
    let listeners = Listeners { http: None, grpc: Some(grpc) };
    let svc = tokio::spawn(serve(Config::from_env(&env).unwrap(), bus.clone(), listeners, stop.clone()));

    let ev = pb::InstanceStored {
        study_instance_uid: STUDY.into(),
        series_instance_uid: format!("{STUDY}.1"),
        sop_instance_uid: format!("{STUDY}.1.1"),
        series_description: "T1w".into(),
        ..Default::default()
    };
    bus.publish(s::INSTANCE_STORED, &ev, Some("i1")).await.unwrap();

    let table = wait_until("the study listed", Duration::from_secs(10), || {
        let a = args(&server, "studies --status open");
        async move { run(&a).await.ok().filter(|t| t.contains(STUDY)) }
    })
    .await
    .unwrap();
    assert!(table.starts_with("STUDY"), "{table}");
    assert!(table.lines().nth(1).unwrap().contains("open"), "{table}");

    let out = run(&args(&server, &format!("complete {STUDY}"))).await.unwrap();
    assert!(out.contains("status              completed") && out.contains("reason              operator"), "{out}");
    let out = run(&args(&server, &format!("--json reindex {STUDY}"))).await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((v["status"].as_str(), v["reindex_count"].as_u64()), (Some("completed"), Some(1)));
    assert_eq!(v["last_completed"]["reason"]["criterion"], "operator");

    let err = run(&args(&server, &format!("hold {STUDY}"))).await.unwrap_err().to_string();
    assert!(err.contains("FailedPrecondition") && err.contains("completed"), "{err}");
    let err = run(&args(&server, "study 1.2.3.4")).await.unwrap_err().to_string();
    assert!(err.contains("NotFound"), "{err}");

    stop.cancel();
    svc.await.unwrap().unwrap();
    let err = run(&args("http://127.0.0.1:1", "studies")).await.unwrap_err().to_string();
    assert!(err.contains("connect to the admin API"), "{err}");
}
