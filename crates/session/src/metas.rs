//! Session metas: the study-level attributes the original BIDS-flux read from
//! the first DICOM file of a study to place it (S3 bucket, GitLab groups).
//!
//! They contain patient values. `SessionMetas` has no `Display`, and its
//! `Debug` prints only the StudyInstanceUID: never log the values.

use std::fmt;

use bidsflux_proto::v1 as pb;

use crate::uid::{Uid, UidError};

/// Template variables whose values identify the patient (names, IDs, dates).
///
/// A template that uses one renders patient data: its result (a bucket, a key
/// prefix, a forge project path) must never reach logs, spans, metric labels or
/// error messages, which show the template and the rule broken instead.
/// ReferringPhysicianName (the PI), StudyDescription and StudyInstanceUID are
/// not patient values.
pub const PATIENT_VARIABLES: &[&str] = &["PatientID", "PatientName", "StudyDate"];

/// Study-level attributes of a session, with DICOM `^` already turned into `/`.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionMetas {
    /// StudyInstanceUID (validated).
    pub study_instance_uid: Uid,
    /// PatientID.
    pub patient_id: String,
    /// PatientName, `^` → `/`.
    pub patient_name: String,
    /// ReferringPhysicianName, `^` → `/` (by convention the PI).
    pub referring_physician_name: String,
    /// StudyDate (YYYYMMDD).
    pub study_date: String,
    /// StudyDescription, `^` → `/` (by convention `Something^StudyName`).
    pub study_description: String,
    /// StudyDescription split on `^`.
    pub study_description_path: Vec<String>,
}

impl fmt::Debug for SessionMetas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionMetas")
            .field("study_instance_uid", &self.study_instance_uid.as_str())
            .finish_non_exhaustive()
    }
}

/// Normalises a DICOM string value: padding removed, trailing empty person-name
/// components (`Smith^^^`) dropped.
fn clean(raw: &str) -> String {
    raw.trim_matches(['\0', ' ']).trim_end_matches(['^', ' ']).to_owned()
}

impl SessionMetas {
    /// Builds the metas from raw DICOM values (as in the file, `^` not yet converted).
    pub fn from_raw(
        study_instance_uid: &str,
        patient_id: &str,
        patient_name: &str,
        referring_physician_name: &str,
        study_date: &str,
        study_description: &str,
    ) -> Result<Self, UidError> {
        let description = clean(study_description);
        Ok(Self {
            study_instance_uid: Uid::parse("StudyInstanceUID", study_instance_uid)?,
            patient_id: clean(patient_id),
            patient_name: clean(patient_name).replace('^', "/"),
            referring_physician_name: clean(referring_physician_name).replace('^', "/"),
            study_date: clean(study_date),
            study_description_path: description.split('^').map(|s| s.trim().to_owned()).collect(),
            study_description: description.replace('^', "/"),
        })
    }

    /// The value of a template variable, `None` when the name is unknown or the index out of range.
    pub fn lookup(&self, name: &str, index: Option<usize>) -> Option<&str> {
        match (name, index) {
            ("StudyInstanceUID", None) => Some(self.study_instance_uid.as_str()),
            ("PatientID", None) => Some(&self.patient_id),
            ("PatientName", None) => Some(&self.patient_name),
            ("ReferringPhysicianName", None) => Some(&self.referring_physician_name),
            ("StudyDate", None) => Some(&self.study_date),
            ("StudyDescription", None) => Some(&self.study_description),
            ("StudyDescriptionPath", Some(i)) => self.study_description_path.get(i).map(String::as_str),
            _ => None,
        }
    }

    /// Whether `name` (with or without an index) is a variable the renderer knows.
    pub fn is_known(name: &str, indexed: bool) -> bool {
        match name {
            "StudyDescriptionPath" => indexed,
            "StudyInstanceUID"
            | "PatientID"
            | "PatientName"
            | "ReferringPhysicianName"
            | "StudyDate"
            | "StudyDescription" => !indexed,
            _ => false,
        }
    }

    /// Whether `name` is a patient variable (see [`PATIENT_VARIABLES`]).
    pub fn is_patient_variable(name: &str) -> bool {
        PATIENT_VARIABLES.contains(&name)
    }

    /// Wire form. The raw `^` form is not kept: values are sent converted.
    pub fn to_proto(&self) -> pb::SessionMetas {
        pb::SessionMetas {
            study_instance_uid: self.study_instance_uid.to_string(),
            patient_id: self.patient_id.clone(),
            patient_name: self.patient_name.replace('/', "^"),
            referring_physician_name: self.referring_physician_name.replace('/', "^"),
            study_date: self.study_date.clone(),
            study_description: self.study_description_path.join("^"),
        }
    }
}

impl TryFrom<&pb::SessionMetas> for SessionMetas {
    type Error = UidError;
    fn try_from(m: &pb::SessionMetas) -> Result<Self, UidError> {
        Self::from_raw(
            &m.study_instance_uid,
            &m.patient_id,
            &m.patient_name,
            &m.referring_physician_name,
            &m.study_date,
            &m.study_description,
        )
    }
}

#[cfg(test)]
pub(crate) fn example() -> SessionMetas {
    #[allow(clippy::unwrap_used)]
    SessionMetas::from_raw("1.2.3.4", "P001", "Doe^Jane^^", "Investigator", "20261127", "Brain^Study1").unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carets_become_slashes_and_path_splits() {
        let m = example();
        assert_eq!(m.patient_name, "Doe/Jane");
        assert_eq!(m.study_description, "Brain/Study1");
        assert_eq!(m.lookup("StudyDescriptionPath", Some(1)), Some("Study1"));
        assert_eq!(m.lookup("StudyDescriptionPath", Some(2)), None);
        assert_eq!(m.lookup("Nope", None), None);
    }

    #[test]
    fn patient_variables_are_known_variables() {
        for v in PATIENT_VARIABLES {
            assert!(SessionMetas::is_known(v, false) && SessionMetas::is_patient_variable(v), "{v}");
        }
        for v in ["StudyInstanceUID", "ReferringPhysicianName", "StudyDescription", "StudyDescriptionPath"] {
            assert!(!SessionMetas::is_patient_variable(v), "{v}");
        }
    }

    #[test]
    fn debug_hides_patient_values() {
        let s = format!("{:?}", example());
        assert!(!s.contains("Doe") && !s.contains("P001"), "{s}");
    }

    #[test]
    fn proto_round_trip() {
        let m = example();
        assert_eq!(SessionMetas::try_from(&m.to_proto()).unwrap(), m);
    }
}
