//! One C-STORE: gather the data set, validate it, make it durable in the
//! spool, publish `InstanceStored`, and decide the response status.
//!
//! Success is answered only after the instance is durable and JetStream has
//! acknowledged the event. Durability (see [`crate::spool`]): an instance held
//! in memory is appended to the spool journal (one `fdatasync` shared with the
//! stores waiting at that moment) and then written under its name; a larger
//! one, already in a temp file, is synced, linked to its name and synced again
//! (group commits shared with the other associations). Failures never answer
//! Success:
//! - the data set cannot be parsed, UIDs are missing or invalid → 0xC000, nothing kept;
//! - disk errors → 0xA700, temp file removed;
//! - the bus does not acknowledge → 0xA700, the spool file is KEPT: it is
//!   durable, and a resend of the same bytes publishes the same message id,
//!   which JetStream de-duplicates.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use bidsflux_messaging::{Bus, now_unix_ms, subjects};
use bidsflux_proto::v1 as pb;
use bidsflux_session::{SpoolPath, Uid};
use dicom_dictionary_std::{tags, uids};
use dicom_encoding::transfer_syntax::TransferSyntaxIndex as _;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use prost::Message as _;
use tracing::{Instrument as _, Span, error, info, info_span, warn};

use crate::dimse::status;
use crate::header;
use crate::metrics::{Metrics, StoreResult};
use crate::rule_attributes::RuleAttributes;
use crate::space::SpaceGuard;
use crate::spool::{Decision, Existing, FinishedPart, PartFile, PartMeta, Placed, Placement, Spool};

/// What every store of the service shares.
#[derive(Debug)]
pub struct StoreContext {
    /// Where files go.
    pub spool: Spool,
    /// Where events go.
    pub bus: Bus,
    /// Refuses stores while the spool's disk is nearly full.
    pub space: SpaceGuard,
    /// Counters of stores (and, through the service, of associations).
    pub metrics: Arc<Metrics>,
    /// Attributes copied into the event for completion rules.
    pub rule_attributes: Arc<RuleAttributes>,
}

/// Why a store failed, mapped to a DIMSE status.
#[derive(Debug)]
pub enum Failure {
    /// Disk or bus trouble: 0xA700 (the sender may retry).
    OutOfResources(anyhow::Error),
    /// The data set is not usable: 0xC000.
    CannotUnderstand(anyhow::Error),
    /// The spool's disk is below `BIDSFLUX_SPOOL_MIN_FREE`: 0xA700 (logged, rate-limited, by the guard).
    NearlyFull(anyhow::Error),
    /// The command's SOP class is not the presentation context's: 0x0122.
    NotSupported(anyhow::Error),
}

impl Failure {
    fn status(&self) -> u16 {
        match self {
            Self::OutOfResources(_) | Self::NearlyFull(_) => status::OUT_OF_RESOURCES,
            Self::CannotUnderstand(_) => status::CANNOT_UNDERSTAND,
            Self::NotSupported(_) => status::SOP_CLASS_NOT_SUPPORTED,
        }
    }

    fn error(&self) -> &anyhow::Error {
        match self {
            Self::OutOfResources(e) | Self::CannotUnderstand(e) | Self::NearlyFull(e) | Self::NotSupported(e) => e,
        }
    }
}

/// The answer to a C-STORE-RQ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// DIMSE status.
    pub status: u16,
    /// ErrorComment for failures (no patient values).
    pub comment: Option<String>,
}

/// The request side of a store, from the command set and the presentation context.
#[derive(Debug, Clone)]
pub struct StoreRequest {
    /// AffectedSOPClassUID.
    pub sop_class_uid: String,
    /// The abstract syntax negotiated for the presentation context the command came on.
    pub context_sop_class_uid: String,
    /// AffectedSOPInstanceUID.
    pub sop_instance_uid: String,
    /// The presentation context's transfer syntax.
    pub transfer_syntax_uid: String,
    /// Calling AE title.
    pub calling_ae_title: String,
    /// Called AE title.
    pub called_ae_title: String,
}

/// A C-STORE whose data set is arriving.
#[derive(Debug)]
pub struct IncomingStore {
    request: StoreRequest,
    /// `Err` once something failed: remaining fragments are then read and dropped.
    sink: Result<PartFile, Failure>,
    span: Span,
    received_at_unix_ms: i64,
    /// When the command arrived, for the latency histogram.
    started: Instant,
}

impl IncomingStore {
    /// Starts receiving: validates the command's UIDs and opens the temp file.
    pub async fn begin(ctx: &StoreContext, request: StoreRequest) -> Self {
        let span = info_span!(
            "store",
            sop_instance_uid = %request.sop_instance_uid,
            sop_class_uid = %request.sop_class_uid,
            transfer_syntax = %request.transfer_syntax_uid,
            series_instance_uid = tracing::field::Empty,
            study_instance_uid = tracing::field::Empty,
            size = tracing::field::Empty,
            status = tracing::field::Empty,
        );
        let sink = async {
            Uid::parse("AffectedSOPClassUID", &request.sop_class_uid)
                .map_err(|e| Failure::CannotUnderstand(e.into()))?;
            Uid::parse("AffectedSOPInstanceUID", &request.sop_instance_uid)
                .map_err(|e| Failure::CannotUnderstand(e.into()))?;
            if request.sop_class_uid != request.context_sop_class_uid {
                return Err(Failure::NotSupported(anyhow::anyhow!(
                    "AffectedSOPClassUID {} is not the presentation context's SOP class {}",
                    request.sop_class_uid,
                    request.context_sop_class_uid
                )));
            }
            // Refused before any byte is written; the data set is then read and dropped.
            ctx.space.check().map_err(|e| Failure::NearlyFull(e.into()))?;
            let meta = PartMeta {
                sop_class_uid: &request.sop_class_uid,
                sop_instance_uid: &request.sop_instance_uid,
                transfer_syntax_uid: &request.transfer_syntax_uid,
                calling_ae_title: &request.calling_ae_title,
            };
            ctx.spool.create_part(&meta).context("start spool file").map_err(Failure::OutOfResources)
        }
        .instrument(span.clone())
        .await;
        Self { request, sink, span, received_at_unix_ms: now_unix_ms(), started: Instant::now() }
    }

    /// Appends a data set fragment (dropped if the store already failed).
    pub async fn data(&mut self, bytes: &[u8]) {
        if let Ok(part) = &mut self.sink
            && let Err(e) = part.append(bytes).await
        {
            // Dropping the part file removes it.
            self.sink = Err(Failure::OutOfResources(anyhow::Error::new(e).context("write spool temp file")));
        }
    }

    /// The last fragment arrived: finish, place, publish; returns the response status.
    pub async fn complete(self, ctx: &StoreContext) -> Outcome {
        let Self { request, sink, span, received_at_unix_ms, started } = self;
        async move {
            let result = match sink {
                Ok(part) => finish(ctx, &request, part, received_at_unix_ms).await,
                Err(failure) => Err(failure),
            };
            let outcome = match result {
                Ok((placement, dataset_len)) => {
                    info!(?placement, "instance stored");
                    let result = match placement {
                        Placement::New => StoreResult::Stored,
                        Placement::Duplicate => StoreResult::Duplicate,
                        Placement::Conflict => StoreResult::Conflict,
                    };
                    ctx.metrics.store(result, dataset_len, started.elapsed());
                    Outcome { status: status::SUCCESS, comment: None }
                }
                Err(failure) => {
                    let e = failure.error();
                    match &failure {
                        Failure::OutOfResources(_) => error!(error = %format!("{e:#}"), "failed to store instance"),
                        Failure::CannotUnderstand(_) | Failure::NotSupported(_) => {
                            warn!(error = %format!("{e:#}"), "refused instance")
                        }
                        Failure::NearlyFull(_) => tracing::debug!("refused instance: spool disk nearly full"),
                    }
                    ctx.metrics.store(StoreResult::Failed, 0, started.elapsed());
                    Outcome { status: failure.status(), comment: Some(format!("{e}")) }
                }
            };
            Span::current().record("status", format!("0x{:04X}", outcome.status));
            outcome
        }
        .instrument(span)
        .await
    }
}

/// Attributes read from the received data set.
#[derive(Debug)]
pub struct Attributes {
    study: Uid,
    series: Uid,
    sop: Uid,
    modality: String,
    series_description: String,
    series_number: String,
    /// The rule attributes found (may hold patient values if so configured: never log).
    extra: std::collections::HashMap<String, String>,
}

async fn finish(
    ctx: &StoreContext,
    request: &StoreRequest,
    part: PartFile,
    received_at_unix_ms: i64,
) -> Result<(Placement, u64), Failure> {
    let part = part.finish().await.context("write spool temp file").map_err(Failure::OutOfResources)?;
    Span::current().record("size", part.dataset_len);
    // We wrote the file meta group ourselves: the data set starts right after it and its
    // transfer syntax is the negotiated one, so neither is parsed back.
    let offset = part.file_size - part.dataset_len;
    let attrs = match (part.bytes(), part.path()) {
        // Held in memory: the header is a few kilobytes in front of the pixels, read it here.
        (Some(bytes), _) => {
            let dataset = bytes.get(offset as usize..).unwrap_or_default();
            inspect_dataset(dataset, &request.transfer_syntax_uid, &ctx.rule_attributes)
        }
        (None, Some(path)) => {
            let path = path.to_path_buf();
            let (ts, wanted) = (request.transfer_syntax_uid.clone(), ctx.rule_attributes.clone());
            tokio::task::spawn_blocking(move || inspect_file(&path, offset, &ts, &wanted))
                .await
                .context("join data set inspection")
                .map_err(Failure::OutOfResources)?
        }
        (None, None) => Err(anyhow::anyhow!("instance neither in memory nor in a file")),
    }
    .map_err(Failure::CannotUnderstand)?;
    Span::current().record("study_instance_uid", tracing::field::display(&attrs.study));
    Span::current().record("series_instance_uid", tracing::field::display(&attrs.series));
    if attrs.sop.as_str() != request.sop_instance_uid {
        return Err(Failure::CannotUnderstand(anyhow::anyhow!(
            "SOPInstanceUID of the data set differs from the command's AffectedSOPInstanceUID"
        )));
    }
    let instance = SpoolPath::new(attrs.study.clone(), attrs.series.clone(), attrs.sop.clone());
    // Checked again before a name is given: a large instance may have taken a while to arrive.
    // The temp file goes with `part` on this path.
    ctx.space.check().map_err(|e| Failure::NearlyFull(e.into()))?;
    let mut event = pb::InstanceStored {
        study_instance_uid: attrs.study.to_string(),
        series_instance_uid: attrs.series.to_string(),
        sop_instance_uid: attrs.sop.to_string(),
        sop_class_uid: request.sop_class_uid.clone(),
        transfer_syntax_uid: request.transfer_syntax_uid.clone(),
        spool_path: String::new(),
        file_size: 0,
        dataset_sha256: part.dataset_sha256.clone(),
        calling_ae_title: request.calling_ae_title.clone(),
        called_ae_title: request.called_ae_title.clone(),
        received_at_unix_ms,
        modality: attrs.modality,
        series_description: attrs.series_description,
        series_number: attrs.series_number,
        attributes: attrs.extra,
    };
    let dataset_len = part.dataset_len;
    let placed = {
        // No other store of this SOP instance between choosing the name and writing the file.
        let _lock = ctx.spool.lock(instance.sop().as_str()).await;
        match part.bytes().cloned() {
            Some(bytes) if ctx.spool.journaled(event.encoded_len() + 256, bytes.len()) => {
                place_journaled(ctx, &instance, &mut event, &part, bytes).await?
            }
            _ => place_synced(ctx, instance, part).await?,
        }
    };
    event.spool_path.clone_from(&placed.relative_path);
    event.file_size = placed.file_size;
    announce(&ctx.bus, &event, placed.existing.as_ref()).await.map_err(Failure::OutOfResources)?;
    Ok((placed.placement, dataset_len))
}

/// Stores an instance held in memory through the spool journal: one flush, shared with the
/// stores waiting at the same moment (see [`crate::spool`]).
async fn place_journaled(
    ctx: &StoreContext,
    instance: &SpoolPath,
    event: &mut pb::InstanceStored,
    part: &FinishedPart,
    bytes: bytes::Bytes,
) -> Result<Placed, Failure> {
    let spool = ctx.spool.clone();
    let (sha256, size, instance, data) = (part.dataset_sha256.clone(), part.file_size, instance.clone(), bytes.clone());
    // Choosing the name and writing the temp file happen here, in parallel with other stores;
    // the journal's single writer thread only appends, flushes and renames.
    let decided = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        match spool.decide(&sha256, size, &instance).context("choose the spool file name")? {
            Decision::Create { path, placed } => {
                let tmp = spool.write_temp(&data).context("write spool temp file")?;
                Ok((placed, Some((path, tmp))))
            }
            Decision::Exists(placed) => Ok((placed, None)),
        }
    })
    .await
    .context("join spool placement")
    .map_err(Failure::OutOfResources)?
    .map_err(Failure::OutOfResources)?;
    match decided {
        // The identical file is durable already, or recoverable from the journal record that
        // created it (this store waited for its lock).
        (placed, None) => Ok(placed),
        (placed, Some((path, tmp))) => {
            event.spool_path.clone_from(&placed.relative_path);
            event.file_size = placed.file_size;
            ctx.spool
                .journal(event, bytes, &tmp, path)
                .await
                .context("journal the instance and name its spool file")
                .map_err(Failure::OutOfResources)?;
            Ok(placed)
        }
    }
}

/// Stores an instance in a temp file (a large one) with two group commits: the data is
/// durable before a name points at it, and the name before the event announces it.
async fn place_synced(ctx: &StoreContext, instance: SpoolPath, mut part: FinishedPart) -> Result<Placed, Failure> {
    if part.path().is_none() {
        // Held in memory but too large for a journal record.
        part = tokio::task::spawn_blocking(move || part.spill().map(|()| part))
            .await
            .context("join spool temp file")
            .map_err(Failure::OutOfResources)?
            .context("write spool temp file")
            .map_err(Failure::OutOfResources)?;
    }
    ctx.spool.sync().await.context("sync spool temp file").map_err(Failure::OutOfResources)?;
    let spool = ctx.spool.clone();
    let (part, placed) = tokio::task::spawn_blocking(move || {
        let placed = spool.place(&part, &instance);
        (part, placed)
    })
    .await
    .context("join spool placement")
    .map_err(Failure::OutOfResources)?;
    let placed = placed.context("place instance in the spool").map_err(Failure::OutOfResources)?;
    // The name (or the identical file another store just placed) is durable before the event
    // announces it.
    ctx.spool.sync().await.context("sync spool placement").map_err(Failure::OutOfResources)?;
    // The temp file goes now: the spool file (or the identical one already there) is durable.
    drop(part);
    Ok(placed)
}

/// Publishes an instance's event (and first, for a conflict file, the conflict). The spool
/// file is kept if this fails: a resend of the same bytes publishes the same message ids,
/// which JetStream de-duplicates.
pub async fn announce(bus: &Bus, event: &pb::InstanceStored, existing: Option<&Existing>) -> anyhow::Result<()> {
    if let Some(existing) = existing {
        warn!(
            spool_path = %event.spool_path,
            existing_spool_path = %existing.relative_path,
            "a different data set with this SOPInstanceUID is spooled, kept both"
        );
        let conflict = pb::InstanceConflict {
            study_instance_uid: event.study_instance_uid.clone(),
            series_instance_uid: event.series_instance_uid.clone(),
            sop_instance_uid: event.sop_instance_uid.clone(),
            existing_spool_path: existing.relative_path.clone(),
            existing_dataset_sha256: existing.dataset_sha256.clone(),
            conflict_spool_path: event.spool_path.clone(),
            conflict_dataset_sha256: event.dataset_sha256.clone(),
            calling_ae_title: event.calling_ae_title.clone(),
            received_at_unix_ms: event.received_at_unix_ms,
        };
        // Same conflicting bytes again, same id: JetStream keeps one event.
        let msg_id = subjects::conflict_msg_id(&conflict.sop_instance_uid, &conflict.conflict_dataset_sha256);
        bus.publish(subjects::INSTANCE_CONFLICT, &conflict, Some(&msg_id))
            .await
            .context("publish InstanceConflict (the spool files are kept)")?;
    }
    let msg_id = subjects::instance_msg_id(&event.sop_instance_uid, &event.dataset_sha256);
    bus.publish(subjects::INSTANCE_STORED, event, Some(&msg_id))
        .await
        .context("publish InstanceStored (the spool file is kept)")?;
    Ok(())
}

/// Reads the header of the data set that starts `offset` bytes into a spooled temp file: at most
/// [`header::MAX_HEADER`] bytes, walked and checked by [`header::header_len`] before anything is
/// parsed.
fn inspect_file(path: &Path, offset: u64, ts_uid: &str, wanted: &RuleAttributes) -> anyhow::Result<Attributes> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let mut file = std::fs::File::open(path).context("open spool temp file")?;
    file.seek(SeekFrom::Start(offset)).context("seek to the data set")?;
    let (enc, deflated) = header::Encoding::of(ts_uid);
    if deflated {
        // Inflated in a bounded stream; the walk sees at most MAX_HEADER bytes.
        return inspect_prefix(&[], ts_uid, false, &mut file, wanted);
    }
    // Read a small prefix first and grow it only for unusually large headers: memory stays
    // bounded by MAX_HEADER whatever the instance size.
    let mut limit = header::FIRST_READ;
    loop {
        file.seek(SeekFrom::Start(offset)).context("seek to the data set")?;
        let mut prefix = Vec::new();
        (&mut file).take(limit as u64 + 1).read_to_end(&mut prefix).context("read data set header")?;
        let complete = prefix.len() <= limit;
        prefix.truncate(limit);
        match header_len(&prefix, enc, complete, wanted) {
            Err(header::HeaderError::TooLarge) if limit < header::MAX_HEADER => limit = header::MAX_HEADER,
            Ok(len) => return parse_header(&prefix[..len], enc, wanted),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Reads the header of a whole data set held in memory.
pub fn inspect_dataset(dataset: &[u8], ts_uid: &str, wanted: &RuleAttributes) -> anyhow::Result<Attributes> {
    inspect_prefix(dataset, ts_uid, true, &mut std::io::empty(), wanted)
}

/// Where the header walk ends: past (0020,0011), and past every attribute rules want.
fn header_len(
    bytes: &[u8],
    enc: header::Encoding,
    complete: bool,
    wanted: &RuleAttributes,
) -> Result<usize, header::HeaderError> {
    header::header_len_until(bytes, enc, complete, wanted.stop_after().unwrap_or(header::STOP))
}

/// Reads the header of Part 10 bytes from any source (their meta group is parsed for the
/// transfer syntax), extracting the default rule attributes. Public for `fuzz/`.
pub fn inspect_bytes(bytes: &[u8]) -> anyhow::Result<Attributes> {
    if bytes.get(128..132) != Some(b"DICM".as_slice()) || bytes.get(132..138) != Some(b"\x02\x00\x00\x00UL".as_slice())
    {
        anyhow::bail!("not a Part 10 header");
    }
    let len = bytes.get(140..144).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).unwrap_or_default();
    let offset =
        144usize.checked_add(len as usize).filter(|o| *o <= bytes.len()).context("meta group runs past the end")?;
    let meta = dicom_object::FileMetaTable::from_reader(&bytes[128..offset]).context("parse file meta group")?;
    let ts = meta.transfer_syntax().trim_end_matches(['\0', ' ']);
    inspect_dataset(&bytes[offset..], ts, &RuleAttributes::default_list())
}

/// Walks and parses the start of a data set (`complete` when it is all of it; `rest` continues a
/// deflated stream).
fn inspect_prefix(
    dataset: &[u8],
    ts_uid: &str,
    complete: bool,
    rest: &mut dyn std::io::Read,
    wanted: &RuleAttributes,
) -> anyhow::Result<Attributes> {
    let (enc, deflated) = header::Encoding::of(ts_uid);
    let inflated;
    let (bytes, complete) = if deflated {
        let (out, all) = header::inflate_prefix(std::io::Read::chain(dataset, rest)).context("inflate data set")?;
        inflated = out;
        (inflated.as_slice(), all)
    } else {
        (dataset, complete)
    };
    let len = header_len(bytes, enc, complete, wanted)?;
    parse_header(&bytes[..len], enc, wanted)
}

/// Parses a header prefix that [`header::header_len`] has checked.
fn parse_header(checked: &[u8], enc: header::Encoding, wanted: &RuleAttributes) -> anyhow::Result<Attributes> {
    let ts = match enc {
        header::Encoding::ImplicitLe => uids::IMPLICIT_VR_LITTLE_ENDIAN,
        header::Encoding::ExplicitLe => uids::EXPLICIT_VR_LITTLE_ENDIAN,
        header::Encoding::ExplicitBe => "1.2.840.10008.1.2.2",
    };
    let ts = TransferSyntaxRegistry.get(ts).context("transfer syntax registry")?;
    let obj = InMemDicomObject::read_dataset_with_ts(checked, ts).context("parse received data set")?;
    attributes(&obj, wanted)
}

/// The attributes we file and announce an instance by, its UIDs validated.
fn attributes(obj: &InMemDicomObject, wanted: &RuleAttributes) -> anyhow::Result<Attributes> {
    let text = |tag| -> Option<String> {
        let e = obj.element_opt(tag).ok().flatten()?;
        let s = if e.vr() == dicom_core::VR::UN {
            // A sender that re-encoded implicit VR data as explicit without a dictionary labels
            // even standard attributes UN (PS3.5 6.2.2): their bytes are still the value.
            String::from_utf8_lossy(&e.to_bytes().ok()?).into_owned()
        } else {
            e.to_str().ok()?.into_owned()
        };
        Some(s.trim_end_matches(['\0', ' ']).trim_start().to_owned())
    };
    let uid =
        |tag, what: &'static str| -> anyhow::Result<Uid> { Ok(Uid::parse(what, text(tag).as_deref().unwrap_or(""))?) };
    Ok(Attributes {
        study: uid(tags::STUDY_INSTANCE_UID, "StudyInstanceUID")?,
        series: uid(tags::SERIES_INSTANCE_UID, "SeriesInstanceUID")?,
        sop: uid(tags::SOP_INSTANCE_UID, "SOPInstanceUID")?,
        modality: text(tags::MODALITY).unwrap_or_default(),
        series_description: text(tags::SERIES_DESCRIPTION).unwrap_or_default(),
        series_number: text(tags::SERIES_NUMBER).unwrap_or_default(),
        extra: wanted.extract(obj),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An explicit VR little endian element; `long` VRs have a 32-bit length.
    fn el(out: &mut Vec<u8>, group: u16, element: u16, vr: &[u8; 2], value: &[u8]) {
        out.extend(group.to_le_bytes());
        out.extend(element.to_le_bytes());
        out.extend(vr);
        if matches!(vr, b"UN" | b"OB" | b"OW" | b"SQ" | b"UT") {
            out.extend([0, 0]);
            out.extend((value.len() as u32).to_le_bytes());
        } else {
            out.extend((value.len() as u16).to_le_bytes());
        }
        out.extend(value);
    }

    /// UIDs labelled UN (a sender's implicit → explicit conversion without a dictionary) are
    /// read as their bytes, not refused.
    #[test]
    fn uids_labelled_un_are_read() {
        let mut ds = Vec::new();
        el(&mut ds, 0x0008, 0x0016, b"UI", b"1.2.840.10008.5.1.4.1.1.4\0");
        el(&mut ds, 0x0008, 0x0018, b"UN", b"1.2.3.4.5.6");
        el(&mut ds, 0x0008, 0x0060, b"CS", b"MR");
        el(&mut ds, 0x0020, 0x000D, b"UN", b"1.2.3.4\0");
        el(&mut ds, 0x0020, 0x000E, b"UN", b"1.2.3.4.5\0");
        el(&mut ds, 0x0020, 0x0011, b"IS", b"7 ");
        let a = inspect_dataset(&ds, uids::EXPLICIT_VR_LITTLE_ENDIAN, &RuleAttributes::default_list()).unwrap();
        assert_eq!((a.study.as_str(), a.series.as_str(), a.sop.as_str()), ("1.2.3.4", "1.2.3.4.5", "1.2.3.4.5.6"));
        assert_eq!((a.modality.as_str(), a.series_number.as_str()), ("MR", "7"));

        // Still validated: a hostile value under UN is refused like any other.
        let mut bad = Vec::new();
        el(&mut bad, 0x0008, 0x0018, b"UN", b"1.2.3.4.5.6");
        el(&mut bad, 0x0020, 0x000D, b"UN", b"../etc");
        el(&mut bad, 0x0020, 0x000E, b"UI", b"1.2.3.4.5\0");
        let e = inspect_dataset(&bad, uids::EXPLICIT_VR_LITTLE_ENDIAN, &RuleAttributes::default_list()).unwrap_err();
        assert!(format!("{e:#}").contains("StudyInstanceUID"), "{e:#}");
    }
}
