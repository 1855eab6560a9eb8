//! Whole-pipeline faults: the five services as separate processes (as in the stack), a real
//! `nats-server`, the S3 server and the local forge, DCMTK's `storescu` as the scanners and
//! DataLad as the oracle. Each scenario ends with every study indexed exactly once, `datalad
//! get` giving back every data set byte for byte, nothing dead-lettered, and no spool or work
//! file left behind.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bidsflux_messaging::{Bus, subjects as s};
use bidsflux_proto::v1 as pb;
use bidsflux_testsupport::dicom::{GeneratedStudy, StudySpec, generate_study};
use bidsflux_testsupport::site::{Service, Site};
use bidsflux_testsupport::wait_until;
use common::{decode, messages};

/// Every message of `stream`, decoded.
async fn all<M: prost::Message + Default>(bus: &Bus, stream: &str) -> Vec<M> {
    decode(&messages(bus, stream).await)
}

/// Messages stored in `stream` now.
async fn count(bus: &Bus, stream: &str) -> u64 {
    let mut st = bus.js.get_stream(stream).await.unwrap();
    st.info().await.unwrap().state.messages
}

/// `n` studies of one PI and study, each its own participant, `instances` instances each.
fn studies(dir: &Path, n: usize, instances: usize) -> Vec<(PathBuf, GeneratedStudy)> {
    (0..n)
        .map(|i| {
            let d = dir.join(format!("study-{i}"));
            let spec = StudySpec {
                series: 2,
                instances_per_series: instances / 2,
                patient_name: format!("sub-{i:02}^ses-1"),
                patient_id: format!("SUB{i:02}"),
                ..StudySpec::default()
            };
            let g = generate_study(&d, &spec).unwrap();
            (d, g)
        })
        .collect()
}

/// Sends the files under `dir` with DCMTK's storescu; whether every store succeeded.
async fn send(port: u16, dir: &Path) -> bool {
    tokio::process::Command::new("/usr/bin/storescu")
        .env("TCP_NODELAY", "1")
        .args(["-aec", "BIDSFLUX", "127.0.0.1", &port.to_string(), "+sd", "+r", "-to", "10", "-ta", "10"])
        .arg(dir)
        .output()
        .await
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Sends until a send succeeds as a whole, as a scanner's operator resends a failed transfer.
async fn send_until_accepted(port: u16, dir: &Path) {
    for _ in 0..20 {
        if send(port, dir).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("{} was never accepted", dir.display());
}

/// Waits for `n` distinct studies indexed, then checks the end state every scenario shares, and
/// prints the figures docs/reliability.md reports (`scenario:` lines on the test's output).
async fn check_end_state(scenario: &str, site: &Site, bus: &Bus, sent: &[(PathBuf, GeneratedStudy)]) {
    let started = std::time::Instant::now();
    let want: BTreeMap<String, u64> =
        sent.iter().map(|(_, g)| (g.study_instance_uid.clone(), g.files.len() as u64)).collect();
    // Done when every instance sent is in a completed generation and every completed
    // generation is indexed.
    let result = wait_until("every instance completed and indexed", Duration::from_secs(240), || async {
        let completed: Vec<pb::StudyCompleted> = all(bus, s::STREAM_STUDIES).await;
        let mut in_generations: BTreeMap<String, u64> = BTreeMap::new();
        let mut generations = BTreeSet::new();
        for c in &completed {
            if generations.insert((c.study_instance_uid.clone(), c.generation)) {
                *in_generations.entry(c.study_instance_uid.clone()).or_default() += c.generation_instance_count;
            }
        }
        let indexed: Vec<pb::StudyIndexed> = all(bus, s::STREAM_INDEXED).await;
        let done: BTreeSet<(String, u32)> =
            indexed.iter().map(|e| (e.study_instance_uid.clone(), e.generation)).collect();
        (in_generations == want && done == generations).then_some(indexed)
    })
    .await;
    let indexed = result.unwrap_or_else(|e| panic!("{e}\n{}", site.log_tails(15)));
    // Exactly once per study and generation: every announcement of a study names one commit.
    let mut commits: BTreeMap<(String, u32), BTreeSet<String>> = BTreeMap::new();
    for e in &indexed {
        commits.entry((e.study_instance_uid.clone(), e.generation)).or_default().insert(e.commit.clone());
    }
    // A transfer resent after the quiet period ran out (the receiver was down for longer) is
    // an amendment: the next generation, indexed once too, on top of the first.
    let mut generations: BTreeMap<String, u32> = BTreeMap::new();
    for ((study, generation), c) in &commits {
        assert_eq!(c.len(), 1, "{study} generation {generation}: commits {c:?}");
        *generations.entry(study.clone()).or_default() += 1;
    }
    for (study, n) in &generations {
        for g in 0..*n {
            assert!(commits.contains_key(&(study.clone(), g)), "{study}: generation {g} missing: {commits:?}");
        }
    }
    let waited = started.elapsed();
    let stored: Vec<pb::InstanceStored> = all(bus, s::STREAM_INSTANCES).await;
    let distinct: BTreeSet<&str> = stored.iter().map(|e| e.sop_instance_uid.as_str()).collect();
    let sent_n: usize = sent.iter().map(|(_, g)| g.files.len()).sum();
    println!(
        "scenario: {scenario}: {} studies, {sent_n} instances sent, {} acknowledged (distinct), {} InstanceStored \
         events ({} repeats of a resend, de-duplicated downstream), indexed {:.0} s after the last fault, {} generations",
        sent.len(),
        distinct.len(),
        stored.len(),
        stored.len() - distinct.len(),
        waited.as_secs_f64(),
        commits.len()
    );
    assert_eq!(distinct.len(), sent_n, "every instance sent was stored");
    let dead: Vec<pb::DeadLetter> = all(bus, s::STREAM_DEADLETTER).await;
    assert!(dead.is_empty(), "dead letters: {:?}", dead.iter().map(|d| (&d.service, &d.reason)).collect::<Vec<_>>());
    let completed: Vec<pb::StudyCompleted> = all(bus, s::STREAM_STUDIES).await;
    let per_generation: BTreeSet<(String, u32)> =
        completed.iter().map(|c| (c.study_instance_uid.clone(), c.generation)).collect();
    assert_eq!(per_generation.len(), commits.len(), "one completion per generation: {per_generation:?}");

    for (_, g) in sent {
        let ev = indexed.iter().find(|e| e.study_instance_uid == g.study_instance_uid).unwrap();
        let n = generations[&g.study_instance_uid];
        let bare = site.forge().join(format!("{}.git", ev.project_path));
        let log = Command::new("git").arg("--git-dir").arg(&bare).args(["rev-list", "--count", "main"]).output();
        let log = String::from_utf8_lossy(&log.unwrap().stdout).trim().to_owned();
        assert_eq!(log, (n + 1).to_string(), "{}: a new-dataset commit and one per generation", ev.project_path);
        // DataLad as the oracle: every DICOM back, byte for byte.
        let clone = site.dir.path().join("clones").join(&g.study_instance_uid);
        common::assert_datalad_gets_every_instance(&bare, &clone, &site.s3.annex_user_env(), &g.files);
    }

    // Nothing left behind: the lifecycle deleted every indexed file, the work directories are empty.
    let spool = site.spool();
    let leftover = wait_until("the spool emptied by the lifecycle", Duration::from_secs(60), || {
        let spool = spool.clone();
        async move {
            let files: Vec<PathBuf> = walkdir::WalkDir::new(&spool)
                .into_iter()
                .filter_map(Result::ok)
                .filter(|e| e.file_type().is_file() && e.path().extension().is_some_and(|x| x == "dcm"))
                .map(|e| e.path().to_path_buf())
                .collect();
            files.is_empty().then_some(())
        }
    })
    .await;
    assert!(leftover.is_ok(), "spool files left after indexing\n{}", site.log_tails(10));
    // Each process's claimed scratch directory holds its lock only; a killed one's is gone
    // (removed by its successor).
    let work: Vec<PathBuf> = walkdir::WalkDir::new(site.work())
        .min_depth(3)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_name() != ".lock")
        .map(|e| e.path().to_path_buf())
        .collect();
    assert!(work.is_empty(), "work files left: {work:?}");
    for process in std::fs::read_dir(site.work()).unwrap() {
        let process = process.unwrap().path();
        let claims = std::fs::read_dir(&process).unwrap().count();
        assert!(claims <= 1, "{}: {claims} claims, a killed process's was not removed", process.display());
    }
}

/// kill -9 of each service in turn at a point of the flow where it holds work, then a restart;
/// the provisioner re-run mid-flow. The scanners resend a transfer the receiver's death broke.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_service_killed_in_turn_loses_nothing_and_indexes_once() {
    bidsflux_telemetry::init_for_tests();
    let mut site = Site::start(&[], 3).await.unwrap();
    let bus = Bus::connect(&site.nats.url, "faults", Duration::from_secs(5)).await.unwrap();
    let sent = studies(&site.dir.path().join("sent"), 3, 40);
    let port = site.dicom_port;

    // The receiver dies while the first study arrives; the scanner resends it.
    let dir0 = sent[0].0.clone();
    let first = tokio::spawn(async move { send(port, &dir0).await });
    wait_until("some instances stored", Duration::from_secs(30), || async {
        (count(&bus, s::STREAM_INSTANCES).await >= 10).then_some(())
    })
    .await
    .unwrap();
    site.kill(Service::Receiver, 0).await.unwrap();
    let _ = first.await;
    site.spawn(Service::Receiver, 0).unwrap();
    site.wait_for_dicom().await.unwrap();
    send_until_accepted(port, &sent[0].0).await;

    // Study-completion dies during the quiet period of the first study.
    site.kill(Service::StudyCompletion, 0).await.unwrap();
    site.spawn(Service::StudyCompletion, 0).unwrap();
    // The provisioner runs again while everything flows: it changes nothing.
    site.provision().await.unwrap();

    // The other two studies at once; the uploader dies once a completion waits for it.
    let (a, b) = (sent[1].0.clone(), sent[2].0.clone());
    let scanners =
        tokio::spawn(async move { tokio::join!(send_until_accepted(port, &a), send_until_accepted(port, &b)) });
    wait_until("a completion", Duration::from_secs(60), || async {
        (count(&bus, s::STREAM_STUDIES).await >= 1).then_some(())
    })
    .await
    .unwrap();
    site.kill(Service::Uploader, 0).await.unwrap();
    site.spawn(Service::Uploader, 0).unwrap();
    // One of three indexer replicas dies once an archive waits for indexing.
    wait_until("an archive", Duration::from_secs(120), || async {
        (count(&bus, s::STREAM_ARCHIVES).await >= 1).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", site.log_tails(15)));
    site.kill(Service::Indexer, 0).await.unwrap();
    site.spawn(Service::Indexer, 0).unwrap();
    scanners.await.unwrap();

    check_end_state("kill -9 of each service", &site, &bus, &sent).await;
    for s in Service::ALL {
        assert!(site.is_running(s, 0), "{s:?} stopped\n{}", site.log_tails(15));
    }
}

/// `nats-server` killed and restarted on the same store while studies flow: the receiver keeps
/// its journal's events and publishes them again, the consumers resume, nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_killed_and_restarted_mid_flow_loses_nothing() {
    bidsflux_telemetry::init_for_tests();
    let mut site = Site::start(&[], 2).await.unwrap();
    let bus = Bus::connect(&site.nats.url, "faults", Duration::from_secs(5)).await.unwrap();
    let sent = studies(&site.dir.path().join("sent"), 2, 40);
    let port = site.dicom_port;
    send_until_accepted(port, &sent[0].0).await;
    // The bus goes down after the first study's instances were published, before its completion.
    site.nats.stop().await.unwrap();
    // The second study arrives while the bus is down: accepted into the journal, or refused
    // with 0xA700 and resent by the scanner once the bus is back.
    let second = send(port, &sent[1].0).await;
    site.nats.restart().await.unwrap();
    if !second {
        send_until_accepted(port, &sent[1].0).await;
    }
    check_end_state("nats-server killed and restarted", &site, &bus, &sent).await;
    for s in Service::ALL {
        assert!(site.is_running(s, 0), "{s:?} stopped\n{}", site.log_tails(15));
    }
}
