//! S3 over TLS with a site's own CA (`BIDSFLUX_S3_CA_BUNDLE`): the S3 server sits behind a TLS
//! proxy whose certificate a test CA signed (made with `openssl`); the upload succeeds with the
//! CA bundle, fails without it, and a bundle that is not PEM stops the start with the variable
//! named.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::Arc;

use bidsflux_config::Env;
use bidsflux_session::Uid;
use bidsflux_testsupport::S3Server;
use bidsflux_testsupport::dicom::{StudySpec, generate_study};
use bidsflux_testsupport::pki::Pki;
use bidsflux_uploader::s3::Store;
use bidsflux_uploader::spool::{self, SpoolFile};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Terminates TLS with the PKI's server certificate and forwards to `backend`.
async fn tls_proxy(pki: &Pki, backend: SocketAddr) -> SocketAddr {
    let certs: Vec<_> = CertificateDer::pem_file_iter(pki.path("server.crt")).unwrap().map(Result::unwrap).collect();
    let key = PrivateKeyDer::from_pem_file(pki.path("server.key")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(socket).await else { return };
                let Ok(mut plain) = tokio::net::TcpStream::connect(backend).await else { return };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    addr
}

struct Setup {
    s3: S3Server,
    proxy: SocketAddr,
    pki: Pki,
    spool: tempfile::TempDir,
    file: SpoolFile,
    study: Uid,
}

async fn setup() -> Setup {
    let s3 = S3Server::start().await.unwrap();
    let pki = Pki::new().unwrap();
    let proxy = tls_proxy(&pki, s3.addr).await;
    let spool = tempfile::tempdir().unwrap();
    let study =
        generate_study(spool.path(), &StudySpec { series: 1, instances_per_series: 1, ..Default::default() }).unwrap();
    let rel = study.files[0].strip_prefix(spool.path()).unwrap().to_string_lossy().into_owned();
    let file = SpoolFile {
        rel_path: rel,
        series_instance_uid: Uid::parse("s", &study.series_instance_uids[0]).unwrap(),
        sop_instance_uid: Uid::parse("s", "1.2.3").unwrap(),
    };
    let study = Uid::parse("study", &study.study_instance_uid).unwrap();
    Setup { s3, proxy, pki, spool, file, study }
}

impl Setup {
    fn env(&self, extra: &[(&str, String)]) -> Env {
        let mut env = Env::from_pairs([
            ("S3_URL_PATTERN", "s3://s3.example.org/tls-test".to_owned()),
            ("AWS_ENDPOINT_URL", format!("https://localhost:{}", self.proxy.port())),
            ("AWS_ACCESS_KEY_ID", self.s3.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.s3.secret_key.clone()),
            ("BIDSFLUX_S3_MAX_ATTEMPTS", "1".to_owned()),
        ]);
        for (k, v) in extra {
            env.set(*k, v.clone());
        }
        env
    }

    async fn put(&self, env: &Env) -> Result<(), String> {
        let config = bidsflux_uploader::Config::from_env(env).unwrap();
        let metas = spool::read_metas(self.spool.path(), &self.file, &self.study).unwrap();
        let placement = config.s3_url_pattern.place(&metas).unwrap();
        let path = self.spool.path().join(&self.file.rel_path);
        let digests = spool::hash_file(&path).unwrap();
        let store = Store::new(&config);
        store
            .put_archive(&placement, &placement.key("a.dcm"), &path, &digests)
            .await
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
    }
}

#[tokio::test]
async fn uploads_over_tls_with_the_site_ca_and_not_without() {
    let s = setup().await;
    let e = s.put(&s.env(&[])).await.unwrap_err();
    assert!(s.s3.requests().is_empty(), "a request got through an untrusted TLS connection: {:?}", s.s3.requests());
    assert!(e.contains("invalid peer certificate: UnknownIssuer"), "{e}");

    s.put(&s.env(&[("BIDSFLUX_S3_CA_BUNDLE", s.pki.p("ca.crt"))])).await.unwrap();
    assert!(s.s3.requests().iter().any(|r| r.starts_with("PUT")), "{:?}", s.s3.requests());
    // The SDKs' variable works too.
    s.put(&s.env(&[("AWS_CA_BUNDLE", s.pki.p("ca.crt"))])).await.unwrap();
}

#[test]
fn a_bundle_that_is_not_pem_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bundle.pem");
    std::fs::write(&bad, "not a certificate").unwrap();
    let env = |path: &str| {
        Env::from_pairs([
            ("S3_URL_PATTERN", "s3://s3.example.org/tls-test"),
            ("AWS_ACCESS_KEY_ID", "k"),
            ("AWS_SECRET_ACCESS_KEY", "s"),
            ("BIDSFLUX_S3_CA_BUNDLE", path),
        ])
    };
    let e = bidsflux_uploader::Config::from_env(&env(bad.to_str().unwrap())).unwrap_err().to_string();
    assert!(e.contains("BIDSFLUX_S3_CA_BUNDLE") && e.contains("no PEM certificate"), "{e}");
    let e = bidsflux_uploader::Config::from_env(&env("/nonexistent/ca.pem")).unwrap_err().to_string();
    assert!(e.contains("BIDSFLUX_S3_CA_BUNDLE") && e.contains("cannot read"), "{e}");
}
