//! Shared harness: a real nats-server, the receiver running in-process through
//! `run`, a temp spool, and DICOM peers (DCMTK, pynetdicom).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use bidsflux_config::Env;
use bidsflux_messaging::{Bus, subjects, topology};
use bidsflux_proto::v1 as pb;
use bidsflux_receiver::{Config, Listeners, run_with};
use bidsflux_testsupport::NatsServer;
use prost::Message as _;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Our AE title in tests.
pub const AE: &str = "BIDSFLUX";

/// The allow-list of the tests' peers (the receiver denies by default): DCMTK's `storescu -aet
/// SCANNER` from loopback only, pynetdicom (`PYSCU`) from 127.0.0.0/8, `echoscu` (its default
/// `ECHOSCU`) and hand-driven associations (`RAW`) from anywhere; all call [`AE`].
pub const ALLOWLIST: &str = "SCANNER@127.0.0.1=BIDSFLUX;PYSCU@127.0.0.0/8;ECHOSCU;RAW";

/// The receiver and what it talks to.
pub struct Harness {
    pub nats: NatsServer,
    /// A clone of the receiver's bus (same client).
    pub bus: Bus,
    pub spool: tempfile::TempDir,
    pub port: u16,
    /// Port of `/healthz` and `/metrics`.
    pub http_port: u16,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Harness {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Starts with extra configuration variables.
    pub async fn start_with(extra: &[(&str, &str)]) -> Self {
        bidsflux_telemetry::init_for_tests();
        let nats = NatsServer::start().await.unwrap();
        let bus = Bus::connect(&nats.url, "receiver", Duration::from_secs(10)).await.unwrap();
        topology::declare(&bus.js).await.unwrap();
        let spool = tempfile::tempdir().unwrap();
        let env = Env::from_pairs([
            ("NATS_URL", nats.url.as_str()),
            ("BIDSFLUX_SPOOL_DIR", spool.path().to_str().unwrap()),
            ("BIDSFLUX_AE_TITLE", AE),
            ("BIDSFLUX_SHUTDOWN_GRACE", "5s"),
            ("BIDSFLUX_DICOM_ALLOWLIST", ALLOWLIST),
            // Low enough for any test machine; the guard itself is tested with a huge threshold.
            ("BIDSFLUX_SPOOL_MIN_FREE", "64MiB"),
        ])
        .with("BIDSFLUX_DICOM_TIMEOUT", "20s");
        let env = extra.iter().fold(env, |env, (k, v)| env.with(*k, *v));
        let config = Config::from_env(&env).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http_port = http.local_addr().unwrap().port();
        let shutdown = CancellationToken::new();
        let listeners = Listeners { dicom: listener, http: Some(http) };
        let task = tokio::spawn(run_with(config, listeners, bus.clone(), shutdown.clone()));
        Self { nats, bus, spool, port, http_port, shutdown, task }
    }

    /// `GET path` on the health/metrics listener: status code and body.
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        bidsflux_testsupport::scrape::http_get(([127, 0, 0, 1], self.http_port).into(), path).await.unwrap()
    }

    /// The value of one sample line (`name{labels}`) of `/metrics`.
    pub async fn metric(&self, sample: &str) -> f64 {
        let (status, body) = self.http_get("/metrics").await;
        assert_eq!(status, 200);
        bidsflux_testsupport::scrape::sample(&body, sample).unwrap_or_else(|| panic!("no {sample} in\n{body}"))
    }

    /// Stops the receiver and checks that `run` returned cleanly.
    pub async fn stop(self) {
        self.request_shutdown();
        tokio::time::timeout(Duration::from_secs(15), self.task).await.expect("run returns").unwrap().unwrap();
    }

    /// Cancels the receiver's shutdown token.
    pub fn request_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Whether `run` has returned.
    pub fn stopped(&self) -> bool {
        self.task.is_finished()
    }

    /// Messages in the InstanceStored stream.
    pub async fn stream_count(&self) -> u64 {
        let stream = self.bus.js.get_stream(subjects::STREAM_INSTANCES).await.unwrap();
        stream.get_info().await.unwrap().state.messages
    }

    /// Every InstanceStored event with its `Nats-Msg-Id` and `traceparent` headers.
    pub async fn events(&self) -> Vec<(pb::InstanceStored, String, Option<String>)> {
        let stream = self.bus.js.get_stream(subjects::STREAM_INSTANCES).await.unwrap();
        let info = stream.get_info().await.unwrap();
        let mut out = Vec::new();
        for seq in info.state.first_sequence..=info.state.last_sequence {
            if info.state.messages == 0 {
                break;
            }
            let m = stream.get_raw_message(seq).await.unwrap();
            let ev = pb::InstanceStored::decode(m.payload).unwrap();
            let id = m.headers.get("Nats-Msg-Id").map(|v| v.as_str().to_owned()).unwrap_or_default();
            let tp = m.headers.get("traceparent").map(|v| v.as_str().to_owned());
            out.push((ev, id, tp));
        }
        out
    }

    /// Files under the spool root ([`spool_files_in`]).
    pub fn spool_files(&self) -> Vec<PathBuf> {
        spool_files_in(self.spool.path())
    }

    /// Files left in the spool's temp directory ([`temp_files_in`]).
    pub fn temp_files(&self) -> Vec<PathBuf> {
        temp_files_in(self.spool.path())
    }
}

/// Files under a spool root, sorted; the receiver's temp and journal directories excluded.
pub fn spool_files_in(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    walk(root, &mut out);
    out.retain(|p| !p.starts_with(root.join(".tmp")) && !p.starts_with(root.join(".journal")));
    out.sort();
    out
}

/// Files in a spool's temp directory, the empty ones created ahead of need excluded: what a
/// store left behind.
pub fn temp_files_in(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    walk(&root.join(".tmp"), &mut out);
    out.retain(|p| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(POOL_PREFIX)));
    out
}

/// Name prefix of the temp files the spool creates ahead of need.
pub const POOL_PREFIX: &str = bidsflux_receiver::spool::pool::PREFIX;

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() { walk(&p, out) } else { out.push(p) }
    }
}

/// Runs DCMTK's `echoscu` against the receiver.
pub async fn echoscu(port: u16, called_ae: &str) -> Output {
    echoscu_with(port, &["-aec", called_ae]).await
}

/// Runs DCMTK's `echoscu` with these options against the receiver.
pub async fn echoscu_with(port: u16, args: &[&str]) -> Output {
    tokio::process::Command::new("/usr/bin/echoscu")
        .args(args)
        .args(["127.0.0.1", &port.to_string()])
        .env("TCP_NODELAY", "1")
        .output()
        .await
        .unwrap()
}

/// Runs DCMTK's `storescu -v` with these options on every file of `dir` (one association).
pub async fn storescu_with(port: u16, args: &[&str], dir: &Path) -> Output {
    tokio::process::Command::new("/usr/bin/storescu")
        .arg("-v")
        .args(args)
        .args(["127.0.0.1", &port.to_string(), "+sd"])
        .arg(dir)
        .env("TCP_NODELAY", "1")
        .output()
        .await
        .unwrap()
}

/// stdout and stderr of a peer, for assertions and messages.
pub fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// pydicom's directory of test files (real files in many transfer syntaxes).
pub fn pydicom_test_files() -> PathBuf {
    let out = std::process::Command::new("python3")
        .args(["-c", "import pydicom, os; print(os.path.dirname(pydicom.__file__))"])
        .output()
        .unwrap();
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()).join("data/test_files")
}

/// Runs a Python (pynetdicom) script with arguments; returns its stdout, panicking if it fails.
pub async fn python(script: &str, args: &[&str]) -> String {
    let out = tokio::process::Command::new("python3").arg("-c").arg(script).args(args).output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "python script failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// Runs DCMTK's `storescu -v` on every file of `dir` (one association).
pub async fn storescu(port: u16, called_ae: &str, dir: &Path) -> Output {
    storescu_with(port, &["-aet", "SCANNER", "-aec", called_ae], dir).await
}

/// How many C-STORE responses storescu reported as Success.
pub fn successes(out: &Output) -> usize {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    text.matches("Received Store Response (Success)").count()
}

/// Sends one file with pynetdicom, optionally replacing its StudyInstanceUID,
/// and returns the C-STORE status (None if no association or no response).
pub async fn pynetdicom_store(port: u16, file: &Path, study_uid: Option<&str>) -> Option<u16> {
    const SCRIPT: &str = r#"
import sys
from pydicom import config, dcmread
from pynetdicom import AE
config.settings.reading_validation_mode = config.IGNORE
config.settings.writing_validation_mode = config.IGNORE
port, path, called = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ds = dcmread(path)
if len(sys.argv) > 4:
    ds.StudyInstanceUID = sys.argv[4]
ae = AE(ae_title="PYSCU")
ae.acse_timeout = 10
ae.dimse_timeout = 20
ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
assoc = ae.associate("127.0.0.1", port, ae_title=called)
if not assoc.is_established:
    print("NOASSOC")
    sys.exit(0)
status = assoc.send_c_store(ds)
if status and "Status" in status:
    print("STATUS 0x%04X" % status.Status)
else:
    print("NOSTATUS")
assoc.release()
"#;
    let mut cmd = tokio::process::Command::new("python3");
    cmd.args(["-c", SCRIPT, &port.to_string()]).arg(file).arg(AE);
    if let Some(uid) = study_uid {
        cmd.arg(uid);
    }
    let out = cmd.output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pynetdicom script failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout.lines().find_map(|l| l.strip_prefix("STATUS 0x")).map(|hex| u16::from_str_radix(hex.trim(), 16).unwrap())
}
