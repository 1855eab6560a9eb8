//! The admin API over real gRPC against a real nats-server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use async_nats::jetstream::consumer::{self, pull};
use bidsflux_config::Env;
use bidsflux_messaging::{Bus, subjects as s, topology};
use bidsflux_proto::v1 as pb;
use bidsflux_proto::v1::study_admin_client::StudyAdminClient;
use bidsflux_study_completion::{Config, GRPC_BIND_VAR, HTTP_BIND_VAR, Listeners, serve};
use bidsflux_testsupport::{NatsServer, wait_until};
use futures::StreamExt as _;
use prost::Message as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

const A: &str = "1.2.826.0.1.3680043.9.1";
const B: &str = "1.2.826.0.1.3680043.9.2";

fn instance(study: &str, sop: &str) -> pb::InstanceStored {
    let mut ev = pb::InstanceStored {
        study_instance_uid: study.into(),
        series_instance_uid: format!("{study}.1"),
        sop_instance_uid: sop.into(),
        dataset_sha256: "00".repeat(32),
        series_description: "T1w".into(),
        modality: "MR".into(),
        ..Default::default()
    };
    ev.attributes.insert("PatientID".into(), "SECRET-42".into());
    ev
}

/// Messages on `subject` in the studies stream, with their de-duplication ids.
async fn messages(bus: &Bus, subject: &str) -> Vec<(String, bytes::Bytes)> {
    let st = bus.js.get_stream(s::STREAM_STUDIES).await.unwrap();
    let c = st
        .create_consumer(pull::Config { deliver_policy: consumer::DeliverPolicy::All, ..Default::default() })
        .await
        .unwrap();
    let mut out = Vec::new();
    let mut batch = c.fetch().max_messages(100).expires(Duration::from_millis(300)).messages().await.unwrap();
    while let Some(Ok(m)) = batch.next().await {
        if m.subject.as_str() == subject {
            let id = m.headers.as_ref().and_then(|h| h.get("Nats-Msg-Id")).map(|v| v.to_string()).unwrap_or_default();
            out.push((id, m.payload.clone()));
        }
    }
    out
}

async fn wait_messages(bus: &Bus, subject: &str, n: usize) -> Vec<(String, bytes::Bytes)> {
    wait_until(subject, Duration::from_secs(10), || async move {
        let m = messages(bus, subject).await;
        (m.len() >= n).then_some(m)
    })
    .await
    .unwrap()
}

fn status_of(d: &pb::StudyDetail) -> pb::StudyStatus {
    pb::StudyStatus::try_from(d.summary.as_ref().unwrap().status).unwrap()
}

#[tokio::test]
async fn operators_force_complete_hold_release_discard_and_reindex_over_grpc() {
    bidsflux_telemetry::init_for_tests();
    let nats = NatsServer::start().await.unwrap();
    let bus = Bus::connect(&nats.url, "study-completion", Duration::from_secs(5)).await.unwrap();
    topology::declare(&bus.js).await.unwrap();
    // A long quiet period: only operators complete anything here.
    let env = Env::from_pairs([
        ("NATS_URL", nats.url.as_str()),
        ("BIDSFLUX_QUIET_PERIOD", "10m"),
        (HTTP_BIND_VAR, "off"),
        (GRPC_BIND_VAR, "off"),
    ]);
    let config = Config::from_env(&env).unwrap();
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = grpc.local_addr().unwrap();
    let stop = CancellationToken::new();
    let svc = tokio::spawn(serve(config, bus.clone(), Listeners { http: None, grpc: Some(grpc) }, stop.clone()));

    for (study, sop) in [(A, "9.1.1"), (A, "9.1.2"), (B, "9.2.1")] {
        let ev = instance(study, sop);
        bus.publish(s::INSTANCE_STORED, &ev, Some(&s::instance_msg_id(sop, &ev.dataset_sha256))).await.unwrap();
    }
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut admin = StudyAdminClient::new(channel.clone());

    // gRPC health answers for the admin service.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let h = health
        .check(tonic_health::pb::HealthCheckRequest { service: "bidsflux.v1.StudyAdmin".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

    let a = wait_until("study A with two instances", Duration::from_secs(10), || {
        let mut admin = admin.clone();
        async move {
            let req = pb::GetStudyRequest { study_instance_uid: A.into(), include_patient_values: false };
            let d = admin.get_study(req).await.ok()?.into_inner();
            (d.summary.as_ref()?.generation_instance_count == 2).then_some(d)
        }
    })
    .await
    .unwrap();
    let sum = a.summary.clone().unwrap();
    assert_eq!(
        (status_of(&a), sum.rule.as_str(), sum.series_count, a.series.len()),
        (pb::StudyStatus::Open, "default", 1, 1)
    );
    assert!(sum.deadline_unix_ms > 0);
    assert_eq!((a.series[0].description.as_str(), a.series[0].instances), ("T1w", 2));
    assert!(a.attributes.is_empty(), "no patient values unless asked for");
    let req = pb::GetStudyRequest { study_instance_uid: A.into(), include_patient_values: true };
    let with = admin.get_study(req).await.unwrap().into_inner();
    assert_eq!(with.attributes.get("PatientID").map(String::as_str), Some("SECRET-42"));

    let open = vec![pb::StudyStatus::Open as i32];
    let listed = admin.list_studies(pb::ListStudiesRequest { statuses: open, limit: 0 }).await.unwrap().into_inner();
    assert_eq!(listed.studies.len(), 2);
    let done = vec![pb::StudyStatus::Completed as i32];
    let listed = admin.list_studies(pb::ListStudiesRequest { statuses: done.clone(), limit: 0 }).await.unwrap();
    assert!(listed.into_inner().studies.is_empty());

    // Hold and release: back to OPEN under its rule.
    let req = || pb::StudyRequest { study_instance_uid: A.into() };
    assert_eq!(status_of(&admin.hold(req()).await.unwrap().into_inner()), pb::StudyStatus::Held);
    assert_eq!(status_of(&admin.release(req()).await.unwrap().into_inner()), pb::StudyStatus::Open);

    // Force-complete: one StudyCompleted, the operator's reason, the outbox emptied.
    let d = admin.force_complete(req()).await.unwrap().into_inner();
    let sum = d.summary.clone().unwrap();
    assert_eq!((status_of(&d), sum.unpublished_events), (pb::StudyStatus::Completed, 0));
    let reason = sum.last_reason.unwrap();
    assert_eq!((reason.criterion, reason.detail.as_str()), (pb::CompletionCriterion::Operator as i32, "operator"));
    let completed = wait_messages(&bus, s::STUDY_COMPLETED, 1).await;
    assert_eq!(completed[0].0, format!("completed:{A}:0"));
    let ev = pb::StudyCompleted::decode(completed[0].1.as_ref()).unwrap();
    assert_eq!((ev.study_instance_uid.as_str(), ev.instance_count), (A, 2));
    let err = admin.force_complete(req()).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("reindex"), "{err:?}");

    // Re-index twice: the same event again, each under a new id.
    admin.reindex(req()).await.unwrap();
    let d = admin.reindex(req()).await.unwrap().into_inner();
    assert_eq!(d.reindex_count, 2);
    let completed = wait_messages(&bus, s::STUDY_COMPLETED, 3).await;
    let ids: Vec<&str> = completed.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        ids,
        [format!("completed:{A}:0"), format!("completed:{A}:0:reindex:1"), format!("completed:{A}:0:reindex:2")]
    );
    // The same completion, marked as the n-th re-index.
    let decoded: Vec<pb::StudyCompleted> =
        completed.iter().map(|(_, p)| pb::StudyCompleted::decode(&p[..]).unwrap()).collect();
    assert_eq!(decoded.iter().map(|c| c.reindex).collect::<Vec<_>>(), [0, 1, 2]);
    assert!(decoded.iter().all(|c| pb::StudyCompleted { reindex: 0, ..c.clone() } == decoded[0]));

    // Discard B: StudyDiscarded and no completion.
    let d = admin.discard(pb::StudyRequest { study_instance_uid: B.into() }).await.unwrap().into_inner();
    assert_eq!(status_of(&d), pb::StudyStatus::Discarded);
    let discarded = wait_messages(&bus, s::STUDY_DISCARDED, 1).await;
    assert_eq!(discarded[0].0, format!("discarded:{B}:0"));
    assert_eq!(messages(&bus, s::STUDY_COMPLETED).await.len(), 3);

    let listed = admin.list_studies(pb::ListStudiesRequest { statuses: done, limit: 0 }).await.unwrap().into_inner();
    assert_eq!(listed.studies.iter().map(|x| x.study_instance_uid.as_str()).collect::<Vec<_>>(), [A]);
    let all = admin.list_studies(pb::ListStudiesRequest { statuses: vec![], limit: 1 }).await.unwrap().into_inner();
    assert_eq!((all.studies.len(), all.truncated), (1, true));

    let err = admin.hold(pb::StudyRequest { study_instance_uid: "1.2.3.4".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = admin.hold(pb::StudyRequest { study_instance_uid: "../x".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    stop.cancel();
    svc.await.unwrap().unwrap();
}
