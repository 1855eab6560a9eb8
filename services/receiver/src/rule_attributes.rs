//! The data set attributes the receiver copies into `InstanceStored.attributes`, for the
//! completion rules of study-completion to select on (`BIDSFLUX_RULE_ATTRIBUTES`).
//!
//! Keywords are checked against the standard data dictionary at start. Patient attributes
//! (group 0010: PatientName, PatientID, PatientBirthDate, …) are refused unless
//! `BIDSFLUX_RULE_ATTRIBUTES_ALLOW_PATIENT=true`: with them, events on the bus carry patient
//! values (never logged either way). Sequences and bulk data cannot be selected on.

use dicom_core::dictionary::{DataDictionary as _, DataDictionaryEntry as _};
use dicom_core::{Tag, VR};
use dicom_dictionary_std::StandardDataDictionary;
use dicom_object::InMemDicomObject;

/// Variable listing the keywords.
pub const VAR: &str = "BIDSFLUX_RULE_ATTRIBUTES";
/// Variable allowing patient attributes.
pub const ALLOW_PATIENT_VAR: &str = "BIDSFLUX_RULE_ATTRIBUTES_ALLOW_PATIENT";

/// Keywords extracted by default: what rules commonly select on, none of them a patient's.
/// (Modality, SeriesDescription and SeriesNumber are fields of the event of their own.)
pub const DEFAULT: &[&str] = &[
    "StudyDescription",
    "ProtocolName",
    "InstitutionName",
    "StationName",
    "Manufacturer",
    "ManufacturerModelName",
    "BodyPartExamined",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "ImageType",
    "SequenceName",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
    "NumberOfSeriesRelatedInstances",
];

/// The attributes to extract, by tag.
#[derive(Debug, Clone, Default)]
pub struct RuleAttributes {
    wanted: Vec<(String, Tag)>,
}

impl RuleAttributes {
    /// Parses a comma-separated keyword list; errors name the keyword.
    pub fn parse(list: &str, allow_patient: bool) -> Result<Self, String> {
        let mut wanted: Vec<(String, Tag)> = Vec::new();
        for keyword in list.split(',').map(str::trim).filter(|k| !k.is_empty()) {
            let entry = StandardDataDictionary
                .by_name(keyword)
                .ok_or_else(|| format!("{keyword:?} is not a DICOM attribute keyword (e.g. StudyDescription)"))?;
            let tag = entry.tag_range().inner();
            if tag.group() == 0x0010 && !allow_patient {
                return Err(format!(
                    "{keyword} is a patient attribute: set {ALLOW_PATIENT_VAR}=true to put patient values on the bus"
                ));
            }
            if matches!(entry.vr().relaxed(), VR::SQ | VR::OB | VR::OW | VR::OF | VR::OD | VR::OL | VR::OV | VR::UN)
                || tag.group() >= 0x7FE0
                || tag.group() <= 0x0002
            {
                return Err(format!("{keyword} ({tag}) holds no text a rule can select on"));
            }
            if !wanted.iter().any(|(_, t)| *t == tag) {
                wanted.push((keyword.to_owned(), tag));
            }
        }
        Ok(Self { wanted })
    }

    /// The default list ([`DEFAULT`]).
    pub fn default_list() -> Self {
        // The default keywords are all in the dictionary and none is a patient's.
        Self::parse(&DEFAULT.join(","), false).unwrap_or_default()
    }

    /// Whether nothing is extracted.
    pub fn is_empty(&self) -> bool {
        self.wanted.is_empty()
    }

    /// The keywords, in order.
    pub fn keywords(&self) -> impl Iterator<Item = &str> {
        self.wanted.iter().map(|(k, _)| k.as_str())
    }

    /// The first top-level tag the header walk may stop at: past every wanted tag.
    pub fn stop_after(&self) -> Option<(u16, u16)> {
        self.wanted.iter().map(|(_, t)| (t.group(), t.element())).max().map(|(g, e)| match e.checked_add(1) {
            Some(e) => (g, e),
            None => (g + 1, 0),
        })
    }

    /// The values found in a data set header, padding removed (empty values left out).
    pub fn extract(&self, obj: &InMemDicomObject) -> std::collections::HashMap<String, String> {
        let mut out = std::collections::HashMap::new();
        for (keyword, tag) in &self.wanted {
            let Some(value) = obj.element_opt(*tag).ok().flatten().and_then(|e| e.to_str().ok()) else { continue };
            let value = value.trim_end_matches(['\0', ' ']).trim_start();
            if !value.is_empty() {
                out.insert(keyword.clone(), value.to_owned());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_checks_and_orders_keywords() {
        let a = RuleAttributes::parse("StudyDescription, ProtocolName,StudyDescription", false).unwrap();
        assert_eq!(a.keywords().collect::<Vec<_>>(), ["StudyDescription", "ProtocolName"]);
        assert_eq!(a.stop_after(), Some((0x0018, 0x1031)));
        let e = RuleAttributes::parse("StudyDescriptoin", false).unwrap_err();
        assert!(e.contains("\"StudyDescriptoin\" is not a DICOM attribute keyword"), "{e}");
        let e = RuleAttributes::parse("PatientName", false).unwrap_err();
        assert!(e.contains("PatientName is a patient attribute") && e.contains(ALLOW_PATIENT_VAR), "{e}");
        assert!(RuleAttributes::parse("PatientName", true).is_ok());
        let e = RuleAttributes::parse("PixelData", false).unwrap_err();
        assert!(e.contains("holds no text"), "{e}");
        assert!(RuleAttributes::parse("ReferencedSeriesSequence", false).is_err());
        assert!(RuleAttributes::parse("", false).unwrap().is_empty());
        let d = RuleAttributes::default_list();
        assert_eq!(d.keywords().count(), DEFAULT.len());
        assert_eq!(d.stop_after(), Some((0x0020, 0x120A)), "past NumberOfSeriesRelatedInstances");
    }

    #[test]
    fn extracts_trimmed_non_empty_values() {
        use dicom_core::{DataElement, PrimitiveValue};
        use dicom_dictionary_std::tags;
        let mut obj = InMemDicomObject::new_empty();
        obj.put(DataElement::new(tags::STUDY_DESCRIPTION, VR::LO, PrimitiveValue::from("Brain MRSI ")));
        obj.put(DataElement::new(tags::PROTOCOL_NAME, VR::LO, PrimitiveValue::from("")));
        obj.put(DataElement::new(tags::PATIENT_NAME, VR::PN, PrimitiveValue::from("Doe^Jane")));
        let a = RuleAttributes::parse("StudyDescription,ProtocolName,StationName", false).unwrap();
        let values = a.extract(&obj);
        assert_eq!(values.len(), 1);
        assert_eq!(values["StudyDescription"], "Brain MRSI");
    }
}
