//! What the end-to-end tests share: reading a stream whole, sending with DCMTK, DataLad as the
//! oracle, and the end state every whole-site scenario must reach ([`check_end_state`]).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod engine;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use async_nats::jetstream::consumer::{self, pull};
use bidsflux_messaging::{Bus, subjects as s};
use bidsflux_proto::v1 as pb;
use bidsflux_session::SpoolPath;
use bidsflux_testsupport::dicom::{GeneratedStudy, dataset_bytes, sop_instance_uid};
use bidsflux_testsupport::wait_until;
use futures::StreamExt as _;

/// Every message on a stream, with its headers.
pub async fn messages(bus: &Bus, stream: &str) -> Vec<async_nats::jetstream::Message> {
    let st = bus.js.get_stream(stream).await.unwrap();
    let c = st
        .create_consumer(pull::Config { deliver_policy: consumer::DeliverPolicy::All, ..Default::default() })
        .await
        .unwrap();
    let mut out = Vec::new();
    let mut batch = c.fetch().max_messages(10_000).expires(Duration::from_millis(300)).messages().await.unwrap();
    while let Some(Ok(m)) = batch.next().await {
        out.push(m);
    }
    out
}

/// The payloads of `msgs`, decoded.
pub fn decode<M: prost::Message + Default>(msgs: &[async_nats::jetstream::Message]) -> Vec<M> {
    msgs.iter().map(|m| M::decode(m.payload.as_ref()).unwrap()).collect()
}

/// `datalad clone` of the dataset `bare` into `clone` and `datalad get` of everything (with
/// `env` for git-annex's S3 remote); then every file of `sent` must be in it with the same data
/// set bytes, and nothing else.
pub fn assert_datalad_gets_every_instance(bare: &Path, clone: &Path, env: &[(&str, String)], sent: &[PathBuf]) {
    let env = || env.iter().map(|(k, v)| (*k, v.as_str()));
    run_ok(Command::new("datalad").envs(env()).arg("clone").arg(bare).arg(clone));
    run_ok(Command::new("datalad").envs(env()).current_dir(clone).args(["get", "-r", "."]));
    let mut got: HashMap<String, PathBuf> = HashMap::new();
    for entry in walkdir::WalkDir::new(clone).into_iter().filter_entry(|e| e.file_name() != ".git") {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(sop) = name.strip_suffix(".dcm") {
            got.insert(sop.to_owned(), entry.path().to_path_buf());
        }
    }
    assert_eq!(got.len(), sent.len(), "DICOM files in the dataset {}: {got:?}", bare.display());
    for f in sent {
        let sop = sop_instance_uid(f).unwrap();
        let mine = got.get(&sop).unwrap_or_else(|| panic!("{sop} not in the dataset"));
        assert_eq!(dataset_bytes(mine).unwrap(), dataset_bytes(f).unwrap(), "data set bytes differ for {sop}");
    }
}

/// The last `n` lines of `text` (a failed command's output can be long; what explains the
/// failure is at its end, and CI logs cut long messages in the middle).
pub fn tail(text: &[u8], n: usize) -> String {
    let text = String::from_utf8_lossy(text);
    let lines: Vec<&str> = text.lines().collect();
    let skipped = lines.len().saturating_sub(n);
    let mut out = if skipped > 0 { format!("[{skipped} lines before these]\n") } else { String::new() };
    out.push_str(&lines[skipped..].join("\n"));
    out
}

/// Runs `cmd`: its stdout, or a panic with the end of its stdout and stderr.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        tail(&out.stdout, 40),
        tail(&out.stderr, 60)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What [`check_end_state`] looks at, wherever the site runs (processes of the fault suite, or
/// the swarm stack of the deploy test).
pub struct SiteView<'a> {
    /// A client of the site's NATS.
    pub bus: &'a Bus,
    /// The bare repository of a forge project (by its path).
    pub repo: &'a dyn Fn(&str) -> PathBuf,
    /// Where DataLad clones go (one directory per study, made by the check).
    pub clones: PathBuf,
    /// The environment DataLad and git-annex need to get the data (S3 credentials, ...).
    pub annex_env: Vec<(&'static str, String)>,
    /// The receiver's spool directory.
    pub spool: PathBuf,
    /// The uploader's and indexers' work directory.
    pub work: PathBuf,
    /// The services' last log lines, for a failure's message.
    pub logs: &'a dyn Fn() -> String,
}

/// Every message of `stream`, decoded.
pub async fn all<M: prost::Message + Default>(bus: &Bus, stream: &str) -> Vec<M> {
    decode(&messages(bus, stream).await)
}

/// Messages stored in `stream` now.
pub async fn count(bus: &Bus, stream: &str) -> u64 {
    let mut st = bus.js.get_stream(stream).await.unwrap();
    st.info().await.unwrap().state.messages
}

/// Sends the files under `dir` with DCMTK's storescu: `Ok` when every store succeeded, else
/// storescu's output.
pub async fn send(port: u16, dir: &Path) -> Result<(), String> {
    let out = tokio::process::Command::new("/usr/bin/storescu")
        .env("TCP_NODELAY", "1")
        .args(["-aec", "BIDSFLUX", "127.0.0.1", &port.to_string(), "+sd", "+r", "-to", "10", "-ta", "10"])
        .arg(dir)
        .output()
        .await
        .map_err(|e| format!("run storescu: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// Sends until a send succeeds as a whole, as a scanner's operator resends a failed transfer:
/// up to `attempts` sends half a second apart.
pub async fn send_until_accepted_within(port: u16, dir: &Path, attempts: usize) {
    let mut last = String::new();
    for _ in 0..attempts {
        match send(port, dir).await {
            Ok(()) => return,
            Err(out) => last = out,
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("{} was never accepted; storescu said:\n{last}", dir.display());
}

/// [`send_until_accepted_within`] 20 attempts.
pub async fn send_until_accepted(port: u16, dir: &Path) {
    send_until_accepted_within(port, dir, 20).await;
}

/// Waits until every instance sent is in a completed generation and every completed generation
/// of `sent` is indexed (those of `dead` dead-lettered instead), then checks the end state every
/// scenario shares, and prints the figures docs/reliability.md reports (`scenario:` lines).
pub async fn check_end_state(
    scenario: &str,
    site: &SiteView<'_>,
    sent: &[(PathBuf, GeneratedStudy)],
    dead: &[(PathBuf, GeneratedStudy)],
) {
    let bus = site.bus;
    let started = std::time::Instant::now();
    let want: BTreeMap<String, u64> =
        sent.iter().chain(dead).map(|(_, g)| (g.study_instance_uid.clone(), g.files.len() as u64)).collect();
    let dead_studies: BTreeSet<String> = dead.iter().map(|(_, g)| g.study_instance_uid.clone()).collect();
    // Done when every instance sent is in a completed generation and every completed
    // generation is indexed (or, for the studies expected to fail, dead-lettered).
    let result = wait_until("every instance completed and indexed", Duration::from_secs(300), || async {
        let completed: Vec<pb::StudyCompleted> = all(bus, s::STREAM_STUDIES).await;
        let mut in_generations: BTreeMap<String, u64> = BTreeMap::new();
        let mut generations = BTreeSet::new();
        for c in &completed {
            if generations.insert((c.study_instance_uid.clone(), c.generation)) {
                *in_generations.entry(c.study_instance_uid.clone()).or_default() += c.generation_instance_count;
            }
        }
        let indexed: Vec<pb::StudyIndexed> = all(bus, s::STREAM_INDEXED).await;
        let dead: Vec<pb::DeadLetter> = all(bus, s::STREAM_DEADLETTER).await;
        let mut done: BTreeSet<(String, u32)> =
            indexed.iter().map(|e| (e.study_instance_uid.clone(), e.generation)).collect();
        let dead_done: BTreeSet<&str> = dead.iter().map(|d| d.study_instance_uid.as_str()).collect();
        done.extend(generations.iter().filter(|(study, _)| dead_done.contains(study.as_str())).cloned());
        (in_generations == want && done == generations).then_some(indexed)
    })
    .await;
    let indexed = result.unwrap_or_else(|e| panic!("{e}\n{}", (site.logs)()));
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
    let sent_n: usize = sent.iter().chain(dead).map(|(_, g)| g.files.len()).sum();
    let indexed_n: usize = sent.iter().map(|(_, g)| g.files.len()).sum();
    let dead_letters: Vec<pb::DeadLetter> = all(bus, s::STREAM_DEADLETTER).await;
    println!(
        "scenario: {scenario}: {} studies, {sent_n} instances sent, {} acknowledged (distinct), {} InstanceStored \
         events ({} repeats of a resend, de-duplicated downstream), {indexed_n} indexed in {} generations, \
         {} dead letters, done {:.0} s after the last fault",
        sent.len() + dead.len(),
        distinct.len(),
        stored.len(),
        stored.len() - distinct.len(),
        commits.len(),
        dead_letters.len(),
        waited.as_secs_f64(),
    );
    assert_eq!(distinct.len(), sent_n, "every instance sent was stored");
    // Only the expected dead letters: one per expected study, from the uploader.
    let unexpected: Vec<_> = dead_letters
        .iter()
        .filter(|d| !dead_studies.contains(&d.study_instance_uid))
        .map(|d| (&d.service, &d.reason))
        .collect();
    assert!(unexpected.is_empty(), "dead letters: {unexpected:?}");
    let lettered: BTreeSet<String> = dead_letters.iter().map(|d| d.study_instance_uid.clone()).collect();
    assert_eq!(lettered, dead_studies, "the studies expected to fail are dead-lettered");
    let completed: Vec<pb::StudyCompleted> = all(bus, s::STREAM_STUDIES).await;
    let per_generation: BTreeSet<(String, u32)> = completed
        .iter()
        .filter(|c| !dead_studies.contains(&c.study_instance_uid))
        .map(|c| (c.study_instance_uid.clone(), c.generation))
        .collect();
    assert_eq!(per_generation.len(), commits.len(), "one completion per generation: {per_generation:?}");

    for (_, g) in sent {
        let ev = indexed.iter().find(|e| e.study_instance_uid == g.study_instance_uid).unwrap();
        let n = generations[&g.study_instance_uid];
        let bare = (site.repo)(&ev.project_path);
        let log = Command::new("git")
            .args(["-c", "safe.directory=*", "--git-dir"])
            .arg(&bare)
            .args(["rev-list", "--count", "main"])
            .output();
        let log = String::from_utf8_lossy(&log.unwrap().stdout).trim().to_owned();
        assert_eq!(log, (n + 1).to_string(), "{}: a new-dataset commit and one per generation", ev.project_path);
        // DataLad as the oracle: every DICOM back, byte for byte.
        let clone = site.clones.join(&g.study_instance_uid);
        assert_datalad_gets_every_instance(&bare, &clone, &site.annex_env, &g.files);
    }

    // Nothing left behind: the lifecycle deleted every indexed file (a dead-lettered study's
    // files stay, every one of them, for the operator), the work directories are empty.
    let spool = site.spool.clone();
    let kept: BTreeMap<String, usize> =
        dead.iter().map(|(_, g)| (g.study_instance_uid.clone(), g.files.len())).collect();
    let spooled = || {
        let mut per_study: BTreeMap<String, usize> = BTreeMap::new();
        for e in walkdir::WalkDir::new(&spool).into_iter().filter_map(Result::ok) {
            if e.file_type().is_file() && e.path().extension().is_some_and(|x| x == "dcm") {
                if let Ok(p) = SpoolPath::parse_under(&spool, e.path()) {
                    *per_study.entry(p.study().to_string()).or_default() += 1;
                } else {
                    *per_study.entry(e.path().display().to_string()).or_default() += 1;
                }
            }
        }
        per_study
    };
    let leftover = wait_until("the spool emptied by the lifecycle", Duration::from_secs(60), || {
        let done = spooled() == kept;
        async move { done.then_some(()) }
    })
    .await;
    assert!(leftover.is_ok(), "spool files {:?}, want {kept:?}\n{}", spooled(), (site.logs)());
    // Each process's claimed scratch directory holds its lock only; a killed one's is gone
    // (removed by its successor).
    let work: Vec<PathBuf> = walkdir::WalkDir::new(&site.work)
        .min_depth(3)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_name() != ".lock")
        .map(|e| e.path().to_path_buf())
        .collect();
    assert!(work.is_empty(), "work files left: {work:?}");
}
