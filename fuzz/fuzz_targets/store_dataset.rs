//! The data set of a C-STORE, as the receiver inspects it once received: the Part 10 header the
//! receiver writes (file meta built from the command and the presentation context) followed by
//! the peer's bytes, parsed by `cstore::inspect_bytes` (the same reader as for large instances
//! spooled to disk). The first input byte picks the negotiated transfer syntax.
//! Must return `Ok` or `Err`, never panic, and allocate within libFuzzer's limits.

#![no_main]

use bidsflux_receiver::conformance::TRANSFER_SYNTAXES;
use bidsflux_receiver::spool::{PartMeta, part10_header};
use bidsflux_receiver::cstore::inspect_bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, dataset)) = data.split_first() else { return };
    let (transfer_syntax_uid, _) = TRANSFER_SYNTAXES[usize::from(pick) % TRANSFER_SYNTAXES.len()];
    let meta = PartMeta {
        sop_class_uid: "1.2.840.10008.5.1.4.1.1.4",
        sop_instance_uid: "1.2.3.4",
        transfer_syntax_uid,
        calling_ae_title: "FUZZ",
    };
    let Ok(mut bytes) = part10_header(&meta) else { return };
    bytes.extend_from_slice(dataset);
    let _ = inspect_bytes(&bytes);
});
