//! The PDU reader under every association (dicom-ul's `read_pdu`, strict and lenient), on bytes
//! from the wire, with the receiver's largest maximum PDU length.

#![no_main]

use dicom_ul::pdu::read_pdu;
use libfuzzer_sys::fuzz_target;

/// `BIDSFLUX_MAX_PDU` at its maximum.
const MAX_PDU: u32 = 4 * 1024 * 1024;

fuzz_target!(|data: &[u8]| {
    let _ = read_pdu(data, MAX_PDU, true);
    let _ = read_pdu(data, MAX_PDU, false);
});
