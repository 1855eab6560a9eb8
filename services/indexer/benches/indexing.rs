//! Indexer benchmarks: `cargo bench -p bidsflux-indexer --bench indexing` (both, one after the
//! other; `BENCH_ONLY=session` or `BENCH_ONLY=replicas` for one):
//!
//! - `session_vs_datalad`: time to index one session of `BENCH_FILES` (default 1000) DICOM files —
//!   `ArchiveStored` published → `StudyIndexed` received, session dataset pushed to the local forge
//!   and recorded in the study superdataset (the first session of the group also creates the
//!   superdataset and the BIDS dataset; a second session is timed too) —
//!   against the original's way on the same 7z: `datalad create`, the archive saved into the
//!   dataset, `datalad add-archive-content --strip-leading-dirs` (DataLad from PyPI).
//! - `replicas`: `BENCH_SESSIONS` (default 16) sessions of `BENCH_SESSION_FILES` (default 250)
//!   files indexed by one replica, then by two (each its own `bidsflux-indexer` process with
//!   `BIDSFLUX_INDEXER_CONCURRENCY=1`, sharing the work queue): throughput ratio. Sessions are participants of `BENCH_GROUPS`
//!   (default 1) study groups in turn; in one group, replicas also race on its superdataset.
//! - `scaling`: the same on the fake GitLab with the latency of a GitLab on another host
//!   (`BENCH_GITLAB_API_MS`, default 50, before every REST call; `BENCH_GITLAB_GIT_MS`, default
//!   250, before every git smart-HTTP request, two per push or fetch), `BENCH_SESSIONS` sessions
//!   of `BENCH_SESSION_FILES` (default 1000 here) files indexed by 1, 2 and 4 replicas
//!   (`BENCH_REPLICAS`, e.g. `1,2,4,8`): throughput ratios, and the CPU time each session costs —
//!   the replicas' own and that of the git processes they ran (`/proc/<pid>/stat`: utime, stime,
//!   cutime, cstime). Not run by default (`BENCH_ONLY=scaling`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::print_stdout)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use bidsflux_fake_gitlab::{FakeGitlab, Latency};
use bidsflux_messaging::subjects;
use bidsflux_proto::v1 as pb;
use bidsflux_testsupport::dicom::StudySpec;
use futures::StreamExt as _;
use prost::Message as _;
use support::{Harness, archive_study, publish, replicas_pulling, run_datalad, spawn_replica};

fn env_or(var: &str, default: usize) -> usize {
    std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Waits for `n` `StudyIndexed` on `sub`.
async fn indexed(sub: &mut async_nats::Subscriber, n: usize) {
    for _ in 0..n {
        let msg = tokio::time::timeout(Duration::from_secs(600), sub.next()).await.expect("StudyIndexed").unwrap();
        pb::StudyIndexed::decode(msg.payload.as_ref()).unwrap();
    }
}

/// A session of `files` files; each call is another participant, in one of
/// `BENCH_GROUPS` (default 1) study groups in turn (its own subdataset of
/// that group's study superdataset).
fn spec(files: usize) -> StudySpec {
    static PARTICIPANT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = PARTICIPANT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let groups = env_or("BENCH_GROUPS", 1).max(1);
    let series = 4;
    StudySpec {
        series,
        instances_per_series: files.div_ceil(series),
        patient_name: format!("sub-{n:03}^ses-1"),
        study_description: format!("Brain^Study{}", n % groups + 1),
        ..StudySpec::default()
    }
}

async fn session_vs_datalad() {
    let files = env_or("BENCH_FILES", 1000);
    let h = Harness::start().await;
    let archived = archive_study(&h, spec(files)).await;
    let msg = &archived.message;
    let second = archive_study(&h, spec(files)).await.message;
    let mut sub = h.bus.client.subscribe(subjects::STUDY_INDEXED).await.unwrap();
    let t = Instant::now();
    publish(&h, msg).await;
    indexed(&mut sub, 1).await;
    let ours = t.elapsed();
    // The next session of the group only adds its entry to the superdataset.
    let t = Instant::now();
    publish(&h, &second).await;
    indexed(&mut sub, 1).await;
    let next = t.elapsed();

    // The original's steps on the same archive.
    let location = msg.location.clone().unwrap();
    let archive = h.s3.root().join(&location.bucket).join(&location.key);
    let ds = h.tmp.path().join("datalad-ds");
    let t = Instant::now();
    run_datalad(&h, h.tmp.path(), &["create", "-c", "text2git", ds.to_str().unwrap()]).await;
    let created = t.elapsed();
    std::fs::copy(&archive, ds.join(&msg.archive_name)).unwrap();
    let t = Instant::now();
    run_datalad(&h, &ds, &["save", "-m", "archive", &msg.archive_name]).await;
    let saved = t.elapsed();
    let t = Instant::now();
    run_datalad(&h, &ds, &["add-archive-content", "--strip-leading-dirs", &msg.archive_name]).await;
    let added = t.elapsed();
    let theirs = created + saved + added;

    println!();
    println!("one session of {} files ({} in the archive's manifest)", files, msg.manifest.len());
    println!("| step | time |");
    println!("|---|---|");
    println!(
        "| bidsflux indexer, first session of the group: ArchiveStored → StudyIndexed (session dataset, \
         study superdataset and BIDS dataset created and pushed) | {:.2} s |",
        ours.as_secs_f64()
    );
    println!(
        "| bidsflux indexer, next session of the group (session dataset, superdataset entry) | {:.2} s |",
        next.as_secs_f64()
    );
    println!("| datalad create | {:.2} s |", created.as_secs_f64());
    println!("| datalad save (the 7z) | {:.2} s |", saved.as_secs_f64());
    println!("| datalad add-archive-content --strip-leading-dirs | {:.2} s |", added.as_secs_f64());
    println!("| DataLad total (no push) | {:.2} s |", theirs.as_secs_f64());
    println!("| **ratio, first session** | **{:.1}×** |", theirs.as_secs_f64() / ours.as_secs_f64());
    println!("| **ratio, next session** | **{:.1}×** |", theirs.as_secs_f64() / next.as_secs_f64());
    h.shutdown().await;
}

/// Time for `replicas` indexer processes (as swarm replicas run: each its own
/// process) to index `sessions` sessions.
async fn index_with(replicas: usize, sessions: usize, files: usize) -> Duration {
    let h = Harness::start().await;
    // Only the processes index: the harness's in-process indexer stops.
    h.stop.cancel();
    let mut processes = Vec::new();
    for i in 0..replicas {
        processes.push(spawn_replica(&h, &h.tmp.path().join(format!("work-{i}")), &[]));
    }
    replicas_pulling(&h, replicas).await;
    let mut messages = Vec::new();
    for _ in 0..sessions {
        messages.push(archive_study(&h, spec(files)).await.message);
    }
    let took = index_all(&h, &messages).await;
    stop(processes).await;
    h.shutdown().await;
    took
}

/// Publishes `messages` and waits until every session is indexed: the time it took.
async fn index_all(h: &Harness, messages: &[pb::ArchiveStored]) -> Duration {
    let mut sub = h.bus.client.subscribe(subjects::STUDY_INDEXED).await.unwrap();
    let t = Instant::now();
    for m in messages {
        publish(h, m).await;
    }
    indexed(&mut sub, messages.len()).await;
    t.elapsed()
}

/// Kills the replica processes.
async fn stop(processes: Vec<tokio::process::Child>) {
    for mut p in processes {
        let _ = p.start_kill();
        let _ = p.wait().await;
    }
}

async fn replicas() {
    let (sessions, files) = (env_or("BENCH_SESSIONS", 16), env_or("BENCH_SESSION_FILES", 250));
    let one = index_with(1, sessions, files).await;
    let two = index_with(2, sessions, files).await;
    println!();
    let groups = env_or("BENCH_GROUPS", 1);
    println!("{sessions} sessions of {files} files in {groups} study group(s), each replica indexing one at a time");
    println!("| replicas | time | sessions/min |");
    println!("|---|---|---|");
    for (n, t) in [(1, one), (2, two)] {
        println!("| {n} | {:.1} s | {:.1} |", t.as_secs_f64(), sessions as f64 * 60.0 / t.as_secs_f64());
    }
    println!("| **2 ÷ 1** | | **{:.2}×** |", one.as_secs_f64() / two.as_secs_f64());
}

/// CPU seconds of process `pid` and of the children it waited for (its git processes):
/// utime + stime + cutime + cstime of `/proc/<pid>/stat`.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After "pid (comm) ": state is field 3, utime..cstime are fields 14..17.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = fields[11..15].iter().map(|v| v.parse::<u64>().unwrap()).sum();
    let hz = std::process::Command::new("getconf").arg("CLK_TCK").output().unwrap();
    let hz: f64 = String::from_utf8_lossy(&hz.stdout).trim().parse().unwrap();
    ticks as f64 / hz
}

/// `replicas` indexer processes index `sessions` sessions of `files` files on the fake GitLab
/// answering after `latency`: wall time, and CPU seconds of the replicas with their git.
/// One run of [`index_on_gitlab`].
struct Run {
    took: Duration,
    cpu: f64,
    api_requests: usize,
    git_requests: usize,
}

async fn index_on_gitlab(replicas: usize, sessions: usize, files: usize, latency: Latency) -> Run {
    let fake = FakeGitlab::start().await.unwrap();
    let (_, token) = fake.add_user("dicom_bot", false);
    let url = fake.url();
    let h = Harness::start_gitlab(&fake, &token, &[]).await;
    h.stop.cancel();
    let forge = [("BIDSFLUX_FORGE", "gitlab"), ("GITLAB_URL", url.as_str()), ("GITLAB_TOKEN", token.as_str())];
    let mut processes = Vec::new();
    for i in 0..replicas {
        processes.push(spawn_replica(&h, &h.tmp.path().join(format!("work-{i}")), &forge));
    }
    replicas_pulling(&h, replicas).await;
    let mut messages = Vec::new();
    for _ in 0..sessions {
        messages.push(archive_study(&h, spec(files)).await.message);
    }
    let before: f64 = processes.iter().map(|p| cpu_seconds(p.id().unwrap())).sum();
    fake.set_latency(latency);
    let logged = fake.request_log().len();
    let took = index_all(&h, &messages).await;
    let after: f64 = processes.iter().map(|p| cpu_seconds(p.id().unwrap())).sum();
    let log = fake.request_log();
    let api_requests = log[logged..].iter().filter(|r| r.path.starts_with("/api/v4/")).count();
    let git_requests = log.len() - logged - api_requests;
    stop(processes).await;
    h.shutdown().await;
    Run { took, cpu: after - before, api_requests, git_requests }
}

async fn scaling() {
    let (sessions, files) = (env_or("BENCH_SESSIONS", 16), env_or("BENCH_SESSION_FILES", 1000));
    let latency = Latency {
        api: Duration::from_millis(env_or("BENCH_GITLAB_API_MS", 50) as u64),
        git: Duration::from_millis(env_or("BENCH_GITLAB_GIT_MS", 250) as u64),
    };
    let replicas: Vec<usize> = std::env::var("BENCH_REPLICAS")
        .unwrap_or_else(|_| "1,2,4".into())
        .split(',')
        .map(|n| n.trim().parse().unwrap())
        .collect();
    let mut runs = Vec::new();
    for &n in &replicas {
        runs.push((n, index_on_gitlab(n, sessions, files, latency).await));
    }
    let groups = env_or("BENCH_GROUPS", 1);
    println!();
    println!(
        "{sessions} sessions of {files} files in {groups} study group(s) on the fake GitLab, {} ms before each API \
         call, {} ms before each git request",
        latency.api.as_millis(),
        latency.git.as_millis()
    );
    println!(
        "| replicas | time | sessions/min | × the first row | CPU s per session (indexer + git) | API / git requests per session |"
    );
    println!("|---|---|---|---|---|---|");
    let one = runs[0].1.took.as_secs_f64();
    for (n, r) in &runs {
        let t = r.took.as_secs_f64();
        println!(
            "| {n} | {t:.1} s | {:.1} | {:.2}× | {:.2} | {:.1} / {:.1} |",
            sessions as f64 * 60.0 / t,
            one / t,
            r.cpu / sessions as f64,
            r.api_requests as f64 / sessions as f64,
            r.git_requests as f64 / sessions as f64
        );
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    if only.is_empty() || only == "session" {
        rt.block_on(session_vs_datalad());
    }
    if only.is_empty() || only == "replicas" {
        rt.block_on(replicas());
    }
    if only == "scaling" {
        rt.block_on(scaling());
    }
}
