#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! A 1 GiB instance through the real binary, as a scanner would send it: the
//! receiver answers Success, the spooled data set is byte for byte the one
//! sent, and the receiver's peak RSS stays under 64 MiB (bounded memory whatever
//! the instance size: see `docs/adr/0003-receiver-durability.md`).
//!
//! The instance (Multi-frame Grayscale Word Secondary Capture, 2048 frames of
//! 512×512 16-bit) is written to disk in 1 MiB chunks, never held in memory;
//! DCMTK's `storescu` sends it; data sets are compared by streamed SHA-256. About 2 GiB of temp disk, freed at the end.

mod common;

use std::io::{BufWriter, Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bidsflux_messaging::{Bus, subjects, topology};
use bidsflux_proto::v1 as pb;
use bidsflux_testsupport::{NatsServer, dicom::new_uid, free_port, wait_until};
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use prost::Message as _;

const AE: &str = "BIDSFLUX";
const ROWS: u16 = 512;
const COLUMNS: u16 = 512;
const FRAMES: u32 = 2048;
/// 2 bytes a pixel: 512 KiB a frame, 1 GiB in all.
const PIXEL_BYTES: u64 = ROWS as u64 * COLUMNS as u64 * 2 * FRAMES as u64;
/// Peak resident memory the receiver may reach.
const MAX_RSS_KIB: u64 = 64 * 1024;
/// Free space the test needs in the temp directory (the sent file, the spool copy, some margin).
const MIN_FREE_BYTES: u64 = 4 << 30;
/// Write unit.
const CHUNK: usize = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_instance_is_stored_with_bounded_memory() {
    assert!(Path::new("/usr/bin/storescu").is_file(), "DCMTK's storescu is needed (apt-get install dcmtk)");
    let tmp = tempfile::tempdir().unwrap();
    let free = free_bytes(tmp.path());
    assert!(
        free >= MIN_FREE_BYTES,
        "{} has {} MiB free; this test needs at least {} MiB (a 1 GiB file is sent and spooled)",
        tmp.path().display(),
        free >> 20,
        MIN_FREE_BYTES >> 20
    );

    let nats = NatsServer::start().await.unwrap();
    let bus = Bus::connect(&nats.url, "large-instance-test", Duration::from_secs(10)).await.unwrap();
    topology::declare(&bus.js).await.unwrap();

    let started = Instant::now();
    let file = tmp.path().join("large.dcm");
    let sent = write_large_instance(&file);
    eprintln!("wrote {} MiB in {:?}", sent.file_size >> 20, started.elapsed());

    let spool = tmp.path().join("spool");
    let receiver = Receiver::start(&nats.url, &spool, tmp.path()).await;

    let started = Instant::now();
    let out = tokio::time::timeout(
        Duration::from_secs(600),
        tokio::process::Command::new("/usr/bin/storescu")
            .args(["-v", "-R", "-aet", "SCANNER", "-aec", AE, "127.0.0.1", &receiver.port.to_string()])
            .arg(&file)
            .env("TCP_NODELAY", "1")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("storescu finishes within 10 minutes")
    .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let peak_rss_kib = receiver.peak_rss_kib();
    eprintln!("sent in {:?}; receiver peak RSS {} KiB", started.elapsed(), peak_rss_kib);
    assert!(
        text.contains("Received Store Response (Success)"),
        "storescu did not get Success:\n{text}\nreceiver log:\n{}",
        receiver.log()
    );

    // The spool holds one file whose data set is the one sent, and the event says so.
    let files = common::spool_files_in(&spool);
    assert_eq!(files.len(), 1, "spool files: {files:?}");
    let (spool_file, sent_file) = (files[0].clone(), file.clone());
    let (spooled, sent_hash) = tokio::join!(
        tokio::task::spawn_blocking(move || dataset_sha256(&spool_file)),
        tokio::task::spawn_blocking(move || dataset_sha256(&sent_file)),
    );
    let (spooled, sent_hash) = (spooled.unwrap(), sent_hash.unwrap());
    assert_eq!(spooled, sent_hash, "the spooled data set differs from the sent one");
    let stream = bus.js.get_stream(subjects::STREAM_INSTANCES).await.unwrap();
    assert_eq!(stream.get_info().await.unwrap().state.messages, 1);
    let event = pb::InstanceStored::decode(stream.get_raw_message(1).await.unwrap().payload).unwrap();
    assert_eq!(event.sop_instance_uid, sent.sop_instance_uid);
    assert_eq!(event.dataset_sha256, sent_hash);
    assert_eq!(event.file_size, std::fs::metadata(&files[0]).unwrap().len());
    assert!(event.file_size > PIXEL_BYTES);

    assert!(
        peak_rss_kib < MAX_RSS_KIB,
        "receiver peak RSS {peak_rss_kib} KiB is not under {MAX_RSS_KIB} KiB\nreceiver log:\n{}",
        receiver.log()
    );
    receiver.stop().await;
    // The temp dir (the 1 GiB file and the spool) goes with `tmp`.
}

/// The instance as written.
struct Sent {
    sop_instance_uid: String,
    file_size: u64,
}

/// Writes the Part 10 file: meta and attributes through dicom-object, then the Pixel Data
/// element header and 1 GiB of pixels streamed in chunks (each chunk tagged with its index,
/// so reordered or repeated chunks change the hash).
fn write_large_instance(path: &Path) -> Sent {
    let sop = new_uid();
    let str_el = |tag, vr, v: &str| DataElement::new(tag, vr, PrimitiveValue::from(v));
    let us = |tag, v: u16| DataElement::new(tag, VR::US, PrimitiveValue::from(v));
    let obj = InMemDicomObject::from_element_iter([
        str_el(tags::SOP_CLASS_UID, VR::UI, uids::MULTI_FRAME_GRAYSCALE_WORD_SECONDARY_CAPTURE_IMAGE_STORAGE),
        str_el(tags::SOP_INSTANCE_UID, VR::UI, &sop),
        str_el(tags::STUDY_DATE, VR::DA, "20261127"),
        str_el(tags::MODALITY, VR::CS, "OT"),
        str_el(tags::CONVERSION_TYPE, VR::CS, "WSD"),
        str_el(tags::SERIES_DESCRIPTION, VR::LO, "large-instance"),
        str_el(tags::PATIENT_NAME, VR::PN, "Large^Instance"),
        str_el(tags::PATIENT_ID, VR::LO, "LARGE001"),
        str_el(tags::STUDY_INSTANCE_UID, VR::UI, &new_uid()),
        str_el(tags::SERIES_INSTANCE_UID, VR::UI, &new_uid()),
        str_el(tags::SERIES_NUMBER, VR::IS, "1"),
        str_el(tags::INSTANCE_NUMBER, VR::IS, "1"),
        us(tags::SAMPLES_PER_PIXEL, 1),
        str_el(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2"),
        str_el(tags::NUMBER_OF_FRAMES, VR::IS, &FRAMES.to_string()),
        us(tags::ROWS, ROWS),
        us(tags::COLUMNS, COLUMNS),
        us(tags::BITS_ALLOCATED, 16),
        us(tags::BITS_STORED, 12),
        us(tags::HIGH_BIT, 11),
        us(tags::PIXEL_REPRESENTATION, 0),
    ]);
    let file = obj
        .with_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN)
                .media_storage_sop_class_uid(uids::MULTI_FRAME_GRAYSCALE_WORD_SECONDARY_CAPTURE_IMAGE_STORAGE)
                .media_storage_sop_instance_uid(sop.as_str()),
        )
        .unwrap();
    file.write_to_file(path).unwrap();

    let mut out = BufWriter::with_capacity(CHUNK, std::fs::OpenOptions::new().append(true).open(path).unwrap());
    // (7FE0,0010) OW, explicit VR little endian: tag, VR, 2 reserved bytes, 32-bit length.
    out.write_all(&[0xE0, 0x7F, 0x10, 0x00, b'O', b'W', 0, 0]).unwrap();
    out.write_all(&u32::try_from(PIXEL_BYTES).unwrap().to_le_bytes()).unwrap();
    // 12-bit values in a pattern; the chunk index goes in its first 8 bytes.
    let mut chunk: Vec<u8> = (0..CHUNK / 2)
        .flat_map(|k| (((k as u32).wrapping_mul(2_654_435_761) >> 20) as u16 & 0x0fff).to_le_bytes())
        .collect();
    for i in 0..PIXEL_BYTES / CHUNK as u64 {
        chunk[..8].copy_from_slice(&(i & 0x0fff_0fff_0fff_0fff).to_le_bytes());
        out.write_all(&chunk).unwrap();
    }
    out.flush().unwrap();
    Sent { sop_instance_uid: sop, file_size: std::fs::metadata(path).unwrap().len() }
}

/// SHA-256 (hex) of the data set of a Part 10 file (everything after the file meta group), streamed
/// through coreutils' `sha256sum`: the test is a debug build, where hashing 1 GiB in-process takes ~30 s.
fn dataset_sha256(path: &Path) -> String {
    let mut file = std::fs::File::open(path).unwrap();
    let mut head = [0_u8; 144];
    file.read_exact(&mut head).unwrap();
    assert!(&head[128..132] == b"DICM" && &head[136..138] == b"UL", "{} is not Part 10", path.display());
    // The meta group: its group length element, then that many bytes.
    let meta_len = u64::from(u32::from_le_bytes(head[140..144].try_into().unwrap()));
    file.seek(SeekFrom::Start(144 + meta_len)).unwrap();
    let mut child = std::process::Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run sha256sum (coreutils)");
    std::io::copy(&mut file, &mut child.stdin.take().unwrap()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "sha256sum failed");
    let text = String::from_utf8(out.stdout).unwrap();
    let hash = text.split_whitespace().next().unwrap_or_default().to_owned();
    assert_eq!(hash.len(), 64, "unexpected sha256sum output: {text}");
    hash
}

/// Bytes available to us in the file system holding `dir` (`df`, to need no extra crate).
fn free_bytes(dir: &Path) -> u64 {
    let out = std::process::Command::new("df").args(["-P", "-B1"]).arg(dir).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().nth(1).unwrap_or_else(|| panic!("unexpected df output: {text}"));
    line.split_whitespace().nth(3).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("unexpected df line: {line}"))
}

/// The `bidsflux-receiver` binary as a child process (killed on drop).
struct Receiver {
    child: tokio::process::Child,
    port: u16,
    log: PathBuf,
}

impl Receiver {
    /// Starts the binary with a minimal environment and waits until it accepts connections.
    async fn start(nats_url: &str, spool: &Path, log_dir: &Path) -> Self {
        let port = free_port().unwrap();
        let log = log_dir.join("receiver.log");
        let log_file = std::fs::File::create(&log).unwrap();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_bidsflux-receiver"))
            // Only the configuration chosen here: no allow-list, TLS or OTEL settings from the caller.
            .env_clear()
            .env("NATS_URL", nats_url)
            .env("BIDSFLUX_SPOOL_DIR", spool)
            .env("BIDSFLUX_DICOM_BIND", format!("127.0.0.1:{port}"))
            .env("BIDSFLUX_AE_TITLE", AE)
            .env("BIDSFLUX_DICOM_ACCEPT_ANY", "true")
            .env("BIDSFLUX_RECEIVER_HTTP_BIND", "127.0.0.1:0")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut receiver = Self { child, port, log };
        let listening = wait_until("the receiver to listen", Duration::from_secs(60), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok().map(|_| ())
        })
        .await;
        if let Err(e) = listening {
            let status = receiver.child.try_wait().unwrap();
            panic!("{e} (exit status {status:?})\nreceiver log:\n{}", receiver.log());
        }
        receiver
    }

    /// Peak resident set size so far (`VmHWM`), in KiB.
    fn peak_rss_kib(&self) -> u64 {
        let pid = self.child.id().expect("receiver is running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmHWM in /proc/{pid}/status"))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn stop(mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
    }
}
