//! The spool journal: one flush per store instead of two.
//!
//! An instance that fits in memory is made durable by appending it (the Part 10 bytes and the
//! event that announces it) to a journal segment and flushing that segment with `fdatasync`; its
//! spool file is then created under its final name and written, without a flush of its own. The
//! spool files are flushed in bulk later (a *checkpoint*: one `syncfs`, then the checkpoint file
//! records the sequence number up to which every record's file is durable), so the journal only
//! has to hold the records written since the last checkpoint.
//!
//! Why it is faster: segments are written again and again in place, so after their first use an
//! `fdatasync` writes data blocks only (no journal commit of the file system for a new file, a
//! new name or a new directory), and one writer thread flushes every record waiting at that
//! moment at once (group commit across associations).
//!
//! What a crash leaves, and how [`Journal::open`] repairs it: every record whose append was
//! acknowledged is in a segment, checksummed; records after the checkpoint are handed back to
//! the spool, which makes sure each one's file exists with the record's bytes before the
//! receiver serves anyone (see `Spool::open`). A record torn by the crash was never
//! acknowledged: the scan of its segment stops there.
//!
//! Layout, under `<spool>/.journal/`:
//! - `segment-<n>` (n < [`JournalOptions::segments`]): records, back to back, each a [`HEADER_LEN`]-byte header
//!   (`BFJR`, CRC-32C, sequence number, lengths) then the event bytes then the file bytes. A
//!   segment grows to at most [`JournalOptions::segment_size`], then the writer moves to the next one, which it
//!   reuses only once the checkpoint has passed every record in it.
//! - `checkpoint`: two slots of 4 KiB (written alternately, so a torn write leaves the other),
//!   each `BFJC`, a sequence number and a CRC-32C.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Seek as _};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::oneshot;

/// How big the journal is, and how often it is checkpointed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalOptions {
    /// Size a segment grows to before the writer moves on.
    pub segment_size: u64,
    /// Number of segments (the journal takes at most `segments * segment_size` of disk).
    pub segments: usize,
    /// A checkpoint is taken at least this often while records arrive.
    pub checkpoint_interval: Duration,
}

impl Default for JournalOptions {
    /// 8 segments of 64 MiB: about two seconds of four associations at full speed between
    /// checkpoints, so a checkpoint rarely holds the writer up.
    fn default() -> Self {
        Self { segment_size: 64 << 20, segments: 8, checkpoint_interval: Duration::from_secs(2) }
    }
}

impl JournalOptions {
    /// Largest record (header, event and file) the journal takes; larger instances are stored
    /// with a flush of their own.
    pub fn max_record(&self) -> u64 {
        self.segment_size / 4
    }
}
/// Bytes of a record header.
pub const HEADER_LEN: usize = 32;
/// How long an append waits for a segment to be freed by a checkpoint before failing.
const FREE_SEGMENT_TIMEOUT: Duration = Duration::from_secs(30);

const RECORD_MAGIC: &[u8; 4] = b"BFJR";
const CHECKPOINT_MAGIC: &[u8; 4] = b"BFJC";
const CHECKPOINT_SLOT: u64 = 4096;

/// What the writer does once a record is durable: rename the temp file holding the record's
/// file bytes (written by the caller, in parallel with other stores) to the spool file's name,
/// which must not exist. A file under its final name is thus always complete, even if the
/// process dies while writing it.
#[derive(Debug)]
pub struct CreateFile {
    /// The temp file, complete (on the spool's file system).
    pub tmp: PathBuf,
    /// Absolute path of the spool file.
    pub path: PathBuf,
}

/// A record found after the checkpoint when the journal was opened.
#[derive(Debug)]
pub struct Recovered {
    /// Sequence number.
    pub seq: u64,
    /// The event bytes.
    pub meta: Vec<u8>,
    /// The file bytes.
    pub data: Vec<u8>,
}

/// The journal of a spool (threads stop once the handle is dropped and nothing is pending).
#[derive(Debug)]
pub struct Journal {
    shared: Arc<Shared>,
    options: JournalOptions,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Wakes the writer (records queued, checkpoint advanced, closing).
    writer_wake: Condvar,
    /// Wakes the checkpointer (checkpoint asked for, closing).
    checkpointer_wake: Condvar,
}

#[derive(Debug)]
struct State {
    queue: Vec<Pending>,
    next_seq: u64,
    /// Records queued, being written or being placed: the checkpoint stays below the smallest.
    inflight: BTreeSet<u64>,
    /// Largest sequence number written and flushed.
    last_flushed: u64,
    /// Every record up to this one has its spool file durable.
    checkpointed: u64,
    /// Largest sequence number in each segment.
    segment_max: Vec<u64>,
    /// The writer waits for a segment to be freed.
    checkpoint_wanted: bool,
    /// The last checkpoint failed (its error, for appends that wait on it).
    checkpoint_error: Option<String>,
    closed: bool,
}

#[derive(Debug)]
struct Pending {
    seq: u64,
    meta: Vec<u8>,
    data: Bytes,
    create: CreateFile,
    done: oneshot::Sender<io::Result<()>>,
}

impl Pending {
    fn len(&self) -> u64 {
        (HEADER_LEN + self.meta.len() + self.data.len()) as u64
    }
}

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    shared.state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Journal {
    /// Whether a record of this much event and file data goes through the journal.
    pub fn fits(&self, meta_len: usize, data_len: usize) -> bool {
        ((HEADER_LEN + meta_len + data_len) as u64) <= self.options.max_record()
    }

    /// Opens (creating) the journal in `dir` and returns the records written after the last
    /// checkpoint, in order. The threads are not started yet: the caller repairs the spool
    /// from the records, makes it durable, and calls [`Journal::start`].
    pub fn open(dir: &Path, options: JournalOptions) -> io::Result<(Opened, Vec<Recovered>)> {
        fs::create_dir_all(dir)?;
        let mut segments = Vec::with_capacity(options.segments);
        for n in 0..options.segments {
            let path = dir.join(format!("segment-{n}"));
            segments.push(OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?);
        }
        let checkpoint =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(dir.join("checkpoint"))?;
        // The new files' names must be durable before anything relies on them.
        File::open(dir)?.sync_all()?;
        let checkpointed = read_checkpoint(&checkpoint)?;
        let mut max_seq = checkpointed;
        let mut recovered = Vec::new();
        for segment in &mut segments {
            for record in scan(segment, options.max_record())? {
                max_seq = max_seq.max(record.seq);
                if record.seq > checkpointed {
                    recovered.push(record);
                }
            }
        }
        recovered.sort_by_key(|r| r.seq);
        let opened = Opened { dir: dir.to_path_buf(), options, segments, checkpoint, checkpointed, max_seq };
        Ok((opened, recovered))
    }

    /// Appends a record and waits until it is durable and its spool file in place.
    ///
    /// `create.path` must not exist, and nobody else may create it meanwhile (the spool holds
    /// the instance's lock): if it exists the append fails, though the record stays in the
    /// journal (recovery then keeps both files).
    pub async fn append(&self, meta: Vec<u8>, data: Bytes, create: CreateFile) -> io::Result<()> {
        let (done, rx) = oneshot::channel();
        {
            let mut state = lock(&self.shared);
            if state.closed {
                return Err(io::Error::other("the spool journal is closed"));
            }
            let seq = state.next_seq;
            state.next_seq += 1;
            state.inflight.insert(seq);
            state.queue.push(Pending { seq, meta, data, create, done });
        }
        self.shared.writer_wake.notify_one();
        rx.await.unwrap_or_else(|_| Err(io::Error::other("the spool journal writer stopped")))
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        lock(&self.shared).closed = true;
        self.shared.writer_wake.notify_all();
        self.shared.checkpointer_wake.notify_all();
    }
}

/// A journal opened and scanned, its threads not started.
#[derive(Debug)]
pub struct Opened {
    dir: PathBuf,
    options: JournalOptions,
    segments: Vec<File>,
    checkpoint: File,
    checkpointed: u64,
    max_seq: u64,
}

impl Opened {
    /// Records that every record found is now durable in the spool, and starts the writer and
    /// checkpoint threads; `spool_root` is the file system the checkpoints sync.
    pub fn start(self, spool_root: &Path) -> io::Result<Journal> {
        let Self { dir, options, segments, checkpoint, mut checkpointed, max_seq } = self;
        let mut slot = checkpointed;
        if max_seq > checkpointed {
            slot = slot.wrapping_add(1);
            write_checkpoint(&checkpoint, max_seq, slot)?;
            checkpointed = max_seq;
        }
        let state = State {
            queue: Vec::new(),
            next_seq: max_seq + 1,
            inflight: BTreeSet::new(),
            last_flushed: max_seq,
            checkpointed,
            segment_max: vec![0; options.segments],
            checkpoint_wanted: false,
            checkpoint_error: None,
            closed: false,
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            writer_wake: Condvar::new(),
            checkpointer_wake: Condvar::new(),
        });
        let fs_handle = File::open(spool_root)?;
        let s = shared.clone();
        std::thread::Builder::new()
            .name("spool-checkpoint".into())
            .spawn(move || checkpointer(&s, &fs_handle, &checkpoint, slot, options.checkpoint_interval))?;
        let s = shared.clone();
        std::thread::Builder::new()
            .name("spool-journal".into())
            .spawn(move || Writer::new(segments, options).run(&s))?;
        tracing::debug!(dir = %dir.display(), next_seq = max_seq + 1, "spool journal started");
        Ok(Journal { shared, options })
    }
}

/// The writer thread's own state.
struct Writer {
    segments: Vec<File>,
    segment_size: u64,
    current: usize,
    offset: u64,
    /// The current segment may hold garbage after `offset` (a failed write): move on first.
    must_rotate: bool,
}

impl Writer {
    fn new(segments: Vec<File>, options: JournalOptions) -> Self {
        // Every record found at start is checkpointed: any segment may be reused.
        Self { segments, segment_size: options.segment_size, current: 0, offset: 0, must_rotate: false }
    }

    fn run(mut self, shared: &Shared) {
        loop {
            let batch = {
                let mut state = lock(shared);
                while state.queue.is_empty() && !state.closed {
                    state = shared.writer_wake.wait(state).unwrap_or_else(PoisonError::into_inner);
                }
                if state.queue.is_empty() {
                    return;
                }
                std::mem::take(&mut state.queue)
            };
            let written = self.write_batch(shared, &batch);
            let mut placed = Vec::with_capacity(batch.len());
            for pending in batch {
                let result = match &written {
                    Ok(()) => rename_new(&pending.create.tmp, &pending.create.path),
                    Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                };
                placed.push((pending.seq, pending.done, result));
            }
            {
                let mut state = lock(shared);
                for (seq, _, _) in &placed {
                    state.inflight.remove(seq);
                }
            }
            for (_, done, result) in placed {
                // A store that went away (association aborted) needs no answer.
                let _ = done.send(result);
            }
        }
    }

    /// Writes and flushes a batch; on failure the segment is left for the next one.
    fn write_batch(&mut self, shared: &Shared, batch: &[Pending]) -> io::Result<()> {
        let result = self.try_write_batch(shared, batch);
        if let Err(e) = &result {
            tracing::error!(error = %e, records = batch.len(), "failed to write the spool journal");
            self.must_rotate = true;
        }
        result
    }

    fn try_write_batch(&mut self, shared: &Shared, batch: &[Pending]) -> io::Result<()> {
        let mut segment_max = 0;
        for pending in batch {
            let len = pending.len();
            if self.must_rotate || self.offset + len > self.segment_size {
                if self.offset > 0 && !self.must_rotate {
                    rustix::fs::fdatasync(&self.segments[self.current])?;
                    let mut state = lock(shared);
                    let max = &mut state.segment_max[self.current];
                    *max = (*max).max(segment_max);
                }
                segment_max = 0;
                self.rotate(shared)?;
            }
            let mut header = Vec::with_capacity(HEADER_LEN + pending.meta.len());
            header.extend_from_slice(RECORD_MAGIC);
            header.extend_from_slice(&[0; 4]);
            header.extend_from_slice(&pending.seq.to_le_bytes());
            header.extend_from_slice(&(pending.meta.len() as u32).to_le_bytes());
            header.extend_from_slice(&(pending.data.len() as u32).to_le_bytes());
            header.extend_from_slice(&[0; 8]);
            header.extend_from_slice(&pending.meta);
            let crc = crc32c::crc32c_append(crc32c::crc32c(&header[8..]), &pending.data);
            header[4..8].copy_from_slice(&crc.to_le_bytes());
            write_all_at(&self.segments[self.current], &[&header, &pending.data], self.offset)?;
            self.offset += len;
            segment_max = segment_max.max(pending.seq);
        }
        rustix::fs::fdatasync(&self.segments[self.current])?;
        let mut state = lock(shared);
        let max = &mut state.segment_max[self.current];
        *max = (*max).max(segment_max);
        if let Some(last) = batch.iter().map(|p| p.seq).max() {
            state.last_flushed = state.last_flushed.max(last);
        }
        Ok(())
    }

    /// Moves to the next segment once the checkpoint has passed every record in it.
    fn rotate(&mut self, shared: &Shared) -> io::Result<()> {
        let next = (self.current + 1) % self.segments.len();
        let deadline = Instant::now() + FREE_SEGMENT_TIMEOUT;
        let mut state = lock(shared);
        while state.segment_max[next] > state.checkpointed {
            state.checkpoint_wanted = true;
            shared.checkpointer_wake.notify_one();
            let now = Instant::now();
            if now >= deadline {
                let why = state.checkpoint_error.clone().unwrap_or_else(|| "no checkpoint in time".to_owned());
                return Err(io::Error::other(format!("no free spool journal segment: {why}")));
            }
            state = shared
                .writer_wake
                .wait_timeout(state, deadline - now)
                .map(|(s, _)| s)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        // Records left from the segment's previous use are all checkpointed: a scan skips them.
        state.segment_max[next] = 0;
        drop(state);
        self.current = next;
        self.offset = 0;
        self.must_rotate = false;
        Ok(())
    }
}

/// Renames a complete temp file to `path`, which must not exist (no flush: the record is
/// durable in the journal, the file becomes durable at the next checkpoint).
fn rename_new(tmp: &Path, path: &Path) -> io::Result<()> {
    rustix::fs::renameat_with(rustix::fs::CWD, tmp, rustix::fs::CWD, path, rustix::fs::RenameFlags::NOREPLACE)
        .map_err(io::Error::from)
}

/// `pwritev` until every byte is written.
fn write_all_at(file: &File, parts: &[&[u8]], mut offset: u64) -> io::Result<()> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let slices: Vec<io::IoSlice<'_>> = parts.iter().map(|p| io::IoSlice::new(p)).collect();
    let n = rustix::io::pwritev(file, &slices, offset)?;
    if n == total {
        return Ok(());
    }
    // Short write (rare): finish piece by piece.
    let mut skip = n;
    for part in parts {
        if skip >= part.len() {
            skip -= part.len();
            continue;
        }
        file.write_all_at(&part[skip..], offset + n as u64)?;
        offset += (part.len() - skip) as u64;
        skip = 0;
    }
    Ok(())
}

/// The checkpointer thread: a checkpoint when the writer needs a segment, and every
/// [`JournalOptions::checkpoint_interval`] while records arrive; a last one when closing.
fn checkpointer(shared: &Shared, fs_handle: &File, checkpoint: &File, mut slot: u64, interval: Duration) {
    let mut last = Instant::now();
    loop {
        let target = {
            let mut state = lock(shared);
            loop {
                let target = state.inflight.first().map_or(state.last_flushed, |s| s - 1);
                let behind = target > state.checkpointed;
                if state.closed && state.queue.is_empty() && state.inflight.is_empty() && !behind {
                    return;
                }
                let due = last.elapsed() >= interval;
                if behind && (state.checkpoint_wanted || due || state.closed) {
                    break target;
                }
                let wait = if state.closed || state.checkpoint_wanted {
                    // Waiting for records in flight to be placed.
                    Duration::from_millis(5)
                } else {
                    interval.saturating_sub(last.elapsed()).max(Duration::from_millis(50))
                };
                state = shared
                    .checkpointer_wake
                    .wait_timeout(state, wait)
                    .map(|(s, _)| s)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
        };
        last = Instant::now();
        let started = Instant::now();
        let result = rustix::fs::syncfs(fs_handle).map_err(io::Error::from).and_then(|()| {
            slot = slot.wrapping_add(1);
            write_checkpoint(checkpoint, target, slot)
        });
        let mut state = lock(shared);
        match result {
            Ok(()) => {
                state.checkpointed = target;
                state.checkpoint_wanted = false;
                state.checkpoint_error = None;
                tracing::trace!(seq = target, micros = started.elapsed().as_micros() as u64, "spool checkpoint");
            }
            Err(e) => {
                tracing::error!(error = %e, "failed to checkpoint the spool journal (retrying)");
                state.checkpoint_error = Some(e.to_string());
                drop(state);
                std::thread::sleep(Duration::from_millis(200));
                state = lock(shared);
            }
        }
        drop(state);
        shared.writer_wake.notify_all();
    }
}

fn read_checkpoint(file: &File) -> io::Result<u64> {
    let mut best = 0;
    for n in 0..2 {
        let mut slot = [0_u8; 16];
        match file.read_exact_at(&mut slot, n * CHECKPOINT_SLOT) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => continue,
            Err(e) => return Err(e),
        }
        let crc = u32::from_le_bytes([slot[12], slot[13], slot[14], slot[15]]);
        if &slot[..4] == CHECKPOINT_MAGIC && crc32c::crc32c(&slot[..12]) == crc {
            let mut seq = [0_u8; 8];
            seq.copy_from_slice(&slot[4..12]);
            best = best.max(u64::from_le_bytes(seq));
        }
    }
    Ok(best)
}

fn write_checkpoint(file: &File, seq: u64, slot: u64) -> io::Result<()> {
    let mut bytes = Vec::with_capacity(16);
    bytes.extend_from_slice(CHECKPOINT_MAGIC);
    bytes.extend_from_slice(&seq.to_le_bytes());
    let crc = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    file.write_all_at(&bytes, (slot % 2) * CHECKPOINT_SLOT)?;
    rustix::fs::fdatasync(file)?;
    Ok(())
}

/// The valid records of a segment, up to the first one that is not (torn, or never written).
fn scan(segment: &mut File, max_record: u64) -> io::Result<Vec<Recovered>> {
    let len = segment.metadata()?.len();
    segment.rewind()?;
    let mut reader = io::BufReader::with_capacity(1 << 20, &*segment);
    let mut records = Vec::new();
    let mut offset = 0_u64;
    loop {
        if offset + HEADER_LEN as u64 > len {
            break;
        }
        let mut header = [0_u8; HEADER_LEN];
        reader.read_exact(&mut header)?;
        if &header[..4] != RECORD_MAGIC {
            break;
        }
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let mut seq = [0_u8; 8];
        seq.copy_from_slice(&header[8..16]);
        let seq = u64::from_le_bytes(seq);
        let meta_len = u32::from_le_bytes([header[16], header[17], header[18], header[19]]) as u64;
        let data_len = u32::from_le_bytes([header[20], header[21], header[22], header[23]]) as u64;
        let total = HEADER_LEN as u64 + meta_len + data_len;
        if total > max_record || offset + total > len {
            break;
        }
        let mut meta = vec![0_u8; meta_len as usize];
        reader.read_exact(&mut meta)?;
        let mut data = vec![0_u8; data_len as usize];
        reader.read_exact(&mut data)?;
        let computed = crc32c::crc32c_append(crc32c::crc32c_append(crc32c::crc32c(&header[8..]), &meta), &data);
        if computed != crc {
            break;
        }
        records.push(Recovered { seq, meta, data });
        offset += total;
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn append(journal: &Journal, dir: &Path, name: &str, data: &[u8]) -> io::Result<()> {
        let tmp = dir.join(format!(".{name}.part"));
        fs::write(&tmp, data)?;
        let create = CreateFile { tmp, path: dir.join(name) };
        journal.append(name.as_bytes().to_vec(), Bytes::copy_from_slice(data), create).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn appended_records_create_their_files_and_are_checkpointed_on_close() {
        let dir = tempfile::tempdir().unwrap();
        let (opened, recovered) = Journal::open(&dir.path().join(".journal"), JournalOptions::default()).unwrap();
        assert!(recovered.is_empty());
        let journal = opened.start(dir.path()).unwrap();
        let mut tasks = Vec::new();
        let journal = Arc::new(journal);
        for i in 0..50 {
            let (journal, dir) = (journal.clone(), dir.path().to_path_buf());
            tasks.push(tokio::spawn(async move {
                append(&journal, &dir, &format!("f{i}"), format!("data {i}").as_bytes()).await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        for i in 0..50 {
            assert_eq!(fs::read(dir.path().join(format!("f{i}"))).unwrap(), format!("data {i}").as_bytes());
        }
        // An existing file is never overwritten.
        let err = append(&journal, dir.path(), "f0", b"other").await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(dir.path().join("f0")).unwrap(), b"data 0");
        let shared = journal.shared.clone();
        drop(Arc::into_inner(journal).unwrap());
        bidsflux_testsupport::wait_until("the journal threads to stop", Duration::from_secs(10), || {
            let n = Arc::strong_count(&shared);
            async move { (n == 1).then_some(()) }
        })
        .await
        .unwrap();
        // Everything was checkpointed when closing: nothing to recover.
        let (_, recovered) = Journal::open(&dir.path().join(".journal"), JournalOptions::default()).unwrap();
        assert!(recovered.is_empty(), "{} records after a clean close", recovered.len());
    }

    #[test]
    fn records_after_the_checkpoint_are_recovered_in_order_up_to_a_torn_one() {
        let dir = tempfile::tempdir().unwrap();
        let jdir = dir.path().join(".journal");
        let (opened, _) = Journal::open(&jdir, JournalOptions::default()).unwrap();
        // Write records by hand as the writer would, then "crash" (no checkpoint).
        let mut writer = Writer::new(opened.segments, JournalOptions::default());
        let shared = Shared {
            state: Mutex::new(State {
                queue: Vec::new(),
                next_seq: 1,
                inflight: BTreeSet::new(),
                last_flushed: 0,
                checkpointed: 0,
                segment_max: vec![0; 8],
                checkpoint_wanted: false,
                checkpoint_error: None,
                closed: false,
            }),
            writer_wake: Condvar::new(),
            checkpointer_wake: Condvar::new(),
        };
        let pending = |seq: u64| {
            let (done, _rx) = oneshot::channel();
            Pending {
                seq,
                meta: format!("meta {seq}").into_bytes(),
                data: Bytes::from(vec![seq as u8; 1000 + seq as usize]),
                create: CreateFile {
                    tmp: dir.path().join(format!("t{seq}")),
                    path: dir.path().join(format!("x{seq}")),
                },
                done,
            }
        };
        writer.write_batch(&shared, &[pending(1), pending(2)]).unwrap();
        writer.write_batch(&shared, &[pending(3)]).unwrap();
        let segment_len = writer.offset;
        drop(writer);
        // A torn fourth record: its header made it, its bytes did not all.
        let segment = OpenOptions::new().write(true).open(jdir.join("segment-0")).unwrap();
        let mut torn = Vec::new();
        torn.extend_from_slice(RECORD_MAGIC);
        torn.extend_from_slice(&[1, 2, 3, 4]);
        torn.extend_from_slice(&4_u64.to_le_bytes());
        torn.extend_from_slice(&5_u32.to_le_bytes());
        torn.extend_from_slice(&100_u32.to_le_bytes());
        torn.extend_from_slice(&[0; 8]);
        torn.extend_from_slice(b"meta 4 and a bit");
        segment.write_all_at(&torn, segment_len).unwrap();
        // Stale bytes further on are never reached.
        segment.write_all_at(RECORD_MAGIC, segment_len + 500).unwrap();

        let (opened, recovered) = Journal::open(&jdir, JournalOptions::default()).unwrap();
        let seqs: Vec<u64> = recovered.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [1, 2, 3]);
        assert_eq!(recovered[1].meta, b"meta 2");
        assert_eq!(recovered[1].data, vec![2_u8; 1002]);
        // Once started, the records found are checkpointed, and numbering goes on after them.
        let journal = opened.start(dir.path()).unwrap();
        assert_eq!(lock(&journal.shared).next_seq, 4);
        drop(journal);
        let (_, recovered) = Journal::open(&jdir, JournalOptions::default()).unwrap();
        assert!(recovered.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn segments_are_reused_after_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let jdir = dir.path().join(".journal");
        let options = JournalOptions { segment_size: 64 << 10, segments: 3, ..JournalOptions::default() };
        let (opened, _) = Journal::open(&jdir, options).unwrap();
        let journal = opened.start(dir.path()).unwrap();
        // Enough data to go around every segment more than once.
        let chunk = vec![7_u8; (options.max_record() as usize) - 1024];
        let rounds = (options.segments as u64 * options.segment_size / chunk.len() as u64) * 3;
        for i in 0..rounds {
            append(&journal, dir.path(), &format!("big{i}"), &chunk).await.unwrap();
            // Keep the test's disk use bounded.
            fs::remove_file(dir.path().join(format!("big{i}"))).unwrap();
        }
        for n in 0..options.segments {
            let len = fs::metadata(jdir.join(format!("segment-{n}"))).unwrap().len();
            assert!(len <= options.segment_size, "segment {n} is {len} bytes");
            assert!(len > 0, "segment {n} was used");
        }
        drop(journal);
    }
}
