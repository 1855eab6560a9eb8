//! Access control with real peers: unknown callers, a wrong called AE title and
//! a wrong source address get the proper A-ASSOCIATE-RJ; accept-any lets
//! anyone in; beyond the association limit, callers are told to come back.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use bidsflux_testsupport::dicom::{StudySpec, generate_study};
use bidsflux_testsupport::wait_until;
use common::{AE, Harness, echoscu, echoscu_with, storescu_with, successes, text};
use dicom_dictionary_std::uids;
use dicom_ul::association::ClientAssociationOptions;

/// DCMTK prints the A-ASSOCIATE-RJ it got: result, source and reason.
fn assert_rejected(out: &std::process::Output, reason: &str) {
    let t = text(out);
    assert!(!out.status.success(), "the peer succeeded: {t}");
    assert!(t.contains("Association Rejected"), "no A-ASSOCIATE-RJ: {t}");
    assert!(t.contains(reason), "not rejected with {reason:?}: {t}");
}

#[tokio::test]
async fn unknown_calling_ae_is_rejected() {
    let h = Harness::start().await;
    let src = tempfile::tempdir().unwrap();
    generate_study(src.path(), &StudySpec { series: 1, instances_per_series: 1, ..Default::default() }).unwrap();
    let out = storescu_with(h.port, &["-aet", "OTHER", "-aec", AE], src.path()).await;
    assert_rejected(&out, "Calling AE Title Not Recognized");
    assert!(text(&out).contains("Rejected Permanent"), "{}", text(&out));
    assert_eq!(successes(&out), 0);
    assert!(h.spool_files().is_empty());
    // A listed caller still gets in.
    assert!(storescu_with(h.port, &["-aet", "SCANNER", "-aec", AE], src.path()).await.status.success());
    h.stop().await;
}

/// `SCANNER` may call `BIDSFLUX` only; `ECHOSCU` (no called AE title in its entry) only our AE title.
#[tokio::test]
async fn called_ae_not_allowed_for_the_caller_is_rejected() {
    let h = Harness::start_with(&[("BIDSFLUX_DICOM_ALLOWLIST", "SCANNER=OTHERNODE;ECHOSCU")]).await;
    assert_rejected(&echoscu_with(h.port, &["-aet", "SCANNER", "-aec", AE]).await, "Called AE Title Not Recognized");
    assert!(echoscu_with(h.port, &["-aet", "SCANNER", "-aec", "OTHERNODE"]).await.status.success());
    assert_rejected(&echoscu(h.port, "OTHERNODE").await, "Called AE Title Not Recognized");
    assert!(echoscu(h.port, AE).await.status.success());
    h.stop().await;
}

/// A listed AE title from another address is treated as unknown.
#[tokio::test]
async fn source_address_mismatch_is_rejected() {
    let h = Harness::start_with(&[("BIDSFLUX_DICOM_ALLOWLIST", "SCANNER@10.20.30.0/24;ECHOSCU@127.0.0.1")]).await;
    assert_rejected(&echoscu_with(h.port, &["-aet", "SCANNER", "-aec", AE]).await, "Calling AE Title Not Recognized");
    assert!(echoscu(h.port, AE).await.status.success());
    h.stop().await;
}

#[tokio::test]
async fn accept_any_lets_any_caller_in_but_checks_the_called_ae() {
    let h = Harness::start_with(&[("BIDSFLUX_DICOM_ALLOWLIST", ""), ("BIDSFLUX_DICOM_ACCEPT_ANY", "true")]).await;
    assert!(echoscu_with(h.port, &["-aet", "WHOEVER", "-aec", AE]).await.status.success());
    assert_rejected(
        &echoscu_with(h.port, &["-aet", "WHOEVER", "-aec", "ELSEWHERE"]).await,
        "Called AE Title Not Recognized",
    );
    h.stop().await;
}

/// With one association allowed and one open, the next caller gets A-ASSOCIATE-RJ
/// rejected-transient, service-provider (presentation), local-limit-exceeded — at once, not a
/// wait in the backlog — and gets in once the first is released.
#[tokio::test]
async fn associations_beyond_the_limit_are_rejected_with_the_limit_reason() {
    let h = Harness::start_with(&[("BIDSFLUX_MAX_ASSOCIATIONS", "1")]).await;
    let held = ClientAssociationOptions::new()
        .calling_ae_title("RAW")
        .called_ae_title(AE)
        .with_presentation_context(uids::VERIFICATION, vec![uids::IMPLICIT_VR_LITTLE_ENDIAN])
        .establish_async(("127.0.0.1", h.port))
        .await
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(10), echoscu(h.port, AE)).await.expect("rejected at once");
    assert_rejected(&out, "Local Limit Exceeded");
    let t = text(&out);
    assert!(t.contains("Rejected Transient") && t.contains("Service Provider (Presentation"), "{t}");
    held.release().await.unwrap();
    let port = h.port;
    wait_until("a free association slot", Duration::from_secs(10), || async move {
        echoscu(port, AE).await.status.success().then_some(())
    })
    .await
    .unwrap();
    h.stop().await;
}
