//! What the receiver negotiates: SOP classes (abstract syntaxes) and transfer
//! syntaxes. `docs/conformance.md` is the statement built on these lists;
//! `bidsflux-receiver --list-sop-classes` prints them.
//!
//! SOP classes: Verification, every storage SOP class of the standard
//! dictionary (see [`is_storage_sop_class`] for the rule), and Siemens CSA
//! Non-Image Storage. Any other abstract syntax is refused per presentation
//! context (abstract-syntax-not-supported); the association goes on with the
//! accepted ones.
//!
//! Transfer syntaxes: data sets are stored exactly as received, never
//! transcoded, so a compressed syntax needs no codec here: its header is read
//! up to Pixel Data, which is the same for encapsulated pixel data. Deflated
//! data sets are inflated to read that header (registry feature `deflate`).

use dicom_dictionary_std::uids;

use crate::sop_classes::STANDARD_STORAGE_SOP_CLASSES;

/// Siemens CSA Non-Image Storage: private SOP class in which Siemens MR scanners send
/// spectroscopy raw data and protocol reports; research sites need it archived.
pub const SIEMENS_CSA_NON_IMAGE_STORAGE: &str = "1.3.12.2.1107.5.9.1";

/// Storage SOP classes of the dictionary we leave out: not composite patient
/// instances of the Storage Service Class (PS3.4 annex B), so there is no
/// Study/Series to file them under. Keywords of the standard dictionary.
pub const EXCLUDED_STORAGE_KEYWORDS: &[&str] = &[
    // DICOMDIR: a file-set directory, never sent over the network.
    "MediaStorageDirectoryStorage",
    // Hanging Protocol Storage Service Class (PS3.4 annex T).
    "HangingProtocolStorage",
    // Color Palette Storage Service Class (PS3.4 annex X).
    "ColorPaletteStorage",
    // Implant Template Storage Service Classes (PS3.4 annex BB).
    "GenericImplantTemplateStorage",
    "ImplantAssemblyTemplateStorage",
    "ImplantTemplateGroupStorage",
];

/// Whether a SOP class of the dictionary is one we accept for storage, by its name and keyword.
///
/// The standard names every SOP class of the Storage Service Class "… Storage", possibly
/// followed by " - For Presentation", " - For Processing" or " - Trial", and by " (Retired)"
/// (retired classes are kept: old equipment still sends them). Classes whose name merely
/// contains the word (Storage Commitment, Stored Print) do not end so.
pub fn is_storage_sop_class(name: &str, keyword: &str) -> bool {
    let mut base = name.strip_suffix(" (Retired)").unwrap_or(name);
    for suffix in [" - For Presentation", " - For Processing", " - Trial"] {
        base = base.strip_suffix(suffix).unwrap_or(base);
    }
    base.ends_with(" Storage") && !EXCLUDED_STORAGE_KEYWORDS.contains(&keyword)
}

/// Every abstract syntax we accept: Verification, the standard storage classes, Siemens CSA.
pub fn abstract_syntaxes() -> impl Iterator<Item = &'static str> {
    std::iter::once(uids::VERIFICATION)
        .chain(STANDARD_STORAGE_SOP_CLASSES.iter().map(|(uid, _)| *uid))
        .chain(std::iter::once(SIEMENS_CSA_NON_IMAGE_STORAGE))
}

/// Explicit VR Big Endian: retired by the standard, still sent by old equipment.
pub const EXPLICIT_VR_BIG_ENDIAN: &str = "1.2.840.10008.1.2.2";

/// `(UID, name)` of the transfer syntaxes we accept. dicom-ul picks, for each presentation
/// context, the first syntax *the peer* proposes that is listed here (and that its registry
/// knows how to read: all of these, with the `deflate` feature).
pub const TRANSFER_SYNTAXES: &[(&str, &str)] = &[
    (uids::IMPLICIT_VR_LITTLE_ENDIAN, "Implicit VR Little Endian"),
    (uids::EXPLICIT_VR_LITTLE_ENDIAN, "Explicit VR Little Endian"),
    (EXPLICIT_VR_BIG_ENDIAN, "Explicit VR Big Endian (Retired)"),
    (uids::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, "Deflated Explicit VR Little Endian"),
    (uids::JPEG_BASELINE8_BIT, "JPEG Baseline (Process 1)"),
    (uids::JPEG_EXTENDED12_BIT, "JPEG Extended (Process 2 & 4)"),
    (uids::JPEG_LOSSLESS, "JPEG Lossless, Non-Hierarchical (Process 14)"),
    (uids::JPEG_LOSSLESS_SV1, "JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 [SV1])"),
    (uids::JPEGLS_LOSSLESS, "JPEG-LS Lossless"),
    (uids::JPEGLS_NEAR_LOSSLESS, "JPEG-LS Lossy (Near-Lossless)"),
    (uids::JPEG2000_LOSSLESS, "JPEG 2000 (Lossless Only)"),
    (uids::JPEG2000, "JPEG 2000"),
    (uids::HTJ2K_LOSSLESS, "High-Throughput JPEG 2000 (Lossless Only)"),
    (uids::HTJ2K_LOSSLESS_RPCL, "High-Throughput JPEG 2000 with RPCL Options (Lossless Only)"),
    (uids::HTJ2K, "High-Throughput JPEG 2000"),
    (uids::RLE_LOSSLESS, "RLE Lossless"),
];

/// The table printed by `--list-sop-classes`: one `UID<TAB>name` line per abstract syntax,
/// then the transfer syntaxes.
pub fn listing() -> String {
    let mut out = String::from("# SOP classes (abstract syntaxes) accepted, SCP role\n");
    out.push_str(&format!("{}\tVerification SOP Class\n", uids::VERIFICATION));
    for (uid, name) in STANDARD_STORAGE_SOP_CLASSES {
        out.push_str(&format!("{uid}\t{name}\n"));
    }
    out.push_str(&format!("{SIEMENS_CSA_NON_IMAGE_STORAGE}\tSiemens CSA Non-Image Storage (private)\n"));
    out.push_str("# transfer syntaxes accepted (stored as received)\n");
    for (uid, name) in TRANSFER_SYNTAXES {
        out.push_str(&format!("{uid}\t{name}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use dicom_core::dictionary::{UidDictionary as _, UidDictionaryEntry as _};
    use dicom_dictionary_std::StandardSopClassDictionary;
    use dicom_encoding::TransferSyntaxIndex as _;
    use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

    use super::*;

    /// `(uid, name, keyword)` of every SOP class of the dictionary. The dictionary offers no
    /// iterator; its `Debug` output lists every entry, which is good enough for a test.
    fn dictionary_sop_classes() -> BTreeSet<(String, String, String)> {
        let text = format!("{:?}", dicom_dictionary_std::sop_class::registry());
        let field = |chunk: &str, name: &str| -> String {
            let start = chunk.find(&format!("{name}: \"")).unwrap() + name.len() + 3;
            let len = chunk[start..].find('"').unwrap();
            chunk[start..start + len].to_owned()
        };
        text.split("UidDictionaryEntryRef {")
            .skip(1)
            .map(|chunk| (field(chunk, "uid"), field(chunk, "name"), field(chunk, "alias")))
            .collect()
    }

    #[test]
    fn storage_list_matches_the_dictionary() {
        let all = dictionary_sop_classes();
        assert!(all.len() > 250, "parsed only {} SOP classes", all.len());
        let expected: BTreeSet<(String, String)> = all
            .iter()
            .filter(|(_, name, keyword)| is_storage_sop_class(name, keyword))
            .map(|(uid, name, _)| (uid.clone(), name.clone()))
            .collect();
        let ours: BTreeSet<(String, String)> =
            STANDARD_STORAGE_SOP_CLASSES.iter().map(|(u, n)| ((*u).to_owned(), (*n).to_owned())).collect();
        if expected != ours {
            let table: String = expected.iter().map(|(u, n)| format!("    (\"{u}\", \"{n}\"),\n")).collect();
            panic!(
                "src/sop_classes.rs is out of date with dicom-dictionary-std; new table (sort by UID):\n{table}\n\
                 missing: {:?}\nextra: {:?}",
                expected.difference(&ours).collect::<Vec<_>>(),
                ours.difference(&expected).collect::<Vec<_>>()
            );
        }
        for (uid, name) in STANDARD_STORAGE_SOP_CLASSES {
            assert_eq!(StandardSopClassDictionary.by_uid(uid).map(|e| e.name()), Some(*name));
        }
    }

    #[test]
    fn rule_keeps_storage_and_drops_look_alikes() {
        for (name, keyword) in [
            ("MR Image Storage", "MRImageStorage"),
            ("Digital X-Ray Image Storage - For Processing", "DigitalXRayImageStorageForProcessing"),
            ("Text SR Storage - Trial (Retired)", "TextSRStorageTrial"),
            ("Nuclear Medicine Image Storage (Retired)", "NuclearMedicineImageStorageRetired"),
        ] {
            assert!(is_storage_sop_class(name, keyword), "{name}");
        }
        for (name, keyword) in [
            ("Storage Commitment Push Model SOP Class", "StorageCommitmentPushModel"),
            ("Stored Print Storage SOP Class (Retired)", "StoredPrintStorage"),
            ("Media Storage Directory Storage", "MediaStorageDirectoryStorage"),
            ("Hanging Protocol Storage", "HangingProtocolStorage"),
            ("Verification SOP Class", "Verification"),
        ] {
            assert!(!is_storage_sop_class(name, keyword), "{name}");
        }
        let all: Vec<&str> = abstract_syntaxes().collect();
        for uid in [uids::MR_IMAGE_STORAGE, uids::ENHANCED_MR_IMAGE_STORAGE, uids::MR_SPECTROSCOPY_STORAGE] {
            assert!(all.contains(&uid), "{uid}");
        }
        assert!(!all.contains(&uids::STORAGE_COMMITMENT_PUSH_MODEL));
        assert_eq!(all.first(), Some(&uids::VERIFICATION));
        assert_eq!(all.last(), Some(&SIEMENS_CSA_NON_IMAGE_STORAGE));
    }

    /// dicom-ul refuses a listed syntax its registry cannot read: every one of ours must be readable.
    #[test]
    fn every_transfer_syntax_is_negotiable() {
        for (uid, _) in TRANSFER_SYNTAXES {
            assert!(dicom_ul::association::server::is_supported(uid), "{uid} would not be accepted");
            assert!(TransferSyntaxRegistry.get(uid).is_some(), "{uid}");
        }
        assert!(listing().lines().count() > 200);
    }
}
