#!/usr/bin/env python3
"""Seed corpora for the fuzz targets (docs/fuzzing.md), from pydicom and its test files.

corpus/dimse_command: C-STORE-RQ and C-ECHO-RQ command sets (implicit VR little endian);
corpus/store_dataset: one byte choosing the transfer syntax (its index in
  bidsflux_receiver::conformance::TRANSFER_SYNTAXES) + the data set of a pydicom test file;
corpus/pdu: A-ASSOCIATE-RQ, P-DATA-TF, A-RELEASE-RQ and A-ABORT PDUs.
"""
import glob
import os
import struct
import sys

import pydicom
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

# Same order as TRANSFER_SYNTAXES in services/receiver/src/conformance.rs.
SYNTAXES = [
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203", "1.2.840.10008.1.2.5",
]
MAX_SEED = 64 * 1024
root = sys.argv[1] if len(sys.argv) > 1 else "corpus"


def save(target, name, data):
    os.makedirs(os.path.join(root, target), exist_ok=True)
    with open(os.path.join(root, target, name), "wb") as f:
        f.write(data)


def implicit_le(ds):
    buf = DicomBytesIO()
    buf.is_implicit_VR, buf.is_little_endian = True, True
    write_dataset(buf, ds)
    return buf.getvalue()


def command(**elements):
    ds = Dataset()
    for k, v in elements.items():
        setattr(ds, k, v)
    body = implicit_le(ds)
    length = Dataset()
    length.CommandGroupLength = len(body)
    return implicit_le(length) + body


store = command(AffectedSOPClassUID="1.2.840.10008.5.1.4.1.1.4", CommandField=0x0001, MessageID=7,
                Priority=0, CommandDataSetType=0x0000, AffectedSOPInstanceUID="1.2.3.4.5")
echo = command(AffectedSOPClassUID="1.2.840.10008.1.1", CommandField=0x0030, MessageID=1,
               CommandDataSetType=0x0101)
save("dimse_command", "c-store-rq", store)
save("dimse_command", "c-echo-rq", echo)

files = sorted(glob.glob(os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files", "*.dcm")))
for path in files:
    try:
        raw = open(path, "rb").read()
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        ts = str(ds.file_meta.TransferSyntaxUID)
    except Exception:
        continue
    if ts not in SYNTAXES or raw[128:132] != b"DICM":
        continue
    meta_len = struct.unpack("<I", raw[140:144])[0]
    dataset = raw[144 + meta_len:][:MAX_SEED]
    save("store_dataset", os.path.basename(path), bytes([SYNTAXES.index(ts)]) + dataset)


def pdu(kind, body):
    return struct.pack(">BBI", kind, 0, len(body)) + body


def item(kind, body):
    return struct.pack(">BBH", kind, 0, len(body)) + body


pc = item(0x20, bytes([1, 0, 0, 0]) + item(0x30, b"1.2.840.10008.5.1.4.1.1.4") + item(0x40, b"1.2.840.10008.1.2.1"))
user = item(0x50, item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.3.4"))
rq = struct.pack(">HH", 1, 0) + b"BIDSFLUX".ljust(16) + b"SCANNER".ljust(16) + bytes(32)
rq += item(0x10, b"1.2.840.10008.3.1.1.1") + pc + user
save("pdu", "a-associate-rq", pdu(0x01, rq))
pdv = struct.pack(">IBB", len(store) + 2, 1, 0x03) + store
save("pdu", "p-data-tf", pdu(0x04, pdv))
save("pdu", "a-release-rq", pdu(0x05, bytes(4)))
save("pdu", "a-abort", pdu(0x07, bytes(4)))
print(f"seeds written under {root}/")
