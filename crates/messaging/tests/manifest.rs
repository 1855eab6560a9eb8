//! Manifests in the object store, against a real nats-server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use bidsflux_messaging::manifest::{self, ManifestError};
use bidsflux_messaging::{Bus, topology};
use bidsflux_proto::v1 as pb;
use bidsflux_testsupport::NatsServer;

fn event(n: usize) -> pb::ArchiveStored {
    pb::ArchiveStored {
        study_instance_uid: "1.2.3".into(),
        md5: "0123456789abcdef0123456789abcdef".into(),
        manifest: (0..n)
            .map(|i| pb::ManifestEntry {
                path: format!("1.2.3/1.2.4/1.2.4.{i}.dcm"),
                size: i as u64,
                md5: format!("{i:032x}"),
                sop_instance_uid: format!("1.2.4.{i}"),
                series_instance_uid: "1.2.4".into(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn large_manifests_go_to_the_object_store_and_come_back_checked() {
    let nats = NatsServer::start().await.unwrap();
    let bus = Bus::connect(&nats.url, "test", Duration::from_secs(5)).await.unwrap();
    topology::declare(&bus.js).await.unwrap();

    // Small: stays inline.
    let mut small = event(3);
    assert!(!manifest::offload(&bus.js, &mut small, 1 << 20).await.unwrap());
    assert_eq!(small.manifest.len(), 3);
    assert!(small.manifest_ref.is_none());

    // 20 000 entries do not fit in 1 MiB: offloaded, and the event does fit.
    let original = event(20_000);
    let mut big = original.clone();
    assert!(manifest::offload(&bus.js, &mut big, manifest::inline_limit(1 << 20)).await.unwrap());
    assert!(big.manifest.is_empty());
    assert!(prost::Message::encoded_len(&big) < 4096);
    assert_eq!(big.manifest_ref.as_ref().unwrap().entries, 20_000);
    let mut back = big.clone();
    manifest::resolve(&bus.js, &mut back).await.unwrap();
    assert_eq!(back.manifest, original.manifest);

    // A reference that does not match is refused, not trusted.
    let mut tampered = big.clone();
    tampered.manifest_ref.as_mut().unwrap().sha256 = "00".repeat(32);
    assert!(matches!(manifest::resolve(&bus.js, &mut tampered).await, Err(ManifestError::Invalid { .. })));
    let mut missing = big.clone();
    missing.manifest_ref.as_mut().unwrap().object = "nope".into();
    assert!(matches!(manifest::resolve(&bus.js, &mut missing).await, Err(ManifestError::Invalid { .. })));
}
