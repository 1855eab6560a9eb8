//! Building the 7z archive of a study, natively and in parallel.
//!
//! The archive holds `<study>/<series>/<sop>.dcm` (paths relative to the
//! spool root), in byte-wise sorted order, **one file per block** (what
//! `7z a -ms=off` makes): a single DICOM can be extracted without
//! decompressing the others, which is what DataLad's archives remote does.
//!
//! Because every file is its own block, the files are compressed
//! independently, on `threads` threads at once, with liblzma's LZMA2 encoder
//! (the `liblzma` crate, xz-utils' C library built in) at the preset of the
//! configured level — `7z` itself compresses one non-solid file after the
//! other. The 7z container around the blocks is written here, following
//! `7zFormat.txt` of the LZMA SDK: a plain (not compressed) header with the
//! pack and unpack sizes, one LZMA2 (or, at level 0, Copy) coder per block,
//! the CRC-32 of every file, the names (UTF-16) and a fixed attribute (a
//! regular file, mode 0644). No timestamps are stored, so the same files at
//! the same level give the same bytes — a redelivered completion maps to the
//! same git-annex key and object key, and the archive is reproducible.
//! Debian's `7z` and DataLad (which runs `7z x`) extract it; the tests check
//! both, byte for byte.
//!
//! Memory stays bounded whatever the study: at most `2 × threads` compressed
//! files wait to be written in order, files above [`IN_MEMORY_MAX`] are
//! compressed into a spill file next to the archive instead of memory, and
//! the archive itself is written straight to disk. Each thread's encoder
//! needs its own memory on top: up to ≈ 94 MiB at level 5 (≈ 674 MiB at
//! level 9) for files larger than the level's dictionary.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};

use anyhow::Context as _;
use liblzma::stream::{Filters, LzmaOptions, Stream};
use liblzma::write::XzEncoder;

use crate::spool::{self, Digests, SpoolFile};

/// Files up to this size are read and compressed in memory; larger ones are
/// streamed into a spill file.
pub const IN_MEMORY_MAX: u64 = 8 << 20;

/// 7z signature: `'7' 'z' BC AF 27 1C`.
const SIGNATURE: [u8; 6] = [b'7', b'z', 0xBC, 0xAF, 0x27, 0x1C];
/// Format version written by 7-Zip 9.x–26.x (major 0, minor 4).
const VERSION: [u8; 2] = [0, 4];
/// Size of the signature header at the start of the file.
const SIGNATURE_HEADER_LEN: u64 = 32;
/// Windows FILE_ATTRIBUTE_ARCHIVE | FILE_ATTRIBUTE_UNIX_EXTENSION | (S_IFREG | 0644) << 16, as
/// p7zip writes for a regular file.
const FILE_ATTRIBUTES: u32 = 0x20 | 0x8000 | (0o100_644 << 16);

// Property ids of the 7z header (7zFormat.txt).
const K_END: u8 = 0x00;
const K_HEADER: u8 = 0x01;
const K_MAIN_STREAMS_INFO: u8 = 0x04;
const K_FILES_INFO: u8 = 0x05;
const K_PACK_INFO: u8 = 0x06;
const K_UNPACK_INFO: u8 = 0x07;
const K_SUBSTREAMS_INFO: u8 = 0x08;
const K_SIZE: u8 = 0x09;
const K_CRC: u8 = 0x0A;
const K_FOLDER: u8 = 0x0B;
const K_CODERS_UNPACK_SIZE: u8 = 0x0C;
const K_NAME: u8 = 0x11;
const K_ATTRIBUTES: u8 = 0x15;

/// A built archive in its own temp directory (removed on drop).
#[derive(Debug)]
pub struct Archive {
    /// Archive file name, `<study>.7z`.
    pub name: String,
    /// Its path.
    pub path: PathBuf,
    /// Size and digests of the archive file.
    pub digests: Digests,
    _dir: tempfile::TempDir,
}

/// How to build 7z archives.
#[derive(Debug, Clone)]
pub struct SevenZip {
    /// Compression level 0–9 (`-mx`): 0 stores, 1–9 are LZMA2 at xz preset 1–9.
    pub level: u8,
    /// Files compressed at once (at least 1).
    pub threads: usize,
}

impl SevenZip {
    /// Archives `files` (relative to `spool`) into `<work>/<temp>/<name>`, then hashes it.
    pub async fn build(&self, spool: &Path, work: &Path, name: &str, files: &[SpoolFile]) -> anyhow::Result<Archive> {
        tokio::fs::create_dir_all(work).await.with_context(|| format!("create work directory {}", work.display()))?;
        let dir = tempfile::Builder::new()
            .prefix("bidsflux-upload-")
            .tempdir_in(work)
            .with_context(|| format!("create temp directory in {}", work.display()))?;
        let path = dir.path().join(name);
        let (spool, out, rel) = (spool.to_owned(), path.clone(), files.iter().map(|f| f.rel_path.clone()).collect());
        let this = self.clone();
        // Dropping this future (e.g. `try_join!` after the hashing failed) stops the threads.
        let cancel = CancelOnDrop(Arc::new(AtomicBool::new(false)));
        let cancelled = cancel.0.clone();
        let digests = tokio::task::spawn_blocking(move || -> anyhow::Result<Digests> {
            this.write(&spool, rel, &out, &cancelled)?;
            spool::hash_file(&out).context("hash archive")
        })
        .await
        .context("join archiving task")??;
        Ok(Archive { name: name.to_owned(), path, digests, _dir: dir })
    }

    /// Writes the archive of `files` (paths relative to `root`, stored under those names) to
    /// `out`, which is created (never overwritten). Blocking; runs the compression threads, which
    /// stop taking files once `cancel` is set (the write then fails).
    pub fn write(
        &self,
        root: &Path,
        mut files: Vec<String>,
        out: &Path,
        cancel: &AtomicBool,
    ) -> anyhow::Result<Summary> {
        anyhow::ensure!(!files.is_empty(), "no files to archive");
        anyhow::ensure!(self.level <= 9, "compression level {} is not in 0..=9", self.level);
        files.sort_unstable();
        files.dedup();
        let spill_dir = out.parent().unwrap_or(Path::new("."));
        let mut file = File::options()
            .write(true)
            .create_new(true)
            .open(out)
            .with_context(|| format!("create archive {}", out.display()))?;
        file.write_all(&[0; SIGNATURE_HEADER_LEN as usize]).context("write archive")?;

        let threads = self.threads.clamp(1, files.len());
        let window = threads * 2;
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let written = (Mutex::new(0_usize), Condvar::new());
        let (tx, rx) = mpsc::channel::<(usize, anyhow::Result<Packed>)>();
        let mut entries = Vec::with_capacity(files.len());
        let result = std::thread::scope(|s| -> anyhow::Result<()> {
            for _ in 0..threads {
                let tx = tx.clone();
                let (files, next, stop, written) = (&files, &next, &stop, &written);
                s.spawn(move || {
                    loop {
                        if cancel.load(Ordering::Relaxed) {
                            return;
                        }
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= files.len() {
                            return;
                        }
                        // Never run more than `window` files ahead of the writer.
                        let (lock, cv) = written;
                        let mut done = lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        while i >= *done + window && !stop.load(Ordering::Relaxed) {
                            done = cv.wait(done).unwrap_or_else(std::sync::PoisonError::into_inner);
                        }
                        drop(done);
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        // A panic becomes this file's error, so the writer stops everyone
                        // instead of waiting for a file that never comes.
                        let packed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            compress(&root.join(&files[i]), self.level, spill_dir)
                        }))
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("compression thread panicked")))
                        .with_context(|| format!("archive {}", files[i]));
                        if tx.send((i, packed)).is_err() {
                            return;
                        }
                    }
                });
            }
            drop(tx);
            let mut pending = BTreeMap::new();
            let outcome = (|| -> anyhow::Result<()> {
                for (i, packed) in &rx {
                    anyhow::ensure!(!cancel.load(Ordering::Relaxed), "archiving cancelled");
                    pending.insert(i, packed);
                    while let Some(packed) = pending.remove(&entries.len()) {
                        let packed = packed?;
                        packed.body.write_to(&mut file).context("write archive")?;
                        entries.push(Entry { name: files[entries.len()].clone(), ..packed.entry });
                        let (lock, cv) = &written;
                        *lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = entries.len();
                        cv.notify_all();
                    }
                }
                anyhow::ensure!(entries.len() == files.len(), "a compression thread stopped early");
                Ok(())
            })();
            if outcome.is_err() {
                // Under the lock, so a worker between its check and its wait cannot miss it.
                let (lock, cv) = &written;
                let guard = lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                stop.store(true, Ordering::Relaxed);
                cv.notify_all();
                drop(guard);
                drop(rx);
            }
            outcome
        });
        result?;

        let packed_total: u64 = entries.iter().map(|e| e.packed).sum();
        let header = header(&entries);
        file.write_all(&header).context("write archive header")?;
        let mut start = [0_u8; SIGNATURE_HEADER_LEN as usize];
        start[..6].copy_from_slice(&SIGNATURE);
        start[6..8].copy_from_slice(&VERSION);
        start[12..20].copy_from_slice(&packed_total.to_le_bytes());
        start[20..28].copy_from_slice(&(header.len() as u64).to_le_bytes());
        start[28..32].copy_from_slice(&crc32fast::hash(&header).to_le_bytes());
        let start_crc = crc32fast::hash(&start[12..32]);
        start[8..12].copy_from_slice(&start_crc.to_le_bytes());
        file.seek(SeekFrom::Start(0)).context("write archive")?;
        file.write_all(&start).context("write archive")?;
        Ok(Summary {
            files: entries.len(),
            unpacked: entries.iter().map(|e| e.size).sum(),
            size: SIGNATURE_HEADER_LEN + packed_total + header.len() as u64,
        })
    }
}

/// Sets its flag when dropped.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// What [`SevenZip::write`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Files in the archive.
    pub files: usize,
    /// Their total size.
    pub unpacked: u64,
    /// Archive size.
    pub size: u64,
}

/// One file of the archive as the header describes it.
#[derive(Debug, Clone)]
struct Entry {
    name: String,
    size: u64,
    packed: u64,
    crc: u32,
    /// The LZMA2 dictionary property byte; `None` for the Copy coder.
    lzma2: Option<u8>,
}

/// A compressed file waiting to be written.
struct Packed {
    entry: Entry,
    body: Body,
}

enum Body {
    Memory(Vec<u8>),
    /// A spill file (already unlinked), positioned anywhere.
    Spilled(File),
}

impl Body {
    fn write_to(self, out: &mut File) -> io::Result<()> {
        match self {
            Body::Memory(bytes) => out.write_all(&bytes),
            Body::Spilled(mut f) => {
                f.seek(SeekFrom::Start(0))?;
                io::copy(&mut f, out).map(|_| ())
            }
        }
    }
}

/// The xz preset's dictionary, capped to the smallest 7z dictionary size that holds the whole
/// file (a larger one only costs the encoder memory), and its 7z property byte.
fn dictionary(level: u8, len: u64) -> (u32, u8) {
    // xz presets' dictionary sizes (xz(1)): 256 KiB, 1, 2, 4, 4, 8, 8, 16, 32, 64 MiB.
    const PRESET_DICT: [u32; 10] =
        [256 << 10, 1 << 20, 2 << 20, 4 << 20, 4 << 20, 8 << 20, 8 << 20, 16 << 20, 32 << 20, 64 << 20];
    let wanted = u64::from(PRESET_DICT[usize::from(level.min(9))]).min(len.max(4096));
    (0_u8..40).map(|p| (dict_size(p), p)).find(|(size, _)| u64::from(*size) >= wanted).unwrap_or((u32::MAX, 40))
}

/// The dictionary size that LZMA2 property byte `p` (< 40) stands for.
fn dict_size(p: u8) -> u32 {
    (2 | u32::from(p & 1)) << (p / 2 + 11)
}

/// Reads and compresses one file (a block of its own).
fn compress(path: &Path, level: u8, spill_dir: &Path) -> anyhow::Result<Packed> {
    let mut src = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let len = src.metadata().with_context(|| format!("stat {}", path.display()))?.len();
    anyhow::ensure!(len > 0, "{} is empty", path.display());
    let mut crc = crc32fast::Hasher::new();
    if level == 0 {
        // Copy coder: the block is the file itself.
        let mut bytes = Vec::new();
        if len <= IN_MEMORY_MAX {
            src.read_to_end(&mut bytes).with_context(|| format!("read {}", path.display()))?;
            crc.update(&bytes);
            let entry = Entry {
                name: String::new(),
                size: len_of(&bytes),
                packed: len_of(&bytes),
                crc: crc.finalize(),
                lzma2: None,
            };
            return Ok(Packed { entry, body: Body::Memory(bytes) });
        }
        let mut spill = tempfile::tempfile_in(spill_dir).context("create spill file")?;
        let size = copy_hashing(&mut src, &mut spill, &mut crc).with_context(|| format!("read {}", path.display()))?;
        let entry = Entry { name: String::new(), size, packed: size, crc: crc.finalize(), lzma2: None };
        return Ok(Packed { entry, body: Body::Spilled(spill) });
    }
    let (dict, prop) = dictionary(level, len);
    let mut options = LzmaOptions::new_preset(u32::from(level)).context("LZMA2 preset")?;
    options.dict_size(dict);
    let mut filters = Filters::new();
    filters.lzma2(&options);
    let stream = Stream::new_raw_encoder(&filters).context("LZMA2 encoder")?;
    if len <= IN_MEMORY_MAX {
        let mut bytes = Vec::with_capacity(len as usize);
        src.read_to_end(&mut bytes).with_context(|| format!("read {}", path.display()))?;
        crc.update(&bytes);
        let mut enc = XzEncoder::new_stream(Vec::with_capacity(bytes.len() / 2 + 64), stream);
        enc.write_all(&bytes).context("compress")?;
        let packed = enc.finish().context("compress")?;
        let entry = Entry {
            name: String::new(),
            size: len_of(&bytes),
            packed: len_of(&packed),
            crc: crc.finalize(),
            lzma2: Some(prop),
        };
        return Ok(Packed { entry, body: Body::Memory(packed) });
    }
    let spill = tempfile::tempfile_in(spill_dir).context("create spill file")?;
    let mut enc = XzEncoder::new_stream(io::BufWriter::with_capacity(1 << 20, spill), stream);
    let size = copy_hashing(&mut src, &mut enc, &mut crc).with_context(|| format!("read {}", path.display()))?;
    let spill = enc
        .finish()
        .context("compress")?
        .into_inner()
        .map_err(io::IntoInnerError::into_error)
        .context("write spill file")?;
    let packed = spill.metadata().context("stat spill file")?.len();
    let entry = Entry { name: String::new(), size, packed, crc: crc.finalize(), lzma2: Some(prop) };
    Ok(Packed { entry, body: Body::Spilled(spill) })
}

fn len_of(bytes: &[u8]) -> u64 {
    bytes.len() as u64
}

/// Copies `src` to `dst` in 1 MiB reads, updating `crc`; returns the bytes copied.
fn copy_hashing(src: &mut File, dst: &mut impl Write, crc: &mut crc32fast::Hasher) -> io::Result<u64> {
    let mut buf = vec![0_u8; 1 << 20];
    let mut total = 0;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        crc.update(&buf[..n]);
        dst.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// 7z's variable-length NUMBER: the count of leading 1 bits of the first byte is the count of
/// extra little-endian bytes; the first byte's remaining bits are the value's high bits.
fn number(out: &mut Vec<u8>, value: u64) {
    let mut first = 0_u8;
    let mut mask = 0x80_u8;
    let mut extra = 0;
    while extra < 8 {
        if value < (1_u64 << (7 * (extra + 1))) {
            first |= (value >> (8 * extra)) as u8;
            break;
        }
        first |= mask;
        mask >>= 1;
        extra += 1;
    }
    out.push(first);
    out.extend_from_slice(&value.to_le_bytes()[..extra]);
}

/// The archive header (not encoded): streams, folders with one coder each, CRCs, names,
/// attributes.
fn header(entries: &[Entry]) -> Vec<u8> {
    let n = entries.len() as u64;
    let mut h = Vec::with_capacity(64 + entries.len() * 160);
    h.extend([K_HEADER, K_MAIN_STREAMS_INFO, K_PACK_INFO]);
    number(&mut h, 0); // pack position: right after the signature header
    number(&mut h, n);
    h.push(K_SIZE);
    for e in entries {
        number(&mut h, e.packed);
    }
    h.push(K_END);
    h.extend([K_UNPACK_INFO, K_FOLDER]);
    number(&mut h, n);
    h.push(0); // not external
    for e in entries {
        number(&mut h, 1); // one coder, one stream in, one out
        match e.lzma2 {
            // Flags 0x21: 1-byte codec id, has properties; LZMA2 is 0x21; 1 property byte.
            Some(prop) => h.extend([0x21, 0x21, 0x01, prop]),
            // Flags 0x01: 1-byte codec id; Copy is 0x00.
            None => h.extend([0x01, 0x00]),
        }
    }
    h.push(K_CODERS_UNPACK_SIZE);
    for e in entries {
        number(&mut h, e.size);
    }
    h.push(K_END);
    // One stream per folder, so substreams only carry the CRCs.
    h.extend([K_SUBSTREAMS_INFO, K_CRC, 1]);
    for e in entries {
        h.extend(e.crc.to_le_bytes());
    }
    h.extend([K_END, K_END]);

    h.push(K_FILES_INFO);
    number(&mut h, n);
    let mut names = vec![0_u8]; // not external
    for e in entries {
        names.extend(e.name.encode_utf16().flat_map(u16::to_le_bytes));
        names.extend([0, 0]);
    }
    h.push(K_NAME);
    number(&mut h, names.len() as u64);
    h.extend(names);
    h.push(K_ATTRIBUTES);
    number(&mut h, 2 + 4 * n);
    h.extend([1, 0]); // all defined, not external
    for _ in entries {
        h.extend(FILE_ATTRIBUTES.to_le_bytes());
    }
    h.extend([K_END, K_END]);
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use bidsflux_session::Uid;

    fn have_7z() -> bool {
        Path::new("/usr/bin/7z").exists()
    }

    fn files_in(spool: &Path, contents: &[(&str, Vec<u8>)]) -> Vec<SpoolFile> {
        contents
            .iter()
            .map(|(rel, bytes)| {
                let path = spool.join(rel);
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, bytes).unwrap();
                SpoolFile {
                    rel_path: (*rel).to_owned(),
                    series_instance_uid: Uid::parse("s", "3").unwrap(),
                    sop_instance_uid: Uid::parse("s", "4").unwrap(),
                }
            })
            .collect()
    }

    /// Extracts with Debian's 7z (after `7z t`) and compares every file.
    fn assert_extracts(archive: &Path, contents: &[(&str, Vec<u8>)]) {
        assert!(have_7z(), "/usr/bin/7z is required (Debian p7zip-full; make test installs it)");
        let t = std::process::Command::new("/usr/bin/7z").arg("t").arg(archive).output().unwrap();
        assert!(t.status.success(), "7z t: {}", String::from_utf8_lossy(&t.stdout));
        let dest = tempfile::tempdir().unwrap();
        let x = std::process::Command::new("/usr/bin/7z")
            .args(["x", "-y", "-bd"])
            .arg(format!("-o{}", dest.path().display()))
            .arg(archive)
            .output()
            .unwrap();
        assert!(x.status.success(), "7z x: {}", String::from_utf8_lossy(&x.stdout));
        for (rel, bytes) in contents {
            let got = std::fs::read(dest.path().join(rel)).unwrap();
            assert!(got == *bytes, "{rel} differs after 7z x");
        }
        let l = std::process::Command::new("/usr/bin/7z").args(["l", "-slt"]).arg(archive).output().unwrap();
        let listing = String::from_utf8_lossy(&l.stdout);
        assert_eq!(listing.matches("\nPath = ").count(), contents.len() + 1, "{listing}");
        assert_eq!(listing.matches("Solid = -").count(), 1, "not one file per block: {listing}");
        assert!(!listing.contains("Solid = +"), "{listing}");
    }

    #[test]
    fn numbers_use_7z_variable_length_encoding() {
        let enc = |v| {
            let mut out = Vec::new();
            number(&mut out, v);
            out
        };
        assert_eq!(enc(0), [0x00]);
        assert_eq!(enc(0x7F), [0x7F]);
        assert_eq!(enc(0x80), [0x80, 0x80]);
        assert_eq!(enc(0x3FFF), [0xBF, 0xFF]);
        assert_eq!(enc(0x4000), [0xC0, 0x00, 0x40]);
        assert_eq!(enc(u64::MAX), [0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]);
    }

    #[test]
    fn dictionaries_fit_the_file_and_never_exceed_the_preset() {
        assert_eq!(dictionary(5, 10), (4096, 0));
        assert_eq!(dictionary(5, 5000), (6144, 1));
        assert_eq!(dictionary(5, 131_072 + 300), (196_608, 11));
        assert_eq!(dictionary(5, 1 << 30), (8 << 20, 22));
        assert_eq!(dictionary(9, 1 << 30), (64 << 20, 28));
        assert_eq!(dict_size(40 - 1), 3 << 30);
    }

    #[tokio::test]
    async fn archives_extract_with_7z_and_are_reproducible() {
        let spool = tempfile::tempdir().unwrap();
        let work = tempfile::tempdir().unwrap();
        let noise: Vec<u8> = (0..300_000_u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let contents = vec![
            ("1.2/3/2.dcm", vec![2_u8; 5000]),
            ("1.2/3/1.dcm", noise),
            ("1.2/4/1.dcm", b"one byte more than nothing".to_vec()),
            ("1.2/3/10.dcm", (0..=255_u8).cycle().take(70_000).collect()),
        ];
        let files = files_in(spool.path(), &contents);
        for level in [0, 1, 5] {
            let z = SevenZip { level, threads: 3 };
            let a = z.build(spool.path(), work.path(), "1.2.7z", &files).await.unwrap();
            assert_extracts(&a.path, &contents);
            // Other thread count, other order of the list, later mtimes: same bytes.
            let mut reversed = files.clone();
            reversed.reverse();
            for (rel, _) in &contents {
                let f = File::options().write(true).open(spool.path().join(rel)).unwrap();
                f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(3600)).unwrap();
            }
            let b = SevenZip { level, threads: 1 }.build(spool.path(), work.path(), "1.2.7z", &reversed).await.unwrap();
            assert_eq!(a.digests, b.digests, "level {level}");
            assert_ne!(a.path, b.path);
            let dir = a.path.parent().unwrap().to_path_buf();
            drop(a);
            assert!(!dir.exists(), "temp dir kept");
        }
    }

    #[tokio::test]
    async fn large_files_are_spilled_and_still_extract() {
        let spool = tempfile::tempdir().unwrap();
        let work = tempfile::tempdir().unwrap();
        let big: Vec<u8> = (0..(IN_MEMORY_MAX as u32 + 123_457)).map(|i| (i % 251) as u8 ^ (i >> 16) as u8).collect();
        let contents = vec![("9/8/big.dcm", big.clone()), ("9/8/small.dcm", vec![7_u8; 100])];
        let files = files_in(spool.path(), &contents);
        for level in [0, 1] {
            let a = SevenZip { level, threads: 2 }.build(spool.path(), work.path(), "9.7z", &files).await.unwrap();
            assert_extracts(&a.path, &contents);
        }
    }

    /// Workers held back by the window while the writer fails on an early file are released.
    #[tokio::test]
    async fn a_failure_behind_a_full_window_does_not_hang() {
        let spool = tempfile::tempdir().unwrap();
        let work = tempfile::tempdir().unwrap();
        let contents: Vec<(String, Vec<u8>)> =
            (0..40).map(|i| (format!("1.2/3/{i:02}.dcm"), vec![i as u8; 20_000])).collect();
        let refs: Vec<(&str, Vec<u8>)> = contents.iter().map(|(p, b)| (p.as_str(), b.clone())).collect();
        let mut files = files_in(spool.path(), &refs);
        std::fs::remove_file(spool.path().join("1.2/3/00.dcm")).unwrap();
        files.swap(0, 39);
        let z = SevenZip { level: 1, threads: 3 };
        let built = tokio::time::timeout(
            std::time::Duration::from_secs(60),
            z.build(spool.path(), work.path(), "1.2.7z", &files),
        );
        let e = format!("{:#}", built.await.expect("archiving hung").unwrap_err());
        assert!(e.contains("1.2/3/00.dcm"), "{e}");
    }

    /// A cancelled build (its future dropped) stops taking files and fails.
    #[test]
    fn a_cancelled_write_stops() {
        let spool = tempfile::tempdir().unwrap();
        let work = tempfile::tempdir().unwrap();
        let contents: Vec<(String, Vec<u8>)> =
            (0..20).map(|i| (format!("1.2/3/{i:02}.dcm"), vec![i as u8; 1000])).collect();
        let refs: Vec<(&str, Vec<u8>)> = contents.iter().map(|(p, b)| (p.as_str(), b.clone())).collect();
        let files: Vec<String> = files_in(spool.path(), &refs).into_iter().map(|f| f.rel_path).collect();
        let z = SevenZip { level: 1, threads: 2 };
        let e = z.write(spool.path(), files, &work.path().join("a.7z"), &AtomicBool::new(true)).unwrap_err();
        assert!(format!("{e:#}").contains("stopped early") || format!("{e:#}").contains("cancelled"), "{e:#}");
    }

    #[tokio::test]
    async fn a_missing_or_empty_file_fails_and_leaves_no_archive_behind() {
        let spool = tempfile::tempdir().unwrap();
        let work = tempfile::tempdir().unwrap();
        let mut files = files_in(spool.path(), &[("1.2/3/1.dcm", vec![1; 10]), ("1.2/3/2.dcm", Vec::new())]);
        let z = SevenZip { level: 5, threads: 2 };
        let e = format!("{:#}", z.build(spool.path(), work.path(), "1.2.7z", &files).await.unwrap_err());
        assert!(e.contains("1.2/3/2.dcm") && e.contains("is empty"), "{e}");
        files[1].rel_path = "1.2/3/missing.dcm".into();
        let e = format!("{:#}", z.build(spool.path(), work.path(), "1.2.7z", &files).await.unwrap_err());
        assert!(e.contains("1.2/3/missing.dcm"), "{e}");
        assert_eq!(std::fs::read_dir(work.path()).unwrap().count(), 0, "temp dirs left behind");
    }
}
