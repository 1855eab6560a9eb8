//! Memory and CPU of each service while one large study goes through the whole site, for sizing
//! the stack's memory limits (`docs/deploy.md`, "Memory") and a site's servers.
//!
//! ```sh
//! make bench-memory
//! # = cargo build --release --workspace --bins && cargo bench -p bidsflux-e2e --bench memory
//! ```
//!
//! The site of the fault suite (`bidsflux_testsupport::site`): `nats-server`, the embedded S3
//! server, the provisioner, then the receiver, study-completion, the uploader and one indexer,
//! each its own process (release build), the local forge. One study of
//! `BENCH_SERIES` × `BENCH_PER_SERIES` MR instances of 256×256 (defaults 8 × 1000: 8000
//! instances of 131 884 bytes, 1.05 GB) is sent with DCMTK's `storescu` and followed until it is
//! indexed. Every 50 ms the resident memory of each service's process tree (the service and the
//! programs it runs: `git`, `git-annex`) is read from `/proc`; the peak of that sum is what a
//! container's memory limit must hold (page cache aside, which the kernel reclaims before it kills).
//! CPU is user + system time of the process and of the children it waited for.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::print_stdout)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bidsflux_messaging::{Bus, subjects as s};
use bidsflux_testsupport::dicom::{StudySpec, generate_study};
use bidsflux_testsupport::site::{Service, Site};
use bidsflux_testsupport::wait_until;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Resident set size of `pid` in bytes (0 when it is gone).
fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|t| t.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        .map_or(0, |pages| pages * 4096)
}

/// Every process's parent, from `/proc/<pid>/stat`.
fn parents() -> HashMap<u32, u32> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return out };
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // After the command's ")": state, then the parent's pid.
        if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r)
            && let Some(ppid) = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok())
        {
            out.insert(pid, ppid);
        }
    }
    out
}

/// Resident memory of `root` and all its descendants.
fn tree_rss(root: u32, parents: &HashMap<u32, u32>) -> u64 {
    parents
        .keys()
        .filter(|&&pid| {
            let mut p = pid;
            for _ in 0..64 {
                if p == root {
                    return true;
                }
                match parents.get(&p) {
                    Some(&pp) if pp != p && pp != 0 => p = pp,
                    _ => return false,
                }
            }
            false
        })
        .map(|&pid| rss(pid))
        .sum()
}

/// User + system CPU seconds of `pid` and of the children it waited for.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    let Some((_, rest)) = stat.rsplit_once(')') else { return 0.0 };
    // Fields after ")" start at field 3 (state): utime is 14, stime 15, cutime 16, cstime 17.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = (11..=14).filter_map(|i| f.get(i).and_then(|v| v.parse::<u64>().ok())).sum();
    ticks as f64 / 100.0
}

/// `VmHWM` of `pid` (the process's own peak resident memory) in bytes.
fn vm_hwm(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| l.strip_prefix("VmHWM:").and_then(|v| v.trim().trim_end_matches(" kB").parse().ok()))
        })
        .map_or(0, |kb: u64| kb * 1024)
}

const MIB: f64 = 1024.0 * 1024.0;

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; nothing to filter here.
    let series = env_or("BENCH_SERIES", 8);
    let per_series = env_or("BENCH_PER_SERIES", 1000);
    let site = Site::start(&[("BIDSFLUX_QUIET_PERIOD", "5s"), ("RUST_LOG", "warn")], 1).await.unwrap();
    let mut procs: Vec<(&str, u32)> = vec![("nats-server", site.nats.pid().unwrap())];
    for (name, svc) in [
        ("receiver", Service::Receiver),
        ("study-completion", Service::StudyCompletion),
        ("uploader", Service::Uploader),
        ("indexer", Service::Indexer),
    ] {
        procs.push((name, site.pid(svc, 0).unwrap()));
    }
    let bus = Bus::connect(&site.nats.url, "bench-memory", Duration::from_secs(5)).await.unwrap();

    let study_dir = site.dir.path().join("study");
    let spec = StudySpec { series, instances_per_series: per_series, rows: 256, columns: 256, ..StudySpec::default() };
    let study = generate_study(&study_dir, &spec).unwrap();
    let bytes: u64 = study.files.iter().map(|f| std::fs::metadata(f).unwrap().len()).sum();
    println!("memory: study of {} instances, {:.0} MB", study.files.len(), bytes as f64 / 1e6);

    let idle: Vec<u64> = procs.iter().map(|&(_, pid)| tree_rss(pid, &parents())).collect();
    let cpu0: Vec<f64> = procs.iter().map(|&(_, pid)| cpu_seconds(pid)).collect();
    let peaks = Arc::new(Mutex::new(idle.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peaks, stop, pids) = (peaks.clone(), stop.clone(), procs.iter().map(|p| p.1).collect::<Vec<_>>());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let parents = parents();
                let now: Vec<u64> = pids.iter().map(|&pid| tree_rss(pid, &parents)).collect();
                let mut peaks = peaks.lock().unwrap();
                for (p, n) in peaks.iter_mut().zip(now) {
                    *p = (*p).max(n);
                }
                drop(peaks);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    let started = Instant::now();
    let out = std::process::Command::new("/usr/bin/storescu")
        .env("TCP_NODELAY", "1")
        .args(["-aet", "STORESCU", "-aec", "BIDSFLUX", "127.0.0.1", &site.dicom_port.to_string(), "+sd", "+r"])
        .arg(&study_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "storescu: {}", String::from_utf8_lossy(&out.stderr));
    let sent = started.elapsed();
    let bus_ref = &bus;
    wait_until("the study indexed", Duration::from_secs(1800), || async move {
        let mut st = bus_ref.js.get_stream(s::STREAM_INDEXED).await.ok()?;
        (st.info().await.ok()?.state.messages >= 1).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", site.log_tails(20)));
    let indexed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let mut dead = bus.js.get_stream(s::STREAM_DEADLETTER).await.unwrap();
    assert_eq!(dead.info().await.unwrap().state.messages, 0, "dead letters:\n{}", site.log_tails(20));

    println!(
        "memory: sent in {:.1} s, indexed {:.1} s after the first instance",
        sent.as_secs_f64(),
        indexed.as_secs_f64()
    );
    println!();
    println!(
        "| process | idle RSS (MiB) | peak RSS, with children (MiB) | peak RSS, own (VmHWM, MiB) | CPU s | CPU s per GB |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let peaks = peaks.lock().unwrap();
    for (i, &(name, pid)) in procs.iter().enumerate() {
        let cpu = cpu_seconds(pid) - cpu0[i];
        println!(
            "| {name} | {:.0} | {:.0} | {:.0} | {:.1} | {:.2} |",
            idle[i] as f64 / MIB,
            peaks[i] as f64 / MIB,
            vm_hwm(pid) as f64 / MIB,
            cpu,
            cpu / (bytes as f64 / 1e9)
        );
    }
}
