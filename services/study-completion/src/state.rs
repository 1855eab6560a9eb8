//! What an instance does to a study's state, kept in the `bidsflux_v1_studies` KV bucket.
//!
//! Pure functions over [`pb::StudyState`] so they are testable without a server; the callers
//! apply them with compare-and-set (`study_kv::update`). What happens once the rule says
//! the study is complete is in [`crate::decide`].

use std::collections::HashMap;

use bidsflux_proto::v1 as pb;

use crate::rules::{Announced, SeriesProgress, StudyProgress};

/// 8-byte fingerprint of a SOP Instance UID (de-duplicates redelivered events; the uploader
/// picks a generation's files by them).
pub use bidsflux_session::instance_fingerprint as instance_hash;

/// What an instance event did to the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// First instance of a new study.
    NewStudy,
    /// Another instance of an open (or held) study.
    Added,
    /// The instance was already counted (redelivery or resend).
    Duplicate,
    /// The study was complete (or discarded): a new generation (amendment) was opened.
    Amendment,
}

/// The keywords `select` finds in [`pb::InstanceStored`]'s own fields rather than in `attributes`.
pub const FIELD_KEYWORDS: [&str; 5] =
    ["CallingAETitle", "CalledAETitle", "Modality", "SeriesDescription", "SeriesNumber"];

/// The value of DICOM attribute `keyword` in `ev`: its own fields for [`FIELD_KEYWORDS`],
/// `attributes` for the rest. Empty values count as missing.
pub fn lookup<'a>(ev: &'a pb::InstanceStored, keyword: &str) -> Option<&'a str> {
    let v = match keyword {
        "CallingAETitle" => Some(ev.calling_ae_title.as_str()),
        "CalledAETitle" => Some(ev.called_ae_title.as_str()),
        "Modality" => Some(ev.modality.as_str()),
        "SeriesDescription" => Some(ev.series_description.as_str()),
        "SeriesNumber" => Some(ev.series_number.as_str()),
        other => ev.attributes.get(other).map(String::as_str),
    };
    v.filter(|v| !trim(v).is_empty())
}

/// Everything [`lookup`] can see in `ev`, by keyword (kept in the state to re-select later).
pub fn selection_attributes(ev: &pb::InstanceStored) -> HashMap<String, String> {
    let mut out: HashMap<String, String> =
        ev.attributes.iter().filter(|(_, v)| !trim(v).is_empty()).map(|(k, v)| (k.clone(), v.clone())).collect();
    for k in FIELD_KEYWORDS {
        if let Some(v) = lookup(ev, k) {
            out.insert(k.to_owned(), v.to_owned());
        }
    }
    out
}

/// Trims DICOM padding (whitespace and NUL).
fn trim(v: &str) -> &str {
    v.trim_matches(|c: char| c.is_whitespace() || c == '\0')
}

/// A count announced by every instance so far: `known` (0 = unknown) after one more instance
/// announced `next`. A disagreement makes it unknown for good (see
/// [`crate::rules::merge_announced`]).
fn merge(known: u32, next: Option<u32>) -> u32 {
    if known == next.unwrap_or(0) { known } else { 0 }
}

/// A new study's state for its first instance (status and rule are set by the caller).
pub fn new_study(ev: &pb::InstanceStored, now_ms: i64, traceparent: Option<String>) -> pb::StudyState {
    pb::StudyState {
        study_instance_uid: ev.study_instance_uid.clone(),
        status: pb::StudyStatus::Open as i32,
        traceparent: traceparent.unwrap_or_default(),
        attributes: selection_attributes(ev),
        created_at_unix_ms: now_ms,
        status_changed_at_unix_ms: now_ms,
        ..Default::default()
    }
}

/// Opens generation `g + 1` of a completed or discarded study: the progress starts empty, the
/// fingerprints of every generation are kept (resends stay duplicates), and so are the rule,
/// the last reason and completion, and any event still in the outbox.
pub fn open_next_generation(s: &mut pb::StudyState, now_ms: i64) {
    s.generation += 1;
    s.status = pb::StudyStatus::Open as i32;
    s.status_changed_at_unix_ms = now_ms;
    s.series.clear();
    s.generation_instances = 0;
    s.expected_series = 0;
    s.expected_instances = 0;
    s.deadline_unix_ms = 0;
    s.hold_cause = pb::HoldCause::Unspecified as i32;
}

/// Whether `sop_instance_uid` was counted in any generation.
pub fn seen(s: &pb::StudyState, sop_instance_uid: &str) -> bool {
    s.instance_hashes.contains(&instance_hash(sop_instance_uid))
}

/// Counts `ev` in the generation being collected (the caller checked it is not [`seen`]).
pub fn add_instance(s: &mut pb::StudyState, ev: &pb::InstanceStored, now_ms: i64) {
    let announced = Announced::from_lookup(|k| lookup(ev, k));
    s.instance_hashes.push(instance_hash(&ev.sop_instance_uid));
    if !s.series_instance_uids.contains(&ev.series_instance_uid) {
        s.series_instance_uids.push(ev.series_instance_uid.clone());
    }
    if s.generation_instances == 0 {
        s.first_instance_unix_ms = now_ms;
        s.expected_series = announced.study_series.unwrap_or(0);
        s.expected_instances = announced.study_instances.unwrap_or(0);
    } else {
        s.expected_series = merge(s.expected_series, announced.study_series);
        s.expected_instances = merge(s.expected_instances, announced.study_instances);
    }
    s.generation_instances = s.generation_instances.saturating_add(1);
    s.last_instance_unix_ms = s.last_instance_unix_ms.max(now_ms);
    match s.series.iter_mut().find(|x| x.series_instance_uid == ev.series_instance_uid) {
        Some(x) => {
            x.instances = x.instances.saturating_add(1);
            x.last_instance_unix_ms = x.last_instance_unix_ms.max(now_ms);
            x.expected_instances = merge(x.expected_instances, announced.series_instances);
        }
        None => s.series.push(pb::SeriesProgress {
            series_instance_uid: ev.series_instance_uid.clone(),
            description: trim(&ev.series_description).to_owned(),
            instances: 1,
            expected_instances: announced.series_instances.unwrap_or(0),
            first_instance_unix_ms: now_ms,
            last_instance_unix_ms: now_ms,
            modality: trim(&ev.modality).to_owned(),
            series_number: trim(&ev.series_number).to_owned(),
        }),
    }
}

/// The generation being collected, as the rules' evaluator sees it.
///
/// A state written before rules has no per-series progress: its series count with no
/// description, and all its instances as this generation's.
pub fn progress(s: &pb::StudyState) -> StudyProgress {
    let nonzero = |n: u32| (n > 0).then_some(n);
    let legacy = s.series.is_empty() && s.generation_instances == 0 && !s.instance_hashes.is_empty();
    let series = if legacy {
        let each = SeriesProgress {
            description: String::new(),
            instances: 0,
            expected_instances: None,
            last_instance_ms: s.last_instance_unix_ms,
        };
        vec![each; s.series_instance_uids.len()]
    } else {
        s.series
            .iter()
            .map(|x| SeriesProgress {
                description: x.description.clone(),
                instances: x.instances,
                expected_instances: nonzero(x.expected_instances),
                last_instance_ms: x.last_instance_unix_ms,
            })
            .collect()
    };
    StudyProgress {
        first_instance_ms: s.first_instance_unix_ms,
        last_instance_ms: s.last_instance_unix_ms,
        instances: if legacy {
            u32::try_from(s.instance_hashes.len()).unwrap_or(u32::MAX)
        } else {
            s.generation_instances
        },
        series,
        expected_series: nonzero(s.expected_series),
        expected_instances: nonzero(s.expected_instances),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(sop: &str, series: &str) -> pb::InstanceStored {
        pb::InstanceStored {
            study_instance_uid: "1.2.3".into(),
            series_instance_uid: series.into(),
            sop_instance_uid: sop.into(),
            ..Default::default()
        }
    }

    #[test]
    fn select_sees_the_event_fields_for_their_keywords_and_attributes_for_the_rest() {
        let mut e = ev("1.1", "9.1");
        e.calling_ae_title = "SCANNER1 ".into();
        e.modality = "MR".into();
        e.series_description = "".into();
        e.attributes.insert("StudyDescription".into(), "Brain^MRSI".into());
        e.attributes.insert("Modality".into(), "CT".into()); // the field wins
        e.attributes.insert("StationName".into(), "  ".into());
        assert_eq!(lookup(&e, "CallingAETitle"), Some("SCANNER1 "));
        assert_eq!(lookup(&e, "Modality"), Some("MR"));
        assert_eq!(lookup(&e, "StudyDescription"), Some("Brain^MRSI"));
        assert_eq!((lookup(&e, "SeriesDescription"), lookup(&e, "StationName")), (None, None));
        let attrs = selection_attributes(&e);
        assert_eq!(attrs.get("Modality").map(String::as_str), Some("MR"));
        assert_eq!(attrs.len(), 3, "{attrs:?}");
    }

    #[test]
    fn progress_per_series_with_announced_counts_merged() {
        let mut s = new_study(&ev("1.1", "9.1"), 1_000, None);
        let mut a = ev("1.1", "9.1");
        a.series_description = " MRSI ".into();
        a.attributes.insert("NumberOfSeriesRelatedInstances".into(), "2".into());
        a.attributes.insert("NumberOfStudyRelatedInstances".into(), "3".into());
        add_instance(&mut s, &a, 1_000);
        let mut b = a.clone();
        b.sop_instance_uid = "1.2".into();
        add_instance(&mut s, &b, 2_000);
        let mut c = ev("1.3", "9.2");
        c.attributes.insert("NumberOfSeriesRelatedInstances".into(), "5".into());
        c.attributes.insert("NumberOfStudyRelatedInstances".into(), "4".into()); // disagrees
        add_instance(&mut s, &c, 3_000);
        let p = progress(&s);
        assert_eq!((p.first_instance_ms, p.last_instance_ms, p.instances), (1_000, 3_000, 3));
        assert_eq!((p.expected_instances, p.expected_series), (None, None));
        assert_eq!(p.series[0].description, "MRSI");
        assert_eq!(
            (p.series[0].instances, p.series[0].expected_instances, p.series[0].last_instance_ms),
            (2, Some(2), 2_000)
        );
        assert_eq!((p.series[1].instances, p.series[1].expected_instances), (1, Some(5)));
        assert!(seen(&s, "1.2") && !seen(&s, "1.4"));

        // The next generation starts empty but remembers every fingerprint and series.
        open_next_generation(&mut s, 9_000);
        add_instance(&mut s, &ev("1.4", "9.3"), 9_500);
        let p = progress(&s);
        assert_eq!((s.generation, p.instances, p.series.len(), p.first_instance_ms), (1, 1, 1, 9_500));
        assert_eq!((s.instance_hashes.len(), s.series_instance_uids.len()), (4, 3));
    }

    #[test]
    fn a_state_from_before_rules_is_evaluated_by_its_series_and_instances() {
        let old = pb::StudyState {
            status: pb::StudyStatus::Open as i32,
            first_instance_unix_ms: 5,
            last_instance_unix_ms: 50,
            instance_hashes: vec![1, 2, 3],
            series_instance_uids: vec!["9.1".into(), "9.2".into()],
            ..Default::default()
        };
        let p = progress(&old);
        assert_eq!((p.instances, p.series.len(), p.last_instance_ms), (3, 2, 50));
    }
}
