//! Bounded reading of a received data set's header.
//!
//! The DICOM parser allocates a buffer of an element's *declared* length
//! before reading its value, so a data set that declares a 3.5 GB element in
//! front of Pixel Data would make it commit gigabytes (found by
//! `fuzz/fuzz_targets/store_dataset`). Before parsing, [`header_len`] walks
//! the element structure — tags, VRs and lengths only, values skipped —
//! checking every declared length against the bytes actually received, and
//! returns where the attributes we need end: the first top-level element at
//! or after (0020,0012), past SeriesNumber (0020,0011). Only that prefix is
//! handed to the parser, which therefore never sees a length it cannot back
//! with bytes, and never reads bulk data (private groups, Float Pixel Data,
//! waveforms) that sits after group 0020.

use std::io::Read as _;

/// The first tag we do not need: everything we file by comes before it.
pub const STOP: (u16, u16) = (0x0020, 0x0012);

/// Most header bytes read for one instance (a header larger than this is refused).
pub const MAX_HEADER: usize = 8 << 20;

/// Header bytes read first; almost every header is far smaller.
pub const FIRST_READ: usize = 256 << 10;

/// Deepest sequence nesting accepted.
const MAX_DEPTH: usize = 32;

/// How the data set is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Implicit VR Little Endian.
    ImplicitLe,
    /// Explicit VR Little Endian (also every compressed syntax, and deflated once inflated).
    ExplicitLe,
    /// Explicit VR Big Endian (retired).
    ExplicitBe,
}

impl Encoding {
    /// The encoding of a transfer syntax, and whether the data set is deflated.
    pub fn of(transfer_syntax_uid: &str) -> (Self, bool) {
        match transfer_syntax_uid.trim_end_matches(['\0', ' ']) {
            "1.2.840.10008.1.2" => (Self::ImplicitLe, false),
            "1.2.840.10008.1.2.2" => (Self::ExplicitBe, false),
            "1.2.840.10008.1.2.1.99" => (Self::ExplicitLe, true),
            _ => (Self::ExplicitLe, false),
        }
    }
}

/// A header that cannot be read safely.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// An element's declared length runs past the received bytes.
    #[error("element ({group:04X},{element:04X}) at byte {at} declares {len} bytes, past the end of the data set")]
    Overrun {
        /// Group.
        group: u16,
        /// Element.
        element: u16,
        /// Offset.
        at: usize,
        /// Declared length.
        len: u64,
    },
    /// The structure is not DICOM (truncated header, stray delimiter, too deep).
    #[error("malformed data set at byte {at}: {why}")]
    Malformed {
        /// Offset.
        at: usize,
        /// What is wrong.
        why: &'static str,
    },
    /// More than [`MAX_HEADER`] bytes before (0020,0012).
    #[error("data set header is larger than {MAX_HEADER} bytes before (0020,0012)")]
    TooLarge,
}

struct Walker<'a> {
    bytes: &'a [u8],
    enc: Encoding,
    /// False when `bytes` is only a prefix of the data set.
    complete: bool,
}

impl Walker<'_> {
    fn u16_at(&self, at: usize) -> Option<u16> {
        let b = self.bytes.get(at..at + 2)?;
        Some(match self.enc {
            Encoding::ExplicitBe => u16::from_be_bytes([b[0], b[1]]),
            _ => u16::from_le_bytes([b[0], b[1]]),
        })
    }

    fn u32_at(&self, at: usize) -> Option<u32> {
        let b = self.bytes.get(at..at + 4)?;
        Some(match self.enc {
            Encoding::ExplicitBe => u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            _ => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        })
    }

    fn short(&self, at: usize) -> HeaderError {
        if self.complete {
            HeaderError::Malformed { at, why: "truncated element header" }
        } else {
            HeaderError::TooLarge
        }
    }

    /// Reads an element header at `at`: (group, element, header size, length or None if undefined).
    fn element(&self, at: usize) -> Result<(u16, u16, usize, Option<u32>), HeaderError> {
        let group = self.u16_at(at).ok_or_else(|| self.short(at))?;
        let element = self.u16_at(at + 2).ok_or_else(|| self.short(at))?;
        let (hdr, len) = if group == 0xFFFE || self.enc == Encoding::ImplicitLe {
            (8, self.u32_at(at + 4).ok_or_else(|| self.short(at))?)
        } else {
            let vr = self.bytes.get(at + 4..at + 6).ok_or_else(|| self.short(at))?;
            match vr {
                b"OB" | b"OD" | b"OF" | b"OL" | b"OV" | b"OW" | b"SQ" | b"SV" | b"UC" | b"UN" | b"UR" | b"UT"
                | b"UV" => (12, self.u32_at(at + 8).ok_or_else(|| self.short(at))?),
                _ if vr.iter().all(u8::is_ascii_uppercase) => {
                    (8, u32::from(self.u16_at(at + 6).ok_or_else(|| self.short(at))?))
                }
                _ => return Err(HeaderError::Malformed { at, why: "invalid VR" }),
            }
        };
        Ok((group, element, hdr, (len != u32::MAX).then_some(len)))
    }

    /// Skips a value of defined length starting at `at`, checking it is there.
    fn skip(&self, at: usize, len: u32, tag: (u16, u16), start: usize) -> Result<usize, HeaderError> {
        let end = at + len as usize;
        if end > self.bytes.len() {
            if !self.complete && self.bytes.len() >= MAX_HEADER {
                return Err(HeaderError::TooLarge);
            }
            return Err(HeaderError::Overrun { group: tag.0, element: tag.1, at: start, len: u64::from(len) });
        }
        Ok(end)
    }

    /// Walks the items of an undefined-length sequence whose first item starts at `at`;
    /// returns the offset after its sequence delimiter.
    fn sequence(&self, mut at: usize, depth: usize) -> Result<usize, HeaderError> {
        if depth > MAX_DEPTH {
            return Err(HeaderError::Malformed { at, why: "sequences nested too deep" });
        }
        loop {
            let (group, element, hdr, len) = self.element(at)?;
            match (group, element, len) {
                (0xFFFE, 0xE0DD, _) => return Ok(at + hdr),
                (0xFFFE, 0xE000, Some(len)) => at = self.skip(at + hdr, len, (group, element), at)?,
                (0xFFFE, 0xE000, None) => at = self.elements(at + hdr, depth + 1, true)?,
                _ => return Err(HeaderError::Malformed { at, why: "expected an item in a sequence" }),
            }
        }
    }

    /// Walks elements from `at`. In an item (`in_item`) until its delimiter; at the top level
    /// until the first tag at or after [`STOP`] or the end. Returns the end offset.
    fn elements(&self, mut at: usize, depth: usize, in_item: bool) -> Result<usize, HeaderError> {
        loop {
            if !in_item && at >= self.bytes.len() {
                return if self.complete { Ok(at) } else { Err(HeaderError::TooLarge) };
            }
            let (group, element, hdr, len) = self.element(at)?;
            if in_item && (group, element) == (0xFFFE, 0xE00D) {
                return Ok(at + hdr);
            }
            if group == 0xFFFE {
                return Err(HeaderError::Malformed { at, why: "stray item or delimiter" });
            }
            if !in_item && (group, element) >= STOP {
                return Ok(at);
            }
            at = match len {
                Some(len) => self.skip(at + hdr, len, (group, element), at)?,
                None => self.sequence(at + hdr, depth + 1)?,
            };
        }
    }
}

/// Length of the prefix of `dataset` that holds every top-level element before [`STOP`].
///
/// `complete` says whether `dataset` is the whole data set (else a prefix of it).
pub fn header_len(dataset: &[u8], enc: Encoding, complete: bool) -> Result<usize, HeaderError> {
    Walker { bytes: dataset, enc, complete }.elements(0, 0, false)
}

/// Inflates at most [`MAX_HEADER`] bytes of a deflated data set. Returns the bytes and
/// whether they are the whole data set.
pub fn inflate_prefix(deflated: impl std::io::Read) -> std::io::Result<(Vec<u8>, bool)> {
    let mut out = Vec::new();
    let mut decoder = flate2::read::DeflateDecoder::new(deflated).take(MAX_HEADER as u64 + 1);
    decoder.read_to_end(&mut out)?;
    let complete = out.len() <= MAX_HEADER;
    out.truncate(MAX_HEADER);
    Ok((out, complete))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn el(group: u16, element: u16, vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend(group.to_le_bytes());
        v.extend(element.to_le_bytes());
        v.extend(vr);
        v.extend((value.len() as u16).to_le_bytes());
        v.extend(value);
        v
    }

    #[test]
    fn stops_after_series_number_and_checks_lengths() {
        let mut ds = el(0x0008, 0x0018, b"UI", b"1.2\0");
        ds.extend(el(0x0020, 0x0011, b"IS", b"1 "));
        let stop = ds.len();
        ds.extend(el(0x0020, 0x0013, b"IS", b"7 "));
        assert_eq!(header_len(&ds, Encoding::ExplicitLe, true).unwrap(), stop);
        // A huge declared length is refused, not allocated.
        let mut hostile = vec![0x08, 0x00, 0x16, 0x00, b'O', b'B', 0, 0];
        hostile.extend(0xd400_0000u32.to_le_bytes());
        assert!(matches!(header_len(&hostile, Encoding::ExplicitLe, true), Err(HeaderError::Overrun { .. })));
        let implicit = [0x08u8, 0x00, 0x16, 0x00, 0x00, 0x00, 0x00, 0xd4];
        assert!(matches!(header_len(&implicit, Encoding::ImplicitLe, true), Err(HeaderError::Overrun { .. })));
    }

    #[test]
    fn walks_undefined_length_sequences() {
        // (0008,1140) SQ, undefined length, one undefined-length item holding one element.
        let mut ds = vec![0x08, 0x00, 0x40, 0x11, b'S', b'Q', 0, 0, 0xff, 0xff, 0xff, 0xff];
        ds.extend([0xfe, 0xff, 0x00, 0xe0, 0xff, 0xff, 0xff, 0xff]);
        ds.extend(el(0x0008, 0x1155, b"UI", b"1.2\0"));
        ds.extend([0xfe, 0xff, 0x0d, 0xe0, 0, 0, 0, 0]);
        ds.extend([0xfe, 0xff, 0xdd, 0xe0, 0, 0, 0, 0]);
        ds.extend(el(0x0020, 0x000D, b"UI", b"1.3\0"));
        assert_eq!(header_len(&ds, Encoding::ExplicitLe, true).unwrap(), ds.len());
        // Unterminated: refused.
        let cut = &ds[..20];
        assert!(header_len(cut, Encoding::ExplicitLe, true).is_err());
    }

    #[test]
    fn a_prefix_without_the_stop_tag_is_too_large() {
        let ds = el(0x0008, 0x0018, b"UI", b"1.2\0");
        assert!(matches!(header_len(&ds, Encoding::ExplicitLe, false), Err(HeaderError::TooLarge)));
    }
}
