//! DICOM TLS with DCMTK as the peer: a store over TLS succeeds, a plain
//! association to the TLS port fails, and with a client CA only peers holding
//! a certificate it signed get in. Certificates are made here with `openssl`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::time::Duration;

use bidsflux_testsupport::dicom::{StudySpec, generate_study};
use bidsflux_testsupport::pki::Pki;
use common::{AE, Harness, echoscu, storescu_with, successes, text};

async fn harness(pki: &Pki, mutual: bool) -> Harness {
    let (cert, key, ca) = (pki.p("server.crt"), pki.p("server.key"), pki.p("ca.crt"));
    let mut vars = vec![("BIDSFLUX_DICOM_TLS_CERT_FILE", cert.as_str()), ("BIDSFLUX_DICOM_TLS_KEY_FILE", key.as_str())];
    if mutual {
        vars.push(("BIDSFLUX_DICOM_TLS_CLIENT_CA_FILE", ca.as_str()));
    }
    Harness::start_with(&vars).await
}

fn one_instance(dir: &Path) {
    generate_study(dir, &StudySpec { series: 1, instances_per_series: 2, ..Default::default() }).unwrap();
}

#[tokio::test]
async fn stores_over_tls_and_refuses_plain_associations() {
    let pki = Pki::new().unwrap();
    let h = harness(&pki, false).await;
    let src = tempfile::tempdir().unwrap();
    one_instance(src.path());
    // Server authentication only: storescu checks our certificate against the CA.
    let tls = ["-aet", "SCANNER", "-aec", AE, "+tla", "+cf", &pki.p("ca.crt")];
    let out = storescu_with(h.port, &tls, src.path()).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(successes(&out), 2, "{}", text(&out));
    assert_eq!(h.spool_files().len(), 2);
    assert_eq!(h.stream_count().await, 2);

    // Plain DICOM to the TLS port: no association.
    let out = echoscu(h.port, AE).await;
    assert!(!out.status.success(), "plain echo succeeded over the TLS port: {}", text(&out));
    // The allow-list still applies over TLS.
    let out = storescu_with(h.port, &["-aet", "OTHER", "-aec", AE, "+tla", "+cf", &pki.p("ca.crt")], src.path()).await;
    assert!(text(&out).contains("Calling AE Title Not Recognized"), "{}", text(&out));
    h.stop().await;
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate_from_the_ca() {
    let pki = Pki::new().unwrap();
    let h = harness(&pki, true).await;
    let src = tempfile::tempdir().unwrap();
    one_instance(src.path());
    let anonymous = ["-aet", "SCANNER", "-aec", AE, "+tla", "+cf", &pki.p("ca.crt")];
    let out = storescu_with(h.port, &anonymous, src.path()).await;
    assert!(!out.status.success() && successes(&out) == 0, "no client certificate, yet: {}", text(&out));
    assert!(h.spool_files().is_empty());

    let (key, cert, ca) = (pki.p("client.key"), pki.p("client.crt"), pki.p("ca.crt"));
    let with_cert = ["-aet", "SCANNER", "-aec", AE, "+tls", &key, &cert, "+cf", &ca];
    let out = storescu_with(h.port, &with_cert, src.path()).await;
    assert_eq!(successes(&out), 2, "{}", text(&out));
    h.stop().await;
}

/// Holds one TLS association open (pynetdicom) while DCMTK's `echoscu` asks for a second one.
/// The second caller is DCMTK, not pynetdicom: pynetdicom 2's requestor can lose a rejection
/// that arrives before its own thread has looked at the connection (its ACSE sees the socket
/// already closed on the RJ and logs an abort), which made this test flaky.
const HOLD_ONE_AND_ECHO: &str = r#"
import logging, ssl, subprocess, sys
from pynetdicom import AE
logging.basicConfig(level=logging.INFO, stream=sys.stdout)
port, called, ca = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
ae = AE(ae_title="PYSCU")
ae.acse_timeout = 10
ae.add_requested_context("1.2.840.10008.1.1")
first = ae.associate("127.0.0.1", port, ae_title=called, tls_args=(ctx, "localhost"))
echo = subprocess.run(
    ["/usr/bin/echoscu", "-aet", "SCANNER", "-aec", called, "+tla", "+cf", ca, "127.0.0.1", str(port)],
    capture_output=True, text=True, timeout=20)
print("FIRST", first.is_established, "ECHO EXIT", echo.returncode)
print(echo.stdout, echo.stderr)
first.release()
"#;

/// Beyond the limit, a TLS caller gets the A-ASSOCIATE-RJ too (over TLS: the handshake is made
/// to tell it so).
#[tokio::test]
async fn limit_rejection_is_sent_over_tls() {
    let pki = Pki::new().unwrap();
    let (cert, key) = (pki.p("server.crt"), pki.p("server.key"));
    let h = Harness::start_with(&[
        ("BIDSFLUX_DICOM_TLS_CERT_FILE", cert.as_str()),
        ("BIDSFLUX_DICOM_TLS_KEY_FILE", key.as_str()),
        ("BIDSFLUX_MAX_ASSOCIATIONS", "1"),
    ])
    .await;
    let out = common::python(HOLD_ONE_AND_ECHO, &[&h.port.to_string(), AE, &pki.p("ca.crt")]).await;
    assert!(out.contains("FIRST True"), "{out}");
    assert!(!out.contains("ECHO EXIT 0"), "the second association was accepted: {out}");
    assert!(out.contains("Association Rejected") && out.contains("Local Limit Exceeded"), "{out}");
    assert!(out.contains("Rejected Transient") && out.contains("Service Provider (Presentation"), "{out}");
    h.stop().await;
}

/// A renewed certificate is served without a restart: the files are replaced by a pair from
/// another CA, and after the next check (every 200 ms here) peers trusting the new CA get in
/// while those trusting only the old one are refused. A key that does not fit keeps the old
/// pair in use.
#[tokio::test]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let (old, new) = (Pki::new().unwrap(), Pki::new().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("server.crt"), dir.path().join("server.key"));
    std::fs::copy(old.path("server.crt"), &cert).unwrap();
    std::fs::copy(old.path("server.key"), &key).unwrap();
    let h = Harness::start_with(&[
        ("BIDSFLUX_DICOM_TLS_CERT_FILE", cert.to_str().unwrap()),
        ("BIDSFLUX_DICOM_TLS_KEY_FILE", key.to_str().unwrap()),
        ("BIDSFLUX_DICOM_TLS_RELOAD_INTERVAL", "200ms"),
    ])
    .await;
    let echo = |ca: String| {
        let port = h.port;
        async move { common::echoscu_with(port, &["-aet", "SCANNER", "-aec", AE, "+tla", "+cf", &ca]).await }
    };
    assert!(echo(old.p("ca.crt")).await.status.success());

    // A half-renewed pair (the new certificate, the old key): still the old pair.
    std::fs::copy(new.path("server.crt"), &cert).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let out = echo(old.p("ca.crt")).await;
    assert!(out.status.success(), "a mismatched pair was loaded: {}", text(&out));

    std::fs::copy(new.path("server.key"), &key).unwrap();
    bidsflux_testsupport::wait_until("the new certificate", Duration::from_secs(10), || async {
        echo(new.p("ca.crt")).await.status.success().then_some(())
    })
    .await
    .unwrap();
    assert!(!echo(old.p("ca.crt")).await.status.success(), "the old certificate is still served");
    h.stop().await;
}
