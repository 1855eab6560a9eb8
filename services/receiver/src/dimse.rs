//! DIMSE command sets (PS3.7 §9.3 and annex E): reading requests, encoding responses.
//!
//! Command sets are always Implicit VR Little Endian, whatever the
//! presentation context's transfer syntax.

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntax;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN;

/// CommandField of C-STORE-RQ.
pub const C_STORE_RQ: u16 = 0x0001;
/// CommandField of C-STORE-RSP.
pub const C_STORE_RSP: u16 = 0x8001;
/// CommandField of C-ECHO-RQ.
pub const C_ECHO_RQ: u16 = 0x0030;
/// CommandField of C-ECHO-RSP.
pub const C_ECHO_RSP: u16 = 0x8030;
/// CommandField of C-CANCEL-RQ (answered by nothing: we have no cancellable operations).
pub const C_CANCEL_RQ: u16 = 0x0FFF;
/// CommandDataSetType meaning "no data set follows".
pub const NO_DATA_SET: u16 = 0x0101;

/// Status codes we send (PS3.4 annex B.2.3, PS3.7 annex C).
pub mod status {
    /// The operation succeeded.
    pub const SUCCESS: u16 = 0x0000;
    /// Refused: out of resources (disk, bus): the sender may retry later.
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    /// Refused: SOP class not supported (here: not the one of the presentation context).
    pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
    /// Error: the data set cannot be understood (unparseable, missing or invalid UIDs).
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
}

/// Largest command set we accept: real ones are a few hundred bytes, and
/// they are buffered in memory until complete.
pub const MAX_COMMAND_LEN: usize = 64 * 1024;

/// A request command set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// CommandField (0000,0100).
    pub field: u16,
    /// MessageID (0000,0110).
    pub message_id: u16,
    /// Whether a data set follows (CommandDataSetType ≠ 0x0101).
    pub has_data_set: bool,
    /// AffectedSOPClassUID (0000,0002), padding removed.
    pub affected_sop_class_uid: Option<String>,
    /// AffectedSOPInstanceUID (0000,1000), padding removed.
    pub affected_sop_instance_uid: Option<String>,
}

/// A command set that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The bytes are not an Implicit VR LE data set.
    #[error("command set cannot be parsed: {0}")]
    Parse(String),
    /// A required element is missing or has the wrong type.
    #[error("command set has no valid {0}")]
    Missing(&'static str),
    /// The response could not be encoded.
    #[error("command set cannot be encoded: {0}")]
    Encode(String),
}

fn implicit_le() -> TransferSyntax {
    IMPLICIT_VR_LITTLE_ENDIAN.erased()
}

fn trimmed(value: &str) -> String {
    value.trim_end_matches(['\0', ' ']).trim_start().to_owned()
}

/// Walks a command set: a flat list of implicit VR LE elements of group 0000 whose declared
/// lengths stay inside `bytes`, each handed to `each` as (element, value).
///
/// Command sets are read here, not with the DICOM parser: that parser allocates a buffer of the
/// declared length before reading a value, so a hostile 8-byte command set declaring a 3.5 GB
/// element would make it commit gigabytes (found by `fuzz/fuzz_targets/dimse_command`), and it
/// ends every read with an end-of-input error whose backtrace it captures when `RUST_BACKTRACE`
/// is set. Command sets (group 0000) have no sequences and no undefined lengths, so a flat walk
/// is exact.
fn walk(bytes: &[u8], mut each: impl FnMut(u16, &[u8])) -> Result<(), CommandError> {
    let mut at = 0usize;
    while at < bytes.len() {
        let header = bytes
            .get(at..at + 8)
            .ok_or_else(|| CommandError::Parse(format!("truncated element header at byte {at}")))?;
        let group = u16::from_le_bytes([header[0], header[1]]);
        if group != 0x0000 {
            // A command set is group 0000 only (PS3.7 §6.3).
            return Err(CommandError::Parse(format!("element of group {group:04X} at byte {at} in a command set")));
        }
        let element = u16::from_le_bytes([header[2], header[3]]);
        let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        // Only the command elements of PS3.7 table E.1-1, binary ones with their exact size
        // (retired elements such as (0000,0001) are binary too).
        let size = match element {
            0x0000 => Some(4),
            0x0100 | 0x0110 | 0x0120 | 0x0700 | 0x0800 | 0x0900 | 0x0903 | 0x1002 | 0x1008 | 0x1020 | 0x1021
            | 0x1022 | 0x1023 | 0x1031 => Some(2),
            0x0002 | 0x0003 | 0x0600 | 0x0902 | 0x1000 | 0x1001 | 0x1030 => None,
            0x0901 | 0x1005 if len % 4 == 0 => None,
            _ => {
                return Err(CommandError::Parse(format!(
                    "element (0000,{element:04X}) with length {len} is not a command element"
                )));
            }
        };
        if let Some(size) = size
            && len != size
        {
            return Err(CommandError::Parse(format!("element (0000,{element:04X}) has length {len}, not {size}")));
        }
        if len == u32::MAX {
            return Err(CommandError::Parse(format!("undefined length at byte {at} (not allowed in a command set)")));
        }
        let end =
            at.checked_add(8).and_then(|v| v.checked_add(len as usize)).filter(|end| *end <= bytes.len()).ok_or_else(
                || CommandError::Parse(format!("element at byte {at} declares {len} bytes, past the end")),
            )?;
        each(element, bytes.get(at + 8..end).unwrap_or_default());
        at = end;
    }
    Ok(())
}

/// Parses a complete command set.
pub fn parse_command(bytes: &[u8]) -> Result<Command, CommandError> {
    let (mut field, mut message_id, mut data_set_type) = (None, None, None);
    let (mut sop_class, mut sop_instance) = (None, None);
    walk(bytes, |element, value| {
        // Binary values have their exact size (checked by the walk).
        let us = || u16::from_le_bytes([value.first().copied().unwrap_or(0), value.get(1).copied().unwrap_or(0)]);
        let text = || trimmed(&String::from_utf8_lossy(value));
        match element {
            0x0100 => field = Some(us()),
            0x0110 => message_id = Some(us()),
            0x0800 => data_set_type = Some(us()),
            0x0002 => sop_class = Some(text()),
            0x1000 => sop_instance = Some(text()),
            _ => {}
        }
    })?;
    Ok(Command {
        field: field.ok_or(CommandError::Missing("CommandField"))?,
        message_id: message_id.ok_or(CommandError::Missing("MessageID"))?,
        has_data_set: data_set_type.ok_or(CommandError::Missing("CommandDataSetType"))? != NO_DATA_SET,
        affected_sop_class_uid: sop_class,
        affected_sop_instance_uid: sop_instance,
    })
}

/// A response command set (no data set follows).
#[derive(Debug, Clone, Copy)]
pub struct Response<'a> {
    /// CommandField, e.g. [`C_STORE_RSP`].
    pub field: u16,
    /// MessageID of the request.
    pub message_id_being_responded_to: u16,
    /// Status.
    pub status: u16,
    /// AffectedSOPClassUID, echoed from the request.
    pub affected_sop_class_uid: Option<&'a str>,
    /// AffectedSOPInstanceUID, echoed from the request.
    pub affected_sop_instance_uid: Option<&'a str>,
    /// ErrorComment for failures (at most 64 characters are sent; never patient values).
    pub error_comment: Option<&'a str>,
}

impl Response<'_> {
    /// Encodes the command set, CommandGroupLength included.
    pub fn encode(&self) -> Result<Vec<u8>, CommandError> {
        let us = |tag, v: u16| DataElement::new(tag, VR::US, PrimitiveValue::from(v));
        let mut obj = InMemDicomObject::from_element_iter([
            us(tags::COMMAND_FIELD, self.field),
            us(tags::MESSAGE_ID_BEING_RESPONDED_TO, self.message_id_being_responded_to),
            us(tags::COMMAND_DATA_SET_TYPE, NO_DATA_SET),
            us(tags::STATUS, self.status),
        ]);
        if let Some(uid) = self.affected_sop_class_uid {
            obj.put_str(tags::AFFECTED_SOP_CLASS_UID, VR::UI, uid);
        }
        if let Some(uid) = self.affected_sop_instance_uid {
            obj.put_str(tags::AFFECTED_SOP_INSTANCE_UID, VR::UI, uid);
        }
        if let Some(comment) = self.error_comment {
            let comment: String = comment.chars().filter(|c| c.is_ascii() && !c.is_ascii_control()).take(64).collect();
            obj.put_str(tags::ERROR_COMMENT, VR::LO, comment);
        }
        let ts = implicit_le();
        let mut rest = Vec::with_capacity(256);
        obj.write_dataset_with_ts(&mut rest, &ts).map_err(|e| CommandError::Encode(e.to_string()))?;
        let group_length = u32::try_from(rest.len()).map_err(|e| CommandError::Encode(e.to_string()))?;
        let length = InMemDicomObject::from_element_iter([DataElement::new(
            tags::COMMAND_GROUP_LENGTH,
            VR::UL,
            PrimitiveValue::from(group_length),
        )]);
        let mut out = Vec::with_capacity(12 + rest.len());
        length.write_dataset_with_ts(&mut out, &ts).map_err(|e| CommandError::Encode(e.to_string()))?;
        out.extend_from_slice(&rest);
        Ok(out)
    }
}

#[cfg(test)]
mod length_tests {
    use super::*;

    #[test]
    fn hostile_lengths_are_refused_before_parsing() {
        // The minimized fuzz input: one element declaring ~3.5 GB.
        let hostile = [0u8, 0, 0, 0, 4, 0, 0, 0xd4];
        assert!(matches!(parse_command(&hostile), Err(CommandError::Parse(_))));
        let undefined = [0u8, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(parse_command(&undefined), Err(CommandError::Parse(_))));
        assert!(matches!(parse_command(&[0u8, 0, 0]), Err(CommandError::Parse(_))));
        // CommandGroupLength (UL) of 26 bytes made the parser spin for seconds and gigabytes.
        let mut odd = vec![0u8, 0, 0, 0, 26, 0, 0, 0];
        odd.extend(b"1.2.".iter().chain([0u8; 22].iter()));
        assert!(matches!(parse_command(&odd), Err(CommandError::Parse(_))));
        let retired = [0u8, 0, 1, 0, 2, 0, 0, 0, 1, 0x20];
        assert!(matches!(parse_command(&retired), Err(CommandError::Parse(_))));
        let other_group = [0x10u8, 0, 2, 0, 0, 0, 0, 0];
        assert!(matches!(parse_command(&other_group), Err(CommandError::Parse(_))));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_round_trips_with_group_length() {
        let bytes = Response {
            field: C_STORE_RSP,
            message_id_being_responded_to: 7,
            status: status::OUT_OF_RESOURCES,
            affected_sop_class_uid: Some("1.2.840.10008.5.1.4.1.1.4"),
            affected_sop_instance_uid: Some("1.2.3"),
            error_comment: Some("bus unavailable"),
        }
        .encode()
        .unwrap();
        // (0000,0000) UL, implicit VR: tag, 4-byte length 4, value.
        assert_eq!(&bytes[..8], &[0, 0, 0, 0, 4, 0, 0, 0]);
        let group_length = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
        assert_eq!(group_length, bytes.len() - 12);
        // Every value has an even length.
        let obj = InMemDicomObject::read_dataset_with_ts(&bytes[..], &implicit_le()).unwrap();
        assert_eq!(obj.element(tags::STATUS).unwrap().to_int::<u16>().unwrap(), 0xA700);
        assert_eq!(obj.element(tags::COMMAND_FIELD).unwrap().to_int::<u16>().unwrap(), C_STORE_RSP);
        assert_eq!(obj.element(tags::MESSAGE_ID_BEING_RESPONDED_TO).unwrap().to_int::<u16>().unwrap(), 7);
        assert_eq!(obj.element(tags::COMMAND_DATA_SET_TYPE).unwrap().to_int::<u16>().unwrap(), NO_DATA_SET);
        assert_eq!(trimmed(&obj.element(tags::AFFECTED_SOP_INSTANCE_UID).unwrap().to_str().unwrap()), "1.2.3");
        assert!(bytes.len().is_multiple_of(2));
    }

    #[test]
    fn parses_a_store_request() {
        let us = |tag, v: u16| DataElement::new(tag, VR::US, PrimitiveValue::from(v));
        let obj = InMemDicomObject::from_element_iter([
            DataElement::new(tags::AFFECTED_SOP_CLASS_UID, VR::UI, PrimitiveValue::from("1.2.840.10008.5.1.4.1.1.4")),
            us(tags::COMMAND_FIELD, C_STORE_RQ),
            us(tags::MESSAGE_ID, 3),
            us(tags::PRIORITY, 0),
            us(tags::COMMAND_DATA_SET_TYPE, 0x0000),
            DataElement::new(tags::AFFECTED_SOP_INSTANCE_UID, VR::UI, PrimitiveValue::from("1.2.345")),
        ]);
        let mut bytes = Vec::new();
        obj.write_dataset_with_ts(&mut bytes, &implicit_le()).unwrap();
        let cmd = parse_command(&bytes).unwrap();
        assert_eq!(cmd.field, C_STORE_RQ);
        assert_eq!(cmd.message_id, 3);
        assert!(cmd.has_data_set);
        assert_eq!(cmd.affected_sop_instance_uid.as_deref(), Some("1.2.345"));
        assert_eq!(cmd.affected_sop_class_uid.as_deref(), Some("1.2.840.10008.5.1.4.1.1.4"));
    }

    #[test]
    fn rejects_garbage_and_incomplete_commands() {
        assert!(parse_command(&[0xff; 7]).is_err());
        let obj = InMemDicomObject::from_element_iter([DataElement::new(
            tags::COMMAND_FIELD,
            VR::US,
            PrimitiveValue::from(C_ECHO_RQ),
        )]);
        let mut bytes = Vec::new();
        obj.write_dataset_with_ts(&mut bytes, &implicit_le()).unwrap();
        assert!(matches!(parse_command(&bytes), Err(CommandError::Missing("MessageID"))));
    }

    #[test]
    fn fuzz_regressions_are_refused_cheaply() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions/dimse_command");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            // Each once made the old parser commit gigabytes or spin; now refused by the walk.
            assert!(parse_command(&bytes).is_err());
            n += 1;
        }
        assert!(n >= 4, "regression inputs found in {}", dir.display());
    }
}
