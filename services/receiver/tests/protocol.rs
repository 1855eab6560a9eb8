//! Protocol edge cases with a hand-driven association: aborts clean up temp
//! files, misbehaving peers lose only their own association, shutdown is
//! bounded, and other transfer syntaxes are stored as received.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bidsflux_testsupport::wait_until;
use common::{AE, Harness, echoscu, pynetdicom_store};
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN;
use dicom_ul::Pdu;
use dicom_ul::association::ClientAssociationOptions;
use dicom_ul::association::client::AsyncClientAssociation;
use dicom_ul::pdu::{PDataValue, PDataValueType};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

async fn raw_association(port: u16) -> AsyncClientAssociation<TcpStream> {
    ClientAssociationOptions::new()
        .calling_ae_title("RAW")
        .called_ae_title(AE)
        .with_presentation_context(uids::MR_IMAGE_STORAGE, vec![uids::EXPLICIT_VR_LITTLE_ENDIAN])
        .establish_async(("127.0.0.1", port))
        .await
        .unwrap()
}

fn store_command(sop_instance_uid: &str) -> Vec<u8> {
    let us = |tag, v: u16| DataElement::new(tag, VR::US, PrimitiveValue::from(v));
    let obj = InMemDicomObject::from_element_iter([
        DataElement::new(tags::AFFECTED_SOP_CLASS_UID, VR::UI, PrimitiveValue::from(uids::MR_IMAGE_STORAGE)),
        us(tags::COMMAND_FIELD, 0x0001),
        us(tags::MESSAGE_ID, 1),
        us(tags::PRIORITY, 0),
        us(tags::COMMAND_DATA_SET_TYPE, 0x0000),
        DataElement::new(tags::AFFECTED_SOP_INSTANCE_UID, VR::UI, PrimitiveValue::from(sop_instance_uid)),
    ]);
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, &IMPLICIT_VR_LITTLE_ENDIAN.erased()).unwrap();
    out
}

fn pdv(pc: u8, value_type: PDataValueType, is_last: bool, data: Vec<u8>) -> PDataValue {
    PDataValue { presentation_context_id: pc, value_type, is_last, data }
}

#[tokio::test]
async fn abort_in_the_middle_of_a_store_removes_the_temp_file() {
    let h = Harness::start().await;
    let mut assoc = raw_association(h.port).await;
    let pc = assoc.presentation_contexts()[0].id;
    let data = vec![
        pdv(pc, PDataValueType::Command, true, store_command("1.2.3.4.5")),
        pdv(pc, PDataValueType::Data, false, vec![0x08, 0x00, 0x16, 0x00, b'U', b'I', 2, 0, b'1', 0]),
    ];
    assoc.send(&Pdu::PData { data }).await.unwrap();
    // Small instances stay in memory: send more than that, so that a temp file exists.
    let mut sent = 0;
    while sent <= bidsflux_receiver::spool::IN_MEMORY_LIMIT {
        let chunk = vec![0_u8; 16 * 1024];
        sent += chunk.len();
        assoc.send(&Pdu::PData { data: vec![pdv(pc, PDataValueType::Data, false, chunk)] }).await.unwrap();
    }
    wait_until("a temp file", Duration::from_secs(10), || async { (h.temp_files().len() == 1).then_some(()) })
        .await
        .unwrap();
    assoc.abort().await.unwrap();
    wait_until("the temp file to go", Duration::from_secs(10), || async { h.temp_files().is_empty().then_some(()) })
        .await
        .unwrap();
    assert!(h.spool_files().is_empty());
    assert_eq!(h.stream_count().await, 0);
    h.stop().await;
}

#[tokio::test]
async fn misbehaving_peers_lose_only_their_association() {
    let h = Harness::start().await;
    // Not DICOM at all.
    let mut junk = TcpStream::connect(("127.0.0.1", h.port)).await.unwrap();
    junk.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    // A data set fragment without a command: the association is aborted.
    let mut assoc = raw_association(h.port).await;
    let other = raw_association(h.port).await;
    let pc = assoc.presentation_contexts()[0].id;
    let data = vec![pdv(pc, PDataValueType::Data, true, vec![0; 16])];
    assoc.send(&Pdu::PData { data }).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), assoc.receive()).await.unwrap();
    assert!(matches!(answer, Ok(Pdu::AbortRQ { .. })), "{answer:?}");
    // Others are still served, including an association opened before.
    assert!(echoscu(h.port, AE).await.status.success());
    other.release().await.unwrap();
    drop(junk);
    h.stop().await;
}

#[tokio::test]
async fn shutdown_aborts_idle_associations_after_the_grace_period() {
    let h = Harness::start_with(&[("BIDSFLUX_SHUTDOWN_GRACE", "1s")]).await;
    let mut assoc = raw_association(h.port).await;
    let started = Instant::now();
    h.request_shutdown();
    let answer = tokio::time::timeout(Duration::from_secs(10), assoc.receive()).await.unwrap();
    assert!(matches!(answer, Ok(Pdu::AbortRQ { .. })), "{answer:?}");
    assert!(started.elapsed() >= Duration::from_millis(900), "aborted before the grace period");
    wait_until("run to return", Duration::from_secs(10), || async { h.stopped().then_some(()) }).await.unwrap();
    // No longer accepting.
    assert!(!echoscu(h.port, AE).await.status.success());
    h.stop().await;
}

/// pydicom's test files in Implicit VR LE and Explicit VR BE are accepted and stored in their transfer syntax.
#[tokio::test]
async fn stores_implicit_little_and_explicit_big_endian() {
    let h = Harness::start().await;
    let out = std::process::Command::new("python3")
        .args(["-c", "import pydicom, os; print(os.path.dirname(pydicom.__file__))"])
        .output()
        .unwrap();
    let files = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()).join("data/test_files");
    for (name, ts) in
        [("MR_small_implicit.dcm", "1.2.840.10008.1.2"), ("MR_small_bigendian.dcm", "1.2.840.10008.1.2.2")]
    {
        let before = h.spool_files().len();
        assert_eq!(pynetdicom_store(h.port, &files.join(name), None).await, Some(0x0000), "{name}");
        let spooled = h.spool_files();
        assert_eq!(spooled.len(), before + 1, "{name}");
        let events = h.events().await;
        let ev = &events.last().unwrap().0;
        assert_eq!(ev.transfer_syntax_uid, ts, "{name}");
        let obj = dicom_object::open_file(h.spool.path().join(&ev.spool_path)).unwrap();
        assert_eq!(obj.meta().transfer_syntax().trim_end_matches('\0'), ts);
        let rows: u16 = obj.element(tags::ROWS).unwrap().to_int().unwrap();
        assert_eq!(rows, 64, "{name}");
    }
    h.stop().await;
}
