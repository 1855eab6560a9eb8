//! The provisioner against a real nats-server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use bidsflux_messaging::Bus;
use bidsflux_messaging::subjects as s;
use bidsflux_messaging::topology::{self, Requirement, TopologyError};
use bidsflux_testsupport::NatsServer;

#[tokio::test]
async fn declares_idempotently_and_services_see_it() {
    let nats = NatsServer::start().await.unwrap();
    let bus = Bus::connect(&nats.url, "provisioner", Duration::from_secs(5)).await.unwrap();
    let needs = [
        Requirement::Consumer { stream: s::STREAM_INSTANCES, name: s::CONSUMER_STUDY_COMPLETION },
        Requirement::KeyValue(s::KV_STUDIES),
        Requirement::Stream(s::STREAM_DEADLETTER),
        Requirement::Stream(s::STREAM_CONFLICTS),
    ];
    let err = bus.require(&needs).await.unwrap_err();
    assert!(matches!(err, TopologyError::Missing { .. }), "{err}");
    assert!(err.to_string().contains("BIDSFLUX_V1_INSTANCES") && err.to_string().contains("provisioner"), "{err}");

    let config = bidsflux_provisioner::Config { nats_url: nats.url.clone() };
    bidsflux_provisioner::run(&config, &bus).await.unwrap();
    bidsflux_provisioner::run(&config, &bus).await.unwrap();
    bus.require(&needs).await.unwrap();

    for cfg in topology::streams() {
        let mut st = bus.js.get_stream(&cfg.name).await.unwrap();
        let info = st.info().await.unwrap();
        assert_eq!(info.config.subjects, cfg.subjects);
        assert_eq!(info.config.storage, async_nats::jetstream::stream::StorageType::File);
        assert_eq!(info.config.duplicate_window, cfg.duplicate_window);
    }
    // A consumer filtered on its subject (NATS 2.9 keeps single filters).
    let st = bus.js.get_stream(s::STREAM_ARCHIVES).await.unwrap();
    let c = st.consumer_info(s::CONSUMER_INDEXER).await.unwrap();
    assert_eq!(c.config.filter_subject, s::ARCHIVE_STORED);
    assert_eq!(c.config.ack_policy, async_nats::jetstream::consumer::AckPolicy::Explicit);
}
