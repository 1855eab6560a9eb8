//! Durable before Success, under a crash: the receiver binary is killed with SIGKILL while DCMTK's
//! storescu is in the middle of a study. Every instance storescu saw answered Success must be in
//! the spool (complete, the bytes sent) with its event on the stream; no spool file may be
//! partial; after a restart, resending the whole study succeeds and adds no duplicate event.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bidsflux_messaging::{Bus, subjects, topology};
use bidsflux_proto::v1 as pb;
use bidsflux_testsupport::dicom::{StudySpec, dataset_bytes, generate_study, sop_instance_uid};
use bidsflux_testsupport::{NatsServer, free_port, wait_until};
use prost::Message as _;
use tokio::process::{Child, Command};

const AE: &str = "BIDSFLUX";

/// The receiver as a separate process, as in production.
fn spawn_receiver(nats_url: &str, spool: &Path, port: u16, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_bidsflux-receiver"))
        .env("NATS_URL", nats_url)
        .env("BIDSFLUX_SPOOL_DIR", spool)
        .env("BIDSFLUX_DICOM_BIND", format!("127.0.0.1:{port}"))
        .env("BIDSFLUX_AE_TITLE", AE)
        .env("BIDSFLUX_DICOM_ACCEPT_ANY", "true")
        .env("BIDSFLUX_RECEIVER_HTTP_BIND", "127.0.0.1:0")
        .env("BIDSFLUX_DICOM_TIMEOUT", "20s")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn wait_listening(port: u16) {
    wait_until("the receiver to listen", Duration::from_secs(60), || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok().map(|_| ())
    })
    .await
    .unwrap();
}

/// `storescu -v` on every file of `dir`, its output going to `out`.
fn spawn_storescu(port: u16, dir: &Path, out: &Path) -> Child {
    let file = std::fs::File::create(out).unwrap();
    Command::new("/usr/bin/storescu")
        .args(["-v", "-aet", "SCANNER", "-aec", AE, "127.0.0.1", &port.to_string(), "+sd"])
        .arg(dir)
        .env("TCP_NODELAY", "1")
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// The files storescu reported Success for: each response follows its "Sending file" line.
fn succeeded_files(output: &str) -> Vec<PathBuf> {
    let mut current: Option<PathBuf> = None;
    let mut out = Vec::new();
    for line in output.lines() {
        if let Some(path) = line.split("Sending file: ").nth(1) {
            current = Some(PathBuf::from(path.trim()));
        } else if line.contains("Received Store Response (Success)") {
            out.push(current.take().expect("a response follows a sent file"));
        }
    }
    out
}

/// Every InstanceStored event on the stream, by SOP Instance UID (count of events per UID).
async fn events(bus: &Bus) -> HashMap<String, Vec<pb::InstanceStored>> {
    let stream = bus.js.get_stream(subjects::STREAM_INSTANCES).await.unwrap();
    let info = stream.get_info().await.unwrap();
    let mut out: HashMap<String, Vec<pb::InstanceStored>> = HashMap::new();
    if info.state.messages == 0 {
        return out;
    }
    for seq in info.state.first_sequence..=info.state.last_sequence {
        let m = stream.get_raw_message(seq).await.unwrap();
        let ev = pb::InstanceStored::decode(m.payload).unwrap();
        out.entry(ev.sop_instance_uid.clone()).or_default().push(ev);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_instance_that_got_success_survives_a_kill_9() {
    bidsflux_telemetry::init_for_tests();
    let work = tempfile::tempdir().unwrap();
    let nats = NatsServer::start().await.unwrap();
    let bus = Bus::connect(&nats.url, "crash-test", Duration::from_secs(10)).await.unwrap();
    topology::declare(&bus.js).await.unwrap();
    let spool = work.path().join("spool");
    let port = free_port().unwrap();
    let log = work.path().join("receiver.log");

    // Large enough that storescu is still sending when the receiver is killed.
    let src = work.path().join("study");
    let spec = StudySpec { series: 4, instances_per_series: 250, ..Default::default() };
    let study = generate_study(&src, &spec).unwrap();
    let total = study.files.len();
    let sent: HashMap<PathBuf, (String, Vec<u8>)> =
        study.files.iter().map(|f| (f.clone(), (sop_instance_uid(f).unwrap(), dataset_bytes(f).unwrap()))).collect();
    let sent_datasets: HashSet<&[u8]> = sent.values().map(|(_, d)| d.as_slice()).collect();

    let mut receiver = spawn_receiver(&nats.url, &spool, port, &log);
    wait_listening(port).await;
    let out_path = work.path().join("storescu-1.log");
    let mut sender = spawn_storescu(port, &src, &out_path);
    let progress = out_path.clone();
    wait_until("storescu to get 100 Success responses", Duration::from_secs(120), || {
        let text = std::fs::read_to_string(&progress).unwrap_or_default();
        async move { (text.matches("Received Store Response (Success)").count() >= 100).then_some(()) }
    })
    .await
    .unwrap();
    receiver.kill().await.unwrap(); // SIGKILL
    let _ = sender.wait().await;
    let output = std::fs::read_to_string(&out_path).unwrap();
    let acknowledged = succeeded_files(&output);
    assert!(acknowledged.len() >= 100, "{output}");
    assert!(acknowledged.len() < total, "the receiver was killed after the whole study: make it larger");

    // Every Success: in the spool with the bytes sent, and announced once on the stream.
    let on_stream = events(&bus).await;
    for file in &acknowledged {
        let (sop, dataset) = &sent[file];
        let evs = on_stream.get(sop).unwrap_or_else(|| panic!("no event for acknowledged {sop}"));
        assert_eq!(evs.len(), 1, "{sop}");
        let spooled = spool.join(&evs[0].spool_path);
        assert_eq!(&dataset_bytes(&spooled).unwrap(), dataset, "{} differs from what was sent", evs[0].spool_path);
    }
    // Nothing partial is visible: every spool file is a complete instance that was sent.
    let files = common::spool_files_in(&spool);
    assert!(files.len() >= acknowledged.len());
    for f in &files {
        assert!(f.extension().is_some_and(|e| e == "dcm"), "unexpected spool file {}", f.display());
        let dataset = dataset_bytes(f).unwrap();
        assert!(sent_datasets.contains(dataset.as_slice()), "{} is not a complete sent instance", f.display());
    }

    // Restart on the same spool and bus; resend everything.
    let mut receiver = spawn_receiver(&nats.url, &spool, port, &log);
    wait_listening(port).await;
    let out_path = work.path().join("storescu-2.log");
    let status = spawn_storescu(port, &src, &out_path).wait().await.unwrap();
    let output = std::fs::read_to_string(&out_path).unwrap();
    assert!(status.success(), "{output}");
    assert_eq!(succeeded_files(&output).len(), total, "{output}");

    let on_stream = events(&bus).await;
    assert_eq!(on_stream.len(), total, "one event per instance");
    for (sop, evs) in &on_stream {
        assert_eq!(evs.len(), 1, "duplicate events for {sop}");
    }
    assert_eq!(common::spool_files_in(&spool).len(), total, "no conflict or extra files");
    assert_eq!(common::temp_files_in(&spool), Vec::<PathBuf>::new(), "temp files left");
    receiver.kill().await.unwrap();
}
