//! Archive + upload of one study: the uploader against the original's way, in one run.
//!
//! `cargo bench -p bidsflux-uploader --bench archive_upload` (or `make bench-uploader`):
//!
//! 1. writes a synthetic MR study of `BENCH_FILES` (default 8192) 256×256 16-bit images, ≈ 1 GiB,
//!    whose pixels are a noisy phantom (so LZMA2 gets ≈ 2×, as on real MR data, not the 10×+ of a
//!    smooth test pattern);
//! 2. starts one S3 server on loopback (s3s-fs, the server the tests use);
//! 3. **bidsflux**: `SevenZip::build` (native 7z, `BENCH_LEVEL` default 5, one block per file,
//!    `BENCH_THREADS` default one per CPU, then MD5 + SHA-256 of the archive) and
//!    `Store::put_archive` (bucket check, HEAD, multipart upload with the service's defaults,
//!    HEAD verification);
//! 4. **original**: `7z a -t7z -mx5 -ms=off` (Debian p7zip, its default `-mmt`), then `aws s3 cp`
//!    of that archive (the aws CLI, its default multipart settings) to the same server;
//! 5. the aws CLI uploading bidsflux's archive too, so the two uploads of the same bytes compare.
//!
//! It prints a table for `docs/benchmarks.md`. Needs `/usr/bin/7z` and `aws` (`pip install awscli`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bidsflux_session::Uid;
use bidsflux_testsupport::S3Server;
use bidsflux_testsupport::dicom::{StudySpec, generate_study};
use bidsflux_uploader::archive::SevenZip;
use bidsflux_uploader::s3::Store;
use bidsflux_uploader::spool::{self, SpoolFile};

const ROWS: usize = 256;

fn env_or<T: std::str::FromStr>(var: &str, default: T) -> T {
    std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A noisy elliptical phantom with a slice-dependent pattern; background noise near zero.
fn phantom(seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut rand = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut out = Vec::with_capacity(ROWS * ROWS * 2);
    let c = ROWS as f64 / 2.0;
    for y in 0..ROWS {
        for x in 0..ROWS {
            let (dx, dy) = ((x as f64 - c) / (c * 0.8), (y as f64 - c) / (c * 0.9));
            let r2 = dx * dx + dy * dy;
            let tissue = if r2 < 1.0 {
                700.0 + 250.0 * ((x as f64 / 9.0 + seed as f64 / 7.0).sin() * (y as f64 / 13.0).cos())
            } else {
                0.0
            };
            // Roughly Gaussian noise, sigma ≈ 12.
            let r = rand();
            let noise = ((r & 0xFF) + ((r >> 8) & 0xFF) + ((r >> 16) & 0xFF) + ((r >> 24) & 0xFF)) as f64 - 510.0;
            let v = (tissue + noise * 0.16).abs().min(4095.0) as u16;
            out.extend(v.to_le_bytes());
        }
    }
    out
}

/// The study under `root/<study>/<series>/<sop>.dcm`, pixel data replaced by the phantom.
fn write_study(root: &Path, files: usize) -> (String, Vec<SpoolFile>) {
    let gen_dir = root.join("generated");
    let series = 8;
    let spec = StudySpec {
        series,
        instances_per_series: files.div_ceil(series),
        rows: ROWS as u16,
        columns: ROWS as u16,
        ..Default::default()
    };
    let study = generate_study(&gen_dir, &spec).unwrap();
    let mut out = Vec::new();
    for (i, path) in study.files.iter().enumerate() {
        let series_uid = &study.series_instance_uids[i / spec.instances_per_series];
        let sop = format!("1.2.3.{}", i + 1);
        let rel = format!("{}/{series_uid}/{sop}.dcm", study.study_instance_uid);
        let mut bytes = std::fs::read(path).unwrap();
        let pixels = phantom(i as u64);
        let at = bytes.len() - pixels.len();
        bytes[at..].copy_from_slice(&pixels);
        std::fs::create_dir_all(root.join(&rel).parent().unwrap()).unwrap();
        std::fs::write(root.join(&rel), bytes).unwrap();
        std::fs::remove_file(path).unwrap();
        out.push(SpoolFile {
            rel_path: rel,
            series_instance_uid: Uid::parse("series", series_uid).unwrap(),
            sop_instance_uid: Uid::parse("sop", &sop).unwrap(),
        });
    }
    (study.study_instance_uid, out)
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn aws_cp(s3: &S3Server, file: &Path, bucket: &str, key: &str) -> Duration {
    let t = Instant::now();
    let out = Command::new("aws")
        .args(["s3", "cp", "--only-show-errors", "--endpoint-url", &s3.endpoint])
        .arg(file)
        .arg(format!("s3://{bucket}/{key}"))
        .env("AWS_ACCESS_KEY_ID", &s3.access_key)
        .env("AWS_SECRET_ACCESS_KEY", &s3.secret_key)
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .output()
        .expect("run the aws CLI (pip install awscli)");
    assert!(out.status.success(), "aws s3 cp: {}", String::from_utf8_lossy(&out.stderr));
    t.elapsed()
}

fn main() {
    let files: usize = env_or("BENCH_FILES", 8192);
    let level: u8 = env_or("BENCH_LEVEL", 5);
    let threads: usize = env_or("BENCH_THREADS", std::thread::available_parallelism().map_or(1, |n| n.get()));
    let base: PathBuf = env_or("BENCH_DIR", PathBuf::from("/var/tmp"));
    let work = tempfile::Builder::new().prefix("bidsflux-bench-upload.").tempdir_in(&base).unwrap();
    let spool_dir = work.path().join("spool");
    println!("writing {files} files of {ROWS}x{ROWS} 16-bit under {}", work.path().display());
    let (study, listing) = write_study(&spool_dir, files);
    let unpacked: u64 = listing.iter().map(|f| std::fs::metadata(spool_dir.join(&f.rel_path)).unwrap().len()).sum();
    // Both sides start from a cold-ish page cache in the same way: drop what we can.
    let _ = Command::new("sync").status();

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let s3 =
            S3Server::start_at(&work.path().join("s3"), "127.0.0.1:0", "bench-key", "bench-secret-key").await.unwrap();
        let env = bidsflux_config::Env::from_pairs([
            ("S3_URL_PATTERN", format!("s3://{}/bench-archives", s3.addr)),
            ("AWS_ENDPOINT_URL", s3.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", s3.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", s3.secret_key.clone()),
        ]);
        let config = bidsflux_uploader::Config::from_env(&env).unwrap();
        let metas = spool::read_metas(&spool_dir, &listing[0], &Uid::parse("study", &study).unwrap()).unwrap();
        let placement = config.s3_url_pattern.place(&metas).unwrap();
        let store = Store::new(&config);

        // bidsflux: native 7z + hashes, then the verified upload.
        let z = SevenZip { level, threads };
        let t = Instant::now();
        let archive = z.build(&spool_dir, &work.path().join("work"), &format!("{study}.7z"), &listing).await.unwrap();
        let archived = t.elapsed();
        let t = Instant::now();
        store.put_archive(&placement, &placement.key("bidsflux.7z"), &archive.path, &archive.digests).await.unwrap();
        let uploaded = t.elapsed();

        // The original: 7z, then the aws CLI.
        let peer_archive = work.path().join("peer.7z");
        let t = Instant::now();
        let out = Command::new("/usr/bin/7z")
            .current_dir(&spool_dir)
            .args(["a", "-t7z", &format!("-mx{level}"), "-ms=off", "-bd", "-y"])
            .arg(&peer_archive)
            .arg(&study)
            .output()
            .unwrap();
        assert!(out.status.success(), "7z: {}", String::from_utf8_lossy(&out.stdout));
        let peer_archived = t.elapsed();
        let peer_size = std::fs::metadata(&peer_archive).unwrap().len();
        let peer_uploaded = aws_cp(&s3, &peer_archive, &placement.bucket, &placement.key("peer.7z"));
        // The aws CLI on bidsflux's own archive: the same bytes as our upload.
        let same_bytes = aws_cp(&s3, &archive.path, &placement.bucket, &placement.key("aws-same-bytes.7z"));

        let ours = archived + uploaded;
        let theirs = peer_archived + peer_uploaded;
        let size = archive.digests.size;
        println!();
        println!("study: {files} files, {:.0} MB; level {level}; {threads} compression threads", mb(unpacked));
        println!();
        println!("| step | bidsflux | 7z + aws CLI | ratio |");
        println!("|---|---|---|---|");
        println!(
            "| archive (+ MD5/SHA-256 for bidsflux) | {:.1} s ({:.0} MB/s in) | {:.1} s ({:.0} MB/s in) | {:.2}× |",
            secs(archived),
            mb(unpacked) / secs(archived),
            secs(peer_archived),
            mb(unpacked) / secs(peer_archived),
            secs(peer_archived) / secs(archived)
        );
        println!(
            "| archive size | {:.0} MB ({:.2}×) | {:.0} MB ({:.2}×) | |",
            mb(size),
            unpacked as f64 / size as f64,
            mb(peer_size),
            unpacked as f64 / peer_size as f64
        );
        println!(
            "| upload (bidsflux: verified multipart) | {:.2} s ({:.0} MB/s) | {:.2} s ({:.0} MB/s) | |",
            secs(uploaded),
            mb(size) / secs(uploaded),
            secs(peer_uploaded),
            mb(peer_size) / secs(peer_uploaded)
        );
        println!(
            "| upload of bidsflux's archive | {:.2} s ({:.0} MB/s) | {:.2} s ({:.0} MB/s) | {:.2}× |",
            secs(uploaded),
            mb(size) / secs(uploaded),
            secs(same_bytes),
            mb(size) / secs(same_bytes),
            secs(same_bytes) / secs(uploaded)
        );
        println!(
            "| **archive + upload** | **{:.1} s** | **{:.1} s** | **{:.2}×** |",
            secs(ours),
            secs(theirs),
            secs(theirs) / secs(ours)
        );
        s3.stop();
    });
}
