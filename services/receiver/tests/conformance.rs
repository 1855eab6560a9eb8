//! Conformance with real peers: compressed transfer syntaxes are stored byte
//! for byte as sent, every listed syntax is negotiable, and an unknown SOP
//! class is refused per presentation context while the others go on.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};

use bidsflux_receiver::conformance::TRANSFER_SYNTAXES;
use bidsflux_testsupport::dicom::{dataset_bytes, sop_instance_uid};
use common::{AE, Harness, pydicom_test_files, python, storescu_with, successes, text};
use dicom_dictionary_std::{tags, uids};
use dicom_ul::association::ClientAssociationOptions;
use dicom_ul::pdu::PresentationContextResultReason;

/// pydicom's files, one per compressed syntax: name, syntax, the DCMTK storescu option proposing it.
const COMPRESSED: &[(&str, &str, &str)] = &[
    ("SC_rgb_jpeg_dcmtk.dcm", "1.2.840.10008.1.2.4.50", "-xy"),
    ("JPGExtended.dcm", "1.2.840.10008.1.2.4.51", "-xx"),
    ("SC_rgb_jpeg_gdcm.dcm", "1.2.840.10008.1.2.4.70", "-xs"),
    ("MR_small_jpeg_ls_lossless.dcm", "1.2.840.10008.1.2.4.80", "-xt"),
    ("MR_small_jp2klossless.dcm", "1.2.840.10008.1.2.4.90", "-xv"),
    ("JPEG2000.dcm", "1.2.840.10008.1.2.4.91", "-xw"),
    ("MR_small_RLE.dcm", "1.2.840.10008.1.2.5", "-xr"),
    ("image_dfl.dcm", "1.2.840.10008.1.2.1.99", "-xd"),
];

/// Checks that `file` was spooled in `ts` with its data set bytes unchanged; returns the event's
/// spool path.
async fn assert_stored_as_sent(h: &Harness, file: &Path, ts: &str) {
    let sent = dataset_bytes(file).unwrap();
    let sop = sop_instance_uid(file).unwrap();
    let events = h.events().await;
    let (ev, _, _) = events.iter().find(|(e, _, _)| e.sop_instance_uid == sop).unwrap_or_else(|| panic!("{file:?}"));
    assert_eq!(ev.transfer_syntax_uid, ts, "{file:?}");
    let spooled = h.spool.path().join(&ev.spool_path);
    assert_eq!(dataset_bytes(&spooled).unwrap(), sent, "{file:?}: data set bytes differ");
    let obj = dicom_object::OpenFileOptions::new().read_until(tags::PIXEL_DATA).open_file(&spooled).unwrap();
    assert_eq!(obj.meta().transfer_syntax().trim_end_matches('\0'), ts, "{file:?}");
}

const WITH_NEW_UID: &str = r#"
import sys
from pydicom import dcmread
from pydicom.uid import generate_uid
for src, dst in zip(sys.argv[1::2], sys.argv[2::2]):
    ds = dcmread(src)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(dst, enforce_file_format=True)
"#;

/// Copies of the [`COMPRESSED`] files in `dir`, each with a new SOP Instance UID (several of
/// pydicom's files share one), pixel data and syntax unchanged.
async fn compressed_copies(dir: &Path) -> Vec<PathBuf> {
    let files = pydicom_test_files();
    let mut args = Vec::new();
    let mut out = Vec::new();
    for (name, _, _) in COMPRESSED {
        args.push(files.join(name).to_string_lossy().into_owned());
        let dst = dir.join(name);
        args.push(dst.to_string_lossy().into_owned());
        out.push(dst);
    }
    python(WITH_NEW_UID, &args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    out
}

const SEND_FILES: &str = r#"
import sys
from pydicom import dcmread
from pynetdicom import AE
port, called, paths = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
ae = AE(ae_title="PYSCU")
ae.acse_timeout = 10
ae.dimse_timeout = 20
for p in paths:
    meta = dcmread(p, stop_before_pixels=True)
    ae.add_requested_context(meta.SOPClassUID, [meta.file_meta.TransferSyntaxUID])
assoc = ae.associate("127.0.0.1", port, ae_title=called)
if not assoc.is_established:
    print("NOASSOC")
    sys.exit(0)
for p in paths:
    # A path: pynetdicom sends the file's data set bytes as they are.
    status = assoc.send_c_store(p)
    print("STATUS 0x%04X %s" % (status.Status, p))
assoc.release()
"#;

/// pynetdicom sends each file's bytes unchanged in its own syntax: every one lands in the spool
/// in that syntax, byte for byte (deflated included: the header was inflated to file it, the
/// stored bytes are still the deflated stream).
#[tokio::test]
async fn compressed_syntaxes_are_stored_byte_identical() {
    let h = Harness::start().await;
    let dir = tempfile::tempdir().unwrap();
    let files = compressed_copies(dir.path()).await;
    let paths: Vec<String> = files.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let port = h.port.to_string();
    let mut args = vec![port.as_str(), AE];
    args.extend(paths.iter().map(String::as_str));
    let out = python(SEND_FILES, &args).await;
    assert_eq!(out.matches("STATUS 0x0000").count(), COMPRESSED.len(), "{out}");
    for (file, (_, ts, _)) in files.iter().zip(COMPRESSED) {
        assert_stored_as_sent(&h, file, ts).await;
    }
    assert_eq!(h.stream_count().await, COMPRESSED.len() as u64);
    assert!(h.temp_files().is_empty(), "{:?}", h.temp_files());
    h.stop().await;
}

/// DCMTK's storescu, proposing each compressed syntax with its option, gets Success and the
/// instance is spooled in that syntax.
#[tokio::test]
async fn storescu_sends_every_compressed_syntax() {
    let h = Harness::start().await;
    let dir = tempfile::tempdir().unwrap();
    for (file, (name, ts, option)) in compressed_copies(dir.path()).await.iter().zip(COMPRESSED) {
        // storescu sends every file of the directory it is given: one directory per file.
        let src = tempfile::tempdir().unwrap();
        let file = &src.path().join(file.file_name().unwrap());
        std::fs::rename(dir.path().join(name), file).unwrap();
        let out = storescu_with(h.port, &["-aet", "SCANNER", "-aec", AE, "-R", option], src.path()).await;
        assert_eq!(successes(&out), 1, "{name}: {}", text(&out));
        let sop = sop_instance_uid(file).unwrap();
        let events = h.events().await;
        let (ev, _, _) = events.iter().find(|(e, _, _)| e.sop_instance_uid == sop).unwrap();
        assert_eq!(ev.transfer_syntax_uid, *ts, "{name}: {}", text(&out));
    }
    h.stop().await;
}

/// Every transfer syntax of the conformance statement (HTJ2K included, for which we have no
/// sample file) is accepted when proposed alone; an unknown one is not.
#[tokio::test]
async fn every_listed_transfer_syntax_is_accepted() {
    let h = Harness::start().await;
    let mut options = ClientAssociationOptions::new().calling_ae_title("RAW").called_ae_title(AE);
    for (ts, _) in TRANSFER_SYNTAXES {
        options = options.with_presentation_context(uids::MR_IMAGE_STORAGE, vec![*ts]);
    }
    options = options.with_presentation_context(uids::MR_IMAGE_STORAGE, vec!["1.2.3.4.5.6.7.8"]);
    let assoc = options.establish_async(("127.0.0.1", h.port)).await.unwrap();
    // dicom-ul's client keeps only the accepted contexts: the unknown syntax's is missing.
    let pcs = assoc.presentation_contexts();
    assert_eq!(pcs.len(), TRANSFER_SYNTAXES.len(), "{pcs:?}");
    for (pc, (ts, name)) in pcs.iter().zip(TRANSFER_SYNTAXES) {
        assert_eq!(pc.reason, PresentationContextResultReason::Acceptance, "{name}");
        assert_eq!(pc.transfer_syntax.trim_end_matches('\0'), *ts, "{name}");
    }
    assoc.release().await.unwrap();
    h.stop().await;
}

const UNKNOWN_AND_KNOWN: &str = r#"
import sys
from pynetdicom import AE
port, path, called = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ae = AE(ae_title="PYSCU")
ae.acse_timeout = 10
ae.dimse_timeout = 20
ae.add_requested_context("1.2.826.0.1.3680043.9.9999.1", ["1.2.840.10008.1.2.1"])
ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4", ["1.2.840.10008.1.2"])
assoc = ae.associate("127.0.0.1", port, ae_title=called)
if not assoc.is_established:
    print("NOASSOC")
    sys.exit(0)
for cx in assoc.rejected_contexts:
    print("REJECTED %s %d" % (cx.abstract_syntax, cx.result))
for cx in assoc.accepted_contexts:
    print("ACCEPTED %s" % cx.abstract_syntax)
status = assoc.send_c_store(path)
print("STATUS 0x%04X" % status.Status)
assoc.release()
"#;

/// A context with an unknown SOP class is refused (result 3, abstract-syntax-not-supported) and
/// the association goes on: the MR context proposed with it is accepted and used.
#[tokio::test]
async fn unknown_sop_class_is_refused_per_presentation_context() {
    let h = Harness::start().await;
    let file = pydicom_test_files().join("MR_small_implicit.dcm");
    let port = h.port.to_string();
    let out = python(UNKNOWN_AND_KNOWN, &[&port, file.to_str().unwrap(), AE]).await;
    assert!(out.contains("REJECTED 1.2.826.0.1.3680043.9.9999.1 3"), "{out}");
    assert!(out.contains("ACCEPTED 1.2.840.10008.5.1.4.1.1.4"), "{out}");
    assert!(out.contains("STATUS 0x0000"), "{out}");
    assert_eq!(h.stream_count().await, 1);
    h.stop().await;
}

const MISMATCHED_CLASS: &str = r#"
import sys, time
from io import BytesIO
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.dsutils import encode
from pynetdicom.dimse_primitives import C_STORE
port, path, called = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ds = dcmread(path)
ae = AE(ae_title="PYSCU")
ae.acse_timeout = 10
ae.dimse_timeout = 20
ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4", ["1.2.840.10008.1.2"])
assoc = ae.associate("127.0.0.1", port, ae_title=called)
if not assoc.is_established:
    print("NOASSOC")
    sys.exit(0)
cx = assoc.accepted_contexts[0]
req = C_STORE()
req.MessageID = 1
req.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage, on the MR context
req.AffectedSOPInstanceUID = ds.SOPInstanceUID
req.Priority = 2
req.DataSet = BytesIO(encode(ds, True, True))  # implicit VR LE, as negotiated
# Pause the association's reactor while we wait for the response, as pynetdicom's own send_c_*
# do: otherwise a quick response is taken by the reactor as an unexpected message.
assoc._reactor_checkpoint.clear()
while not assoc._is_paused:
    time.sleep(0.0001)
assoc.dimse.send_msg(req, cx.context_id)
_, rsp = assoc.dimse.get_msg(block=True)
assoc._reactor_checkpoint.set()
print("STATUS 0x%04X" % rsp.Status)
assoc.release()
"#;

/// A C-STORE whose AffectedSOPClassUID is not the presentation context's SOP class is refused
/// with 0x0122 (SOP class not supported) and nothing is stored.
#[tokio::test]
async fn a_store_for_another_sop_class_than_its_context_is_refused() {
    let h = Harness::start().await;
    let file = pydicom_test_files().join("MR_small_implicit.dcm");
    let port = h.port.to_string();
    let out = python(MISMATCHED_CLASS, &[&port, file.to_str().unwrap(), AE]).await;
    assert!(out.contains("STATUS 0x0122"), "{out}");
    assert_eq!(h.stream_count().await, 0);
    h.stop().await;
}
