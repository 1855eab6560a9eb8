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

/// `bus --dry-run` on a fresh server lists every object as `create` and writes nothing; a real
/// run creates them; a second run and a dry run after it keep everything (no write); a setting
/// changed by hand is an `update`, put back by the next run.
#[tokio::test]
async fn bus_plans_creates_keeps_and_updates() {
    use bidsflux_provisioner::plan::{Change, Plan};
    let nats = NatsServer::start().await.unwrap();
    let bus = Bus::connect(&nats.url, "provisioner", Duration::from_secs(5)).await.unwrap();
    let quiet = || Box::new(std::io::sink());

    let mut dry = Plan::with_output(true, quiet());
    bidsflux_provisioner::bus(&bus, &mut dry).await.unwrap();
    let objects = topology::streams().len()
        + topology::key_values().len()
        + topology::object_stores().len()
        + topology::consumers().len();
    assert_eq!(dry.lines().len(), objects, "{:?}", dry.lines());
    assert!(dry.lines().iter().all(|l| l.change == Change::Create), "{:?}", dry.lines());
    assert_eq!(dry.exit_code(), 2);
    let mut names = bus.js.stream_names();
    let mut n = 0;
    while let Some(name) = futures::StreamExt::next(&mut names).await {
        name.unwrap();
        n += 1;
    }
    assert_eq!(n, 0, "a dry run created streams");

    let mut real = Plan::with_output(false, quiet());
    bidsflux_provisioner::bus(&bus, &mut real).await.unwrap();
    assert_eq!(real.changes(), objects);
    assert_eq!(real.exit_code(), 0);

    for dry_run in [false, true] {
        let mut again = Plan::with_output(dry_run, quiet());
        bidsflux_provisioner::bus(&bus, &mut again).await.unwrap();
        let changed: Vec<_> = again.lines().iter().filter(|l| l.change != Change::Keep).collect();
        assert!(changed.is_empty(), "a second run (dry: {dry_run}) would change {changed:?}");
        assert_eq!(again.exit_code(), 0);
    }

    // Someone shortens a stream's retention and a consumer's deliveries by hand.
    let mut cfg = topology::streams().into_iter().find(|c| c.name == s::STREAM_STUDIES).unwrap();
    cfg.max_age = Duration::from_secs(2 * 24 * 3600);
    bus.js.update_stream(&cfg).await.unwrap();
    let (stream, mut consumer) = topology::consumers()
        .into_iter()
        .find(|(_, c)| c.durable_name.as_deref() == Some(s::CONSUMER_UPLOADER))
        .unwrap();
    consumer.max_deliver = 2;
    bus.js.update_consumer_on_stream(consumer, stream).await.unwrap();
    let mut dry = Plan::with_output(true, quiet());
    bidsflux_provisioner::bus(&bus, &mut dry).await.unwrap();
    let updates: Vec<String> =
        dry.lines().iter().filter(|l| l.change == Change::Update).map(|l| l.name.clone()).collect();
    assert_eq!(updates, vec![s::STREAM_STUDIES.to_owned(), format!("{stream}/{}", s::CONSUMER_UPLOADER)]);
    assert_eq!(dry.exit_code(), 2);
    let mut fix = Plan::with_output(false, quiet());
    bidsflux_provisioner::bus(&bus, &mut fix).await.unwrap();
    assert_eq!(fix.changes(), 2);
    let mut st = bus.js.get_stream(s::STREAM_STUDIES).await.unwrap();
    let wanted = topology::streams().into_iter().find(|c| c.name == s::STREAM_STUDIES).unwrap();
    assert_eq!(st.info().await.unwrap().config.max_age, wanted.max_age);
    let mut check = Plan::with_output(true, quiet());
    bidsflux_provisioner::bus(&bus, &mut check).await.unwrap();
    assert_eq!(check.exit_code(), 0, "{:?}", check.lines());
}
