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
    /// The first top-level tag not needed.
    stop: (u16, u16),
    /// False when `bytes` is only a prefix of the data set.
    complete: bool,
}

/// An element header.
struct Head {
    group: u16,
    element: u16,
    /// Bytes of the header itself.
    size: usize,
    /// Declared value length, `None` when undefined.
    len: Option<u32>,
    /// Explicit VR, when the encoding has one.
    vr: Option<[u8; 2]>,
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

    fn head(&self, at: usize) -> Result<Head, HeaderError> {
        let group = self.u16_at(at).ok_or_else(|| self.short(at))?;
        let element = self.u16_at(at + 2).ok_or_else(|| self.short(at))?;
        let (size, len, vr) = if group == 0xFFFE || self.enc == Encoding::ImplicitLe {
            (8, self.u32_at(at + 4).ok_or_else(|| self.short(at))?, None)
        } else {
            let vr = self.bytes.get(at + 4..at + 6).ok_or_else(|| self.short(at))?;
            let vr = [vr[0], vr[1]];
            match &vr {
                b"OB" | b"OD" | b"OF" | b"OL" | b"OV" | b"OW" | b"SQ" | b"SV" | b"UC" | b"UN" | b"UR" | b"UT"
                | b"UV" => (12, self.u32_at(at + 8).ok_or_else(|| self.short(at))?, Some(vr)),
                _ if vr.iter().all(u8::is_ascii_uppercase) => {
                    (8, u32::from(self.u16_at(at + 6).ok_or_else(|| self.short(at))?), Some(vr))
                }
                _ => return Err(HeaderError::Malformed { at, why: "invalid VR" }),
            }
        };
        Ok(Head { group, element, size, len: (len != u32::MAX).then_some(len), vr })
    }

    /// End of a value of `len` bytes at `at`, which must lie within `bound`.
    fn end_of(&self, at: usize, len: u32, bound: usize, h: &Head, start: usize) -> Result<usize, HeaderError> {
        let end = at.saturating_add(len as usize);
        if end > bound {
            if !self.complete && bound == self.bytes.len() {
                return Err(HeaderError::TooLarge);
            }
            return Err(HeaderError::Overrun { group: h.group, element: h.element, at: start, len: u64::from(len) });
        }
        Ok(end)
    }

    /// Whether the value at `at` (of an element without a sequence VR) is read as a sequence
    /// anyway: in implicit VR the parser decides by dictionary, so any value that starts with
    /// an item tag is walked as one.
    fn looks_like_items(&self, at: usize) -> bool {
        self.u16_at(at) == Some(0xFFFE) && self.u16_at(at + 2) == Some(0xE000)
    }

    /// Walks the value of element `h` at `at` (its header ends there) within `bound`.
    fn value(&self, at: usize, h: &Head, bound: usize, start: usize, depth: usize) -> Result<usize, HeaderError> {
        if depth > MAX_DEPTH {
            return Err(HeaderError::Malformed { at, why: "sequences nested too deep" });
        }
        let seq_vr = h.vr == Some(*b"SQ");
        match h.len {
            None => {
                // Undefined length: a sequence (or UN holding one, encoded implicit VR LE).
                if h.vr == Some(*b"UN") {
                    let inner = Walker {
                        bytes: self.bytes,
                        enc: Encoding::ImplicitLe,
                        stop: self.stop,
                        complete: self.complete,
                    };
                    return inner.items(at, None, bound, depth + 1);
                }
                self.items(at, None, bound, depth + 1)
            }
            Some(len) => {
                // Binary values must be whole numbers of values: the parser misbehaves badly on
                // a UL of 26 bytes (found by fuzzing the command-set path).
                let unit = match h.vr.as_ref() {
                    Some(b"US" | b"SS" | b"OW") => 2,
                    Some(b"UL" | b"SL" | b"FL" | b"AT" | b"OF" | b"OL") => 4,
                    Some(b"FD" | b"SV" | b"UV" | b"OD" | b"OV") => 8,
                    _ => 1,
                };
                if len % unit != 0 {
                    return Err(HeaderError::Malformed {
                        at: start,
                        why: "binary value length is not a whole number of values",
                    });
                }
                let end = self.end_of(at, len, bound, h, start)?;
                if seq_vr || (h.vr.is_none() && self.looks_like_items(at)) {
                    self.items(at, Some(end), end, depth + 1)?;
                }
                Ok(end)
            }
        }
    }

    /// Walks the items of a sequence from `at`: up to `end` when the sequence has a defined
    /// length, else up to its delimiter. Returns the offset after the sequence.
    fn items(&self, mut at: usize, end: Option<usize>, bound: usize, depth: usize) -> Result<usize, HeaderError> {
        loop {
            if let Some(end) = end
                && at >= end
            {
                return Ok(end);
            }
            let start = at;
            let h = self.head(at)?;
            at += h.size;
            match (h.group, h.element, h.len) {
                (0xFFFE, 0xE0DD, _) if end.is_none() => return Ok(at),
                (0xFFFE, 0xE000, Some(len)) => {
                    let item_end = self.end_of(at, len, end.unwrap_or(bound), &h, start)?;
                    at = self.elements(at, Some(item_end), item_end, depth + 1)?;
                }
                (0xFFFE, 0xE000, None) => at = self.elements(at, None, end.unwrap_or(bound), depth + 1)?,
                _ => return Err(HeaderError::Malformed { at: start, why: "expected an item in a sequence" }),
            }
        }
    }

    /// Walks elements from `at`: in an item up to `end` (defined length) or its delimiter;
    /// at the top level (`depth` 0) until the first tag at or after `stop` or the end.
    fn elements(&self, mut at: usize, end: Option<usize>, bound: usize, depth: usize) -> Result<usize, HeaderError> {
        let top = depth == 0;
        loop {
            if let Some(end) = end
                && at >= end
            {
                return Ok(end);
            }
            if top && at >= self.bytes.len() {
                return if self.complete { Ok(at) } else { Err(HeaderError::TooLarge) };
            }
            let start = at;
            let h = self.head(at)?;
            if !top && end.is_none() && (h.group, h.element) == (0xFFFE, 0xE00D) {
                return Ok(at + h.size);
            }
            if h.group == 0xFFFE {
                return Err(HeaderError::Malformed { at, why: "stray item or delimiter" });
            }
            if top && (h.group, h.element) >= self.stop {
                return Ok(at);
            }
            at = self.value(at + h.size, &h, bound, start, depth)?;
        }
    }
}

/// Length of the prefix of `dataset` that holds every top-level element before [`STOP`].
///
/// `complete` says whether `dataset` is the whole data set (else a prefix of it).
pub fn header_len(dataset: &[u8], enc: Encoding, complete: bool) -> Result<usize, HeaderError> {
    header_len_until(dataset, enc, complete, STOP)
}

/// Like [`header_len`], stopping at `stop` if it comes after [`STOP`] (never before it, never
/// at or past Pixel Data's group).
pub fn header_len_until(dataset: &[u8], enc: Encoding, complete: bool, stop: (u16, u16)) -> Result<usize, HeaderError> {
    let stop = stop.clamp(STOP, (0x7FE0, 0x0000));
    Walker { bytes: dataset, enc, stop, complete }.elements(0, None, dataset.len(), 0)
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
        // A defined-length sequence whose item hides a huge length is refused too.
        let mut nested = vec![0x08, 0x00, 0x40, 0x11, b'S', b'Q', 0, 0];
        nested.extend(16u32.to_le_bytes());
        nested.extend([0xfe, 0xff, 0x00, 0xe0, 8, 0, 0, 0]);
        nested.extend([0x08, 0x00, 0x55, 0x11, b'U', b'I', 0xff, 0xff]);
        assert!(matches!(header_len(&nested, Encoding::ExplicitLe, true), Err(HeaderError::Overrun { .. })));
        // Implicit VR: a value that starts with an item is walked as a sequence.
        let mut implicit = vec![0x08, 0x00, 0x40, 0x11];
        implicit.extend(16u32.to_le_bytes());
        implicit.extend([0xfe, 0xff, 0x00, 0xe0, 8, 0, 0, 0]);
        implicit.extend([0x08, 0x00, 0x55, 0x11, 0, 0, 0, 0xd4]);
        assert!(matches!(header_len(&implicit, Encoding::ImplicitLe, true), Err(HeaderError::Overrun { .. })));
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
