//! Synthetic DICOM test data and Part 10 helpers.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};

/// What to generate.
#[derive(Debug, Clone)]
pub struct StudySpec {
    /// Series in the study.
    pub series: usize,
    /// Instances per series.
    pub instances_per_series: usize,
    /// Image rows and columns.
    pub rows: u16,
    /// Image columns.
    pub columns: u16,
    /// PatientName (DICOM PN, `^`-separated).
    pub patient_name: String,
    /// PatientID.
    pub patient_id: String,
    /// ReferringPhysicianName: the PI by convention (root group).
    pub referring_physician_name: String,
    /// StudyDescription, `Something^StudyName` by convention; empty: the element is left out.
    pub study_description: String,
    /// Transfer syntax of the files (default Explicit VR Little Endian).
    pub transfer_syntax: String,
    /// StudyInstanceUID to use (a new `2.25.` UID when `None`).
    pub study_instance_uid: Option<String>,
}

impl Default for StudySpec {
    fn default() -> Self {
        Self {
            series: 2,
            instances_per_series: 20,
            rows: 64,
            columns: 64,
            patient_name: "Doe^Jane".into(),
            patient_id: "SUB001".into(),
            referring_physician_name: "Investigator".into(),
            study_description: "Brain^Study1".into(),
            transfer_syntax: uids::EXPLICIT_VR_LITTLE_ENDIAN.into(),
            study_instance_uid: None,
        }
    }
}

/// A generated study.
#[derive(Debug, Clone)]
pub struct GeneratedStudy {
    /// StudyInstanceUID.
    pub study_instance_uid: String,
    /// SeriesInstanceUIDs.
    pub series_instance_uids: Vec<String>,
    /// Every file written.
    pub files: Vec<PathBuf>,
}

/// A new UID under the `2.25` (UUID) root.
pub fn new_uid() -> String {
    format!("2.25.{}", uuid::Uuid::new_v4().as_u128())
}

/// Writes a synthetic MR study (MR Image Storage, 16-bit MONOCHROME2) under `dir`, one file per instance.
pub fn generate_study(dir: &Path, spec: &StudySpec) -> anyhow::Result<GeneratedStudy> {
    std::fs::create_dir_all(dir)?;
    let study = spec.study_instance_uid.clone().unwrap_or_else(new_uid);
    let mut series_uids = Vec::new();
    let mut files = Vec::new();
    let str_el = |tag, vr, v: &str| DataElement::new(tag, vr, PrimitiveValue::from(v));
    for s in 0..spec.series {
        let series = new_uid();
        let description = if s == 0 { "anat-T1w".to_owned() } else { format!("func-bold_run-{s}") };
        for i in 0..spec.instances_per_series {
            let sop = new_uid();
            let n = (spec.rows as usize) * (spec.columns as usize);
            let seed = (s * 1000 + i) as u32;
            let pixels: Vec<u16> = (0..n)
                .map(|k| {
                    ((k as u32).wrapping_mul(2_654_435_761).wrapping_add(seed.wrapping_mul(40_503)) >> 20) as u16
                        & 0x0fff
                })
                .collect();
            let mut obj = InMemDicomObject::from_element_iter([
                str_el(tags::SOP_CLASS_UID, VR::UI, uids::MR_IMAGE_STORAGE),
                str_el(tags::SOP_INSTANCE_UID, VR::UI, &sop),
                str_el(tags::STUDY_DATE, VR::DA, "20261127"),
                str_el(tags::STUDY_TIME, VR::TM, "101500"),
                str_el(tags::MODALITY, VR::CS, "MR"),
                str_el(tags::REFERRING_PHYSICIAN_NAME, VR::PN, &spec.referring_physician_name),
                str_el(tags::STUDY_DESCRIPTION, VR::LO, &spec.study_description),
                str_el(tags::SERIES_DESCRIPTION, VR::LO, &description),
                str_el(tags::PATIENT_NAME, VR::PN, &spec.patient_name),
                str_el(tags::PATIENT_ID, VR::LO, &spec.patient_id),
                str_el(tags::PATIENT_BIRTH_DATE, VR::DA, "19800101"),
                str_el(tags::STUDY_INSTANCE_UID, VR::UI, &study),
                str_el(tags::SERIES_INSTANCE_UID, VR::UI, &series),
                str_el(tags::STUDY_ID, VR::SH, "1"),
                str_el(tags::SERIES_NUMBER, VR::IS, &(s + 1).to_string()),
                str_el(tags::INSTANCE_NUMBER, VR::IS, &(i + 1).to_string()),
                DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(1_u16)),
                str_el(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2"),
                DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(spec.rows)),
                DataElement::new(tags::COLUMNS, VR::US, PrimitiveValue::from(spec.columns)),
                DataElement::new(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(16_u16)),
                DataElement::new(tags::BITS_STORED, VR::US, PrimitiveValue::from(12_u16)),
                DataElement::new(tags::HIGH_BIT, VR::US, PrimitiveValue::from(11_u16)),
                DataElement::new(tags::PIXEL_REPRESENTATION, VR::US, PrimitiveValue::from(0_u16)),
                DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::U16(pixels.into())),
            ]);
            if spec.study_description.is_empty() {
                obj.remove_element(tags::STUDY_DESCRIPTION);
            }
            let texts = [&spec.referring_physician_name, &spec.study_description, &spec.patient_name, &spec.patient_id];
            if texts.iter().any(|t| !t.is_ascii()) {
                // Unicode values are UTF-8, declared as such (PS3.3 C.12.1.1.2).
                obj.put(str_el(tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 192"));
            }
            let file = obj
                .with_meta(
                    FileMetaTableBuilder::new()
                        .transfer_syntax(spec.transfer_syntax.as_str())
                        .media_storage_sop_class_uid(uids::MR_IMAGE_STORAGE)
                        .media_storage_sop_instance_uid(sop.as_str()),
                )
                .context("build file meta")?;
            let path = dir.join(format!("s{:02}_i{:04}.dcm", s + 1, i + 1));
            file.write_to_file(&path).with_context(|| format!("write {}", path.display()))?;
            files.push(path);
        }
        series_uids.push(series);
    }
    Ok(GeneratedStudy { study_instance_uid: study, series_instance_uids: series_uids, files })
}

/// The data set bytes of a Part 10 file: everything after the file meta group.
pub fn dataset_bytes(path: &Path) -> anyhow::Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    let offset = dataset_offset(&bytes).with_context(|| format!("{} is not a DICOM Part 10 file", path.display()))?;
    Ok(bytes[offset..].to_vec())
}

/// Offset of the data set in Part 10 bytes (after preamble, `DICM` and the meta group).
pub fn dataset_offset(bytes: &[u8]) -> Option<usize> {
    if bytes.get(128..132)? != b"DICM"
        || bytes.get(132..136)? != [0x02, 0x00, 0x00, 0x00]
        || bytes.get(136..138)? != b"UL"
    {
        return None;
    }
    let len = u32::from_le_bytes(bytes.get(140..144)?.try_into().ok()?) as usize;
    let end = 144 + len;
    (end <= bytes.len()).then_some(end)
}

/// SOP Instance UID in a Part 10 file's meta group.
pub fn sop_instance_uid(path: &Path) -> anyhow::Result<String> {
    let obj = dicom_object::OpenFileOptions::new()
        .read_until(tags::PIXEL_DATA)
        .open_file(path)
        .with_context(|| format!("open {}", path.display()))?;
    Ok(obj.meta().media_storage_sop_instance_uid().trim_end_matches('\0').to_owned())
}
