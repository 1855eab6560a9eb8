//! The spool journal: one flush per store instead of two.
//!
//! An instance that fits in memory is made durable by appending it (the Part 10 bytes and the
//! event that announces it) to a journal segment and flushing that segment with `fdatasync`; its
//! temp file (written by the store meanwhile) is then renamed to its final name, without a flush
//! of its own. The
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
//! acknowledged: the scan of its segment stops there. A record whose store failed after it was
//! written (a flush or rename error: the sender got a failure status) is marked *cancelled* in
//! place before the failure is answered, so that a restart never puts it back; if even that
//! mark cannot be written, the journal refuses every further append until a restart.
//!
//! A failed checkpoint is never retried: after a write-back error, a later `syncfs` may report
//! success for data that was lost, so the journal keeps every record since the last good
//! checkpoint (stores fail with 0xA700 once the segments are full) and a restart rewrites them.
//!
//! Layout, under `<spool>/.journal/`:
//! - `segment-<n>` (n < [`JournalOptions::segments`]): records, back to back, each a
//!   [`HEADER_LEN`]-byte header (`BFJR`, CRC-32C, sequence number, lengths, a flags byte outside
//!   the CRC whose bit 0 cancels the record) then the event bytes then the file bytes. A
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
    /// A checkpoint failed: none is taken any more (its error, for appends that wait on one).
    checkpoint_error: Option<String>,
    /// The journal cannot be trusted (a failed record could not be cancelled): appends fail.
    broken: Option<String>,
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
    /// from the records, makes it durable, and calls [`Opened::start`].
    pub fn open(dir: &Path, options: JournalOptions) -> io::Result<(Opened, Vec<Position>)> {
        if options.segments < 3 || options.segment_size < 64 << 10 || options.segment_size > u64::from(u32::MAX) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a spool journal needs at least 3 segments of 64 KiB to 4 GiB",
            ));
        }
        fs::create_dir_all(dir)?;
        let mut segments = Vec::with_capacity(options.segments);
        for n in 0..options.segments {
            let path = dir.join(format!("segment-{n}"));
            segments.push(OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?);
        }
        let checkpoint =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(dir.join("checkpoint"))?;
        // The new files' names (and the directory's) must be durable before anything relies on them.
        File::open(dir)?.sync_all()?;
        if let Some(parent) = dir.parent() {
            File::open(parent)?.sync_all()?;
        }
        let (checkpointed, slot) = read_checkpoint(&checkpoint)?;
        let mut max_seq = checkpointed;
        let mut positions = Vec::new();
        for (n, segment) in segments.iter_mut().enumerate() {
            for position in scan(segment, n, options.max_record())? {
                max_seq = max_seq.max(position.seq);
                if position.seq > checkpointed && !position.cancelled {
                    positions.push(position);
                }
            }
        }
        positions.sort_by_key(|p| p.seq);
        let opened = Opened { dir: dir.to_path_buf(), options, segments, checkpoint, checkpointed, slot, max_seq };
        Ok((opened, positions))
    }

    /// Appends a record and waits until it is durable and its spool file in place.
    ///
    /// `create.path` must not exist, and nobody else may create it meanwhile (the spool holds
    /// the instance's lock). If anything fails, the record is cancelled before the error is
    /// returned: a restart does not put it back.
    pub async fn append(&self, meta: Vec<u8>, data: Bytes, create: CreateFile) -> io::Result<()> {
        let (done, rx) = oneshot::channel();
        {
            let mut state = lock(&self.shared);
            if state.closed {
                return Err(io::Error::other("the spool journal is closed"));
            }
            if let Some(why) = &state.broken {
                return Err(io::Error::other(format!("the spool journal is unusable until a restart: {why}")));
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
    /// The checkpoint slot holding `checkpointed` (the next write goes to the other one).
    slot: u64,
    max_seq: u64,
}

impl Opened {
    /// Reads a record found by [`Journal::open`] (one at a time: a journal holds up to
    /// `segments × segment_size` bytes, more than a small server should hold in memory).
    pub fn read(&self, position: &Position) -> io::Result<Recovered> {
        let segment = self.segments.get(position.segment).ok_or_else(|| io::Error::other("no such segment"))?;
        let mut header = [0_u8; HEADER_LEN];
        segment.read_exact_at(&mut header, position.offset)?;
        let parsed = Header::parse(&header).ok_or_else(|| io::Error::other("journal record header changed"))?;
        let mut meta = vec![0_u8; parsed.meta_len as usize];
        segment.read_exact_at(&mut meta, position.offset + HEADER_LEN as u64)?;
        let mut data = vec![0_u8; parsed.data_len as usize];
        segment.read_exact_at(&mut data, position.offset + HEADER_LEN as u64 + parsed.meta_len)?;
        if parsed.crc(&header, &meta, &data) != parsed.crc || parsed.seq != position.seq {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "journal record changed since the scan"));
        }
        Ok(Recovered { seq: parsed.seq, meta, data })
    }

    /// Records that every record found is now durable in the spool, and starts the writer and
    /// checkpoint threads; `spool_root` is the file system the checkpoints sync.
    pub fn start(self, spool_root: &Path) -> io::Result<Journal> {
        let Self { dir, options, segments, checkpoint, mut checkpointed, mut slot, max_seq } = self;
        if max_seq > checkpointed {
            write_checkpoint(&checkpoint, max_seq, slot + 1)?;
            slot += 1;
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
            broken: None,
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
                // At most half a segment per batch, so that a batch never needs a segment that
                // holds its own records.
                let budget = self.segment_size / 2;
                let (mut bytes, mut n) = (0, 0);
                for p in &state.queue {
                    if n > 0 && bytes + p.len() > budget {
                        break;
                    }
                    bytes += p.len();
                    n += 1;
                }
                state.queue.drain(..n).collect::<Vec<_>>()
            };
            let mut written = Vec::with_capacity(batch.len());
            let result = self.write_batch(shared, &batch, &mut written);
            let mut placed = Vec::with_capacity(batch.len());
            let mut cancel = Vec::new();
            for (i, pending) in batch.into_iter().enumerate() {
                let result = match &result {
                    Ok(()) => rename_new(&pending.create.tmp, &pending.create.path),
                    Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                };
                if result.is_err()
                    && let Some(position) = written.get(i)
                {
                    cancel.push(*position);
                }
                placed.push((pending.seq, pending.done, result));
            }
            // Before any failure is answered: a restart must not put back what the sender was
            // told failed (another version may take the name meanwhile).
            if !cancel.is_empty()
                && let Err(e) = self.cancel(&cancel)
            {
                tracing::error!(error = %format!("{e:#}"), "cannot cancel failed spool journal records: the journal stops");
                lock(shared).broken = Some(format!("cancelling failed records: {e}"));
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

    /// Marks records cancelled (flags byte, outside their CRC) and flushes the mark.
    fn cancel(&self, positions: &[(usize, u64)]) -> io::Result<()> {
        let mut segments: Vec<usize> = Vec::new();
        for (segment, offset) in positions {
            let file = self.segments.get(*segment).ok_or_else(|| io::Error::other("no such segment"))?;
            file.write_all_at(&[FLAG_CANCELLED], offset + FLAGS_AT as u64)?;
            if !segments.contains(segment) {
                segments.push(*segment);
            }
        }
        for segment in segments {
            if let Some(file) = self.segments.get(segment) {
                rustix::fs::fdatasync(file)?;
            }
        }
        Ok(())
    }

    /// Writes and flushes a batch, noting where each record went; on failure the segment is
    /// left for the next one.
    fn write_batch(&mut self, shared: &Shared, batch: &[Pending], written: &mut Vec<(usize, u64)>) -> io::Result<()> {
        let result = self.try_write_batch(shared, batch, written);
        if let Err(e) = &result {
            tracing::error!(error = %format!("{e:#}"), records = batch.len(), "failed to write the spool journal");
            self.must_rotate = true;
        }
        result
    }

    fn try_write_batch(
        &mut self,
        shared: &Shared,
        batch: &[Pending],
        written: &mut Vec<(usize, u64)>,
    ) -> io::Result<()> {
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
            let crc = record_crc(&header, &pending.meta, &pending.data);
            header[4..8].copy_from_slice(&crc.to_le_bytes());
            header.extend_from_slice(&pending.meta);
            written.push((self.current, self.offset));
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
            if let Some(why) = &state.checkpoint_error {
                return Err(io::Error::other(format!("no free spool journal segment: a checkpoint failed: {why}")));
            }
            state.checkpoint_wanted = true;
            shared.checkpointer_wake.notify_one();
            let now = Instant::now();
            if now >= deadline {
                return Err(io::Error::other("no free spool journal segment: no checkpoint in time"));
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
        // The slot not holding the last good checkpoint: a torn write leaves that one.
        let result = rustix::fs::syncfs(fs_handle)
            .map_err(io::Error::from)
            .and_then(|()| write_checkpoint(checkpoint, target, slot + 1));
        let mut state = lock(shared);
        match result {
            Ok(()) => {
                slot += 1;
                state.checkpointed = target;
                state.checkpoint_wanted = false;
                tracing::trace!(seq = target, micros = started.elapsed().as_micros() as u64, "spool checkpoint");
            }
            Err(e) => {
                // Never retried: after a write-back error a later syncfs can succeed for data
                // that was dropped. The journal keeps what it has; a restart rewrites it.
                tracing::error!(
                    error = %format!("{e:#}"),
                    "failed to checkpoint the spool journal: no more checkpoints until a restart \
                     (stores fail once the journal is full; restart the receiver)"
                );
                state.checkpoint_error = Some(e.to_string());
                drop(state);
                shared.writer_wake.notify_all();
                return;
            }
        }
        drop(state);
        shared.writer_wake.notify_all();
    }
}

/// The newest valid checkpoint and the slot (0 or 1, as a counter whose parity is the slot) it
/// is in; `(0, 1)` when there is none, so that the first write goes to slot 0.
fn read_checkpoint(file: &File) -> io::Result<(u64, u64)> {
    let mut best = (0, 1);
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
            let seq = u64::from_le_bytes(seq);
            if seq >= best.0 {
                best = (seq, n);
            }
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

/// Where a record found at start is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Sequence number.
    pub seq: u64,
    /// Segment index.
    pub segment: usize,
    /// Byte offset of its header in the segment.
    pub offset: u64,
    /// Cancelled: its store failed after it was written.
    pub cancelled: bool,
}

/// Offset of the flags byte in a record header (not covered by the CRC, so it can be set later).
const FLAGS_AT: usize = 24;
/// Flags bit: the record's store failed; never restore it.
const FLAG_CANCELLED: u8 = 1;

/// A record header, parsed.
struct Header {
    crc: u32,
    seq: u64,
    meta_len: u64,
    data_len: u64,
    flags: u8,
}

impl Header {
    fn parse(h: &[u8; HEADER_LEN]) -> Option<Self> {
        if &h[..4] != RECORD_MAGIC {
            return None;
        }
        let u32_at = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let mut seq = [0_u8; 8];
        seq.copy_from_slice(&h[8..16]);
        Some(Self {
            crc: u32_at(4),
            seq: u64::from_le_bytes(seq),
            meta_len: u64::from(u32_at(16)),
            data_len: u64::from(u32_at(20)),
            flags: h[FLAGS_AT],
        })
    }

    fn total(&self) -> u64 {
        HEADER_LEN as u64 + self.meta_len + self.data_len
    }

    fn crc(&self, header: &[u8], meta: &[u8], data: &[u8]) -> u32 {
        record_crc(header, meta, data)
    }
}

/// CRC-32C of a record: its header after the CRC field except the flags byte, then the event
/// and the file bytes.
fn record_crc(header: &[u8], meta: &[u8], data: &[u8]) -> u32 {
    let head = crc32c::crc32c(header.get(8..FLAGS_AT).unwrap_or_default());
    let head = crc32c::crc32c_append(head, header.get(FLAGS_AT + 1..HEADER_LEN).unwrap_or_default());
    crc32c::crc32c_append(crc32c::crc32c_append(head, meta), data)
}

/// The records of a segment from its start, while they are valid and their sequence numbers
/// grow: a torn record, bytes never written, or a record left from the segment's previous use
/// (smaller number, already checkpointed) ends the scan. Only positions are kept.
fn scan(segment: &mut File, index: usize, max_record: u64) -> io::Result<Vec<Position>> {
    let len = segment.metadata()?.len();
    segment.rewind()?;
    let mut reader = io::BufReader::with_capacity(1 << 20, &*segment);
    let mut found: Vec<Position> = Vec::new();
    let mut offset = 0_u64;
    let mut body = Vec::new();
    while offset + HEADER_LEN as u64 <= len {
        let mut header = [0_u8; HEADER_LEN];
        reader.read_exact(&mut header)?;
        let Some(h) = Header::parse(&header) else { break };
        if h.total() > max_record || offset + h.total() > len || found.last().is_some_and(|p| h.seq <= p.seq) {
            break;
        }
        body.resize((h.meta_len + h.data_len) as usize, 0);
        reader.read_exact(&mut body)?;
        let (meta, data) = body.split_at(h.meta_len as usize);
        if h.crc(&header, meta, data) != h.crc {
            break;
        }
        found.push(Position { seq: h.seq, segment: index, offset, cancelled: h.flags & FLAG_CANCELLED != 0 });
        offset += h.total();
    }
    Ok(found)
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

    fn state(segments: usize) -> Shared {
        Shared {
            state: Mutex::new(State {
                queue: Vec::new(),
                next_seq: 1,
                inflight: BTreeSet::new(),
                last_flushed: 0,
                checkpointed: 0,
                segment_max: vec![0; segments],
                checkpoint_wanted: false,
                checkpoint_error: None,
                broken: None,
                closed: false,
            }),
            writer_wake: Condvar::new(),
            checkpointer_wake: Condvar::new(),
        }
    }

    fn pending(dir: &Path, seq: u64) -> Pending {
        let (done, _rx) = oneshot::channel();
        Pending {
            seq,
            meta: format!("meta {seq}").into_bytes(),
            data: Bytes::from(vec![seq as u8; 1000 + seq as usize]),
            create: CreateFile { tmp: dir.join(format!("t{seq}")), path: dir.join(format!("x{seq}")) },
            done,
        }
    }

    fn seqs(positions: &[Position]) -> Vec<u64> {
        positions.iter().map(|p| p.seq).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn appended_records_place_their_files_and_are_checkpointed_on_close() {
        let dir = tempfile::tempdir().unwrap();
        let (opened, recovered) = Journal::open(&dir.path().join(".journal"), JournalOptions::default()).unwrap();
        assert!(recovered.is_empty());
        let journal = Arc::new(opened.start(dir.path()).unwrap());
        let mut tasks = Vec::new();
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
        // An existing file is never replaced.
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_store_is_cancelled_and_never_restored() {
        let dir = tempfile::tempdir().unwrap();
        let jdir = dir.path().join(".journal");
        let options = JournalOptions { checkpoint_interval: Duration::from_secs(3600), ..Default::default() };
        let (opened, _) = Journal::open(&jdir, options).unwrap();
        let journal = opened.start(dir.path()).unwrap();
        append(&journal, dir.path(), "ok1", b"one").await.unwrap();
        // The rename fails (its temp file is gone): the sender gets a failure status.
        let create = CreateFile { tmp: dir.path().join("missing.part"), path: dir.path().join("failed") };
        let err = journal.append(b"failed".to_vec(), Bytes::from_static(b"refused"), create).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        append(&journal, dir.path(), "ok2", b"two").await.unwrap();
        // Crash before any checkpoint: the stores that got Success come back, the failed one
        // does not (another version may have taken its name since).
        std::mem::forget(journal);
        let (opened, positions) = Journal::open(&jdir, options).unwrap();
        let metas: Vec<Vec<u8>> = positions.iter().map(|p| opened.read(p).unwrap().meta).collect();
        assert_eq!(metas, [b"ok1".to_vec(), b"ok2".to_vec()]);
    }

    #[test]
    fn records_after_the_checkpoint_are_recovered_in_order_up_to_a_torn_one() {
        let dir = tempfile::tempdir().unwrap();
        let jdir = dir.path().join(".journal");
        let (opened, _) = Journal::open(&jdir, JournalOptions::default()).unwrap();
        // Write records by hand as the writer would, then "crash" (no checkpoint).
        let mut writer = Writer::new(opened.segments, JournalOptions::default());
        let shared = state(8);
        let mut written = Vec::new();
        writer.write_batch(&shared, &[pending(dir.path(), 1), pending(dir.path(), 2)], &mut written).unwrap();
        writer.write_batch(&shared, &[pending(dir.path(), 3)], &mut written).unwrap();
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
        segment.write_all_at(RECORD_MAGIC, segment_len + 500).unwrap();

        let (opened, positions) = Journal::open(&jdir, JournalOptions::default()).unwrap();
        assert_eq!(seqs(&positions), [1, 2, 3]);
        let second = opened.read(&positions[1]).unwrap();
        assert_eq!(second.meta, b"meta 2");
        assert_eq!(second.data, vec![2_u8; 1002]);
        // Once started, the records found are checkpointed, and numbering goes on after them.
        let journal = opened.start(dir.path()).unwrap();
        assert_eq!(lock(&journal.shared).next_seq, 4);
        drop(journal);
        let (_, positions) = Journal::open(&jdir, JournalOptions::default()).unwrap();
        assert!(positions.is_empty());
    }

    #[test]
    fn a_reused_segment_is_read_up_to_its_previous_records_and_cancelled_ones_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let jdir = dir.path().join(".journal");
        let (opened, _) = Journal::open(&jdir, JournalOptions::default()).unwrap();
        let mut writer = Writer::new(opened.segments, JournalOptions::default());
        let shared = state(8);
        let mut written = Vec::new();
        // An earlier use of segment 0: larger records 1..=5, all checkpointed.
        let big = |seq: u64| {
            let mut p = pending(dir.path(), seq);
            p.data = Bytes::from(vec![9_u8; 5000]);
            p
        };
        writer.write_batch(&shared, &(1..=5).map(big).collect::<Vec<_>>(), &mut written).unwrap();
        write_checkpoint(&opened.checkpoint, 5, 0).unwrap();
        // Reused from its start (as after a rotation): records 6 and 7 overwrite the first.
        writer.offset = 0;
        written.clear();
        writer.write_batch(&shared, &[pending(dir.path(), 6), pending(dir.path(), 7)], &mut written).unwrap();
        writer.write_batch(&shared, &[pending(dir.path(), 8)], &mut written).unwrap();
        // Record 7's store failed after it was written.
        writer.cancel(&[written[1]]).unwrap();
        drop(writer);
        let (opened, positions) = Journal::open(&jdir, JournalOptions::default()).unwrap();
        assert_eq!(seqs(&positions), [6, 8], "7 cancelled; the stale 2..=5 behind them are not read");
        assert_eq!(opened.max_seq, 8);
        assert_eq!(opened.checkpointed, 5);
    }

    #[test]
    fn checkpoints_alternate_slots_and_survive_a_torn_one() {
        let dir = tempfile::tempdir().unwrap();
        let file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(dir.path().join("c")).unwrap();
        assert_eq!(read_checkpoint(&file).unwrap(), (0, 1));
        write_checkpoint(&file, 10, 0).unwrap();
        assert_eq!(read_checkpoint(&file).unwrap(), (10, 0));
        write_checkpoint(&file, 20, 1).unwrap();
        assert_eq!(read_checkpoint(&file).unwrap(), (20, 1));
        // A torn write of the next one (slot 0) leaves 20 in slot 1.
        file.write_all_at(b"BFJC\xff\xff", 0).unwrap();
        assert_eq!(read_checkpoint(&file).unwrap(), (20, 1));
    }

    #[test]
    fn journal_options_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        for bad in [
            JournalOptions { segments: 2, ..Default::default() },
            JournalOptions { segment_size: 4096, ..Default::default() },
        ] {
            let err = Journal::open(&dir.path().join("j"), bad).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn segments_are_reused_after_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let jdir = dir.path().join(".journal");
        let options = JournalOptions { segment_size: 64 << 10, segments: 3, ..JournalOptions::default() };
        let (opened, _) = Journal::open(&jdir, options).unwrap();
        let journal = Arc::new(opened.start(dir.path()).unwrap());
        // Enough data to go around every segment several times, several stores at once (so
        // batches hold more than one record and rotate in the middle).
        let chunk = vec![7_u8; 6000];
        let rounds = (options.segments as u64 * options.segment_size / chunk.len() as u64) * 3;
        for i in 0..rounds / 4 {
            let mut tasks = Vec::new();
            for k in 0..4 {
                let (journal, dir, chunk) = (journal.clone(), dir.path().to_path_buf(), chunk.clone());
                tasks.push(tokio::spawn(async move { append(&journal, &dir, &format!("big{i}-{k}"), &chunk).await }));
            }
            for t in tasks {
                t.await.unwrap().unwrap();
            }
        }
        for n in 0..options.segments {
            let len = fs::metadata(jdir.join(format!("segment-{n}"))).unwrap().len();
            assert!(len <= options.segment_size, "segment {n} is {len} bytes");
            assert!(len > 0, "segment {n} was used");
        }
        // A crash now: what the journal hands back is exactly what was not checkpointed, in order.
        std::mem::forget(Arc::into_inner(journal).unwrap());
        let (opened, positions) = Journal::open(&jdir, options).unwrap();
        assert!(seqs(&positions).windows(2).all(|w| w[0] < w[1]));
        assert!(positions.iter().all(|p| p.seq > opened.checkpointed));
        for p in &positions {
            assert_eq!(opened.read(p).unwrap().data, chunk);
        }
    }
}
