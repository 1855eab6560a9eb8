//! DIMSE command sets, as the receiver handles them: `dimse::parse_command` on the bytes a peer
//! sent (at most `MAX_COMMAND_LEN`), then the response that echoes the peer's UIDs is encoded.
//! Neither may panic, whatever the bytes.

#![no_main]

use bidsflux_receiver::dimse::{self, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() > dimse::MAX_COMMAND_LEN {
        return;
    }
    let Ok(command) = dimse::parse_command(data) else { return };
    let _ = Response {
        field: command.field | 0x8000,
        message_id_being_responded_to: command.message_id,
        status: dimse::status::CANNOT_UNDERSTAND,
        affected_sop_class_uid: command.affected_sop_class_uid.as_deref(),
        affected_sop_instance_uid: command.affected_sop_instance_uid.as_deref(),
        error_comment: command.affected_sop_instance_uid.as_deref(),
    }
    .encode();
});
