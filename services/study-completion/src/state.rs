//! Per-study state transitions, kept in the `bidsflux_v1_studies` KV bucket.
//!
//! Pure functions over [`pb::StudyState`] so they are testable without a
//! server; [`crate::store`] applies them with compare-and-set.

use bidsflux_proto::v1 as pb;
use sha2::{Digest, Sha256};

/// 8-byte fingerprint of a SOP Instance UID (de-duplicates redelivered events).
pub fn instance_hash(sop_instance_uid: &str) -> u64 {
    let d = Sha256::digest(sop_instance_uid.as_bytes());
    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// What an instance event did to the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// First instance of a new study.
    NewStudy,
    /// Another instance of an open study.
    Added,
    /// The instance was already counted (redelivery or resend).
    Duplicate,
    /// The study was complete: a new generation (amendment) was opened.
    Amendment,
}

/// Applies one stored instance. `now` and the deadline are Unix ms.
pub fn apply_instance(
    state: Option<pb::StudyState>,
    ev: &pb::InstanceStored,
    now_ms: i64,
    quiet_ms: i64,
    traceparent: Option<String>,
) -> (pb::StudyState, Applied) {
    let hash = instance_hash(&ev.sop_instance_uid);
    let fresh = |generation: u32| pb::StudyState {
        study_instance_uid: ev.study_instance_uid.clone(),
        status: pb::StudyStatus::Open as i32,
        generation,
        first_instance_unix_ms: now_ms,
        last_instance_unix_ms: now_ms,
        deadline_unix_ms: now_ms + quiet_ms,
        instance_hashes: vec![hash],
        series_instance_uids: vec![ev.series_instance_uid.clone()],
        traceparent: traceparent.clone().unwrap_or_default(),
        last_reason: None,
        completed_at_unix_ms: 0,
    };
    match state {
        None => (fresh(0), Applied::NewStudy),
        Some(s) if s.status == pb::StudyStatus::Completed as i32 => {
            // A late arrival: the instance may belong to what was completed (a resend) or be new.
            if s.instance_hashes.contains(&hash) {
                return (s, Applied::Duplicate);
            }
            let mut next = fresh(s.generation + 1);
            // Keep the fingerprints of earlier generations so their resends stay duplicates.
            next.instance_hashes = s.instance_hashes.clone();
            next.instance_hashes.push(hash);
            if next.traceparent.is_empty() {
                next.traceparent = s.traceparent;
            }
            (next, Applied::Amendment)
        }
        Some(mut s) => {
            if s.instance_hashes.contains(&hash) {
                return (s, Applied::Duplicate);
            }
            s.instance_hashes.push(hash);
            if !s.series_instance_uids.contains(&ev.series_instance_uid) {
                s.series_instance_uids.push(ev.series_instance_uid.clone());
            }
            s.last_instance_unix_ms = now_ms;
            s.deadline_unix_ms = s.deadline_unix_ms.max(now_ms + quiet_ms);
            (s, Applied::Added)
        }
    }
}

/// Marks an open study complete and returns the event to publish.
pub fn complete(
    mut s: pb::StudyState,
    reason: pb::CompletionReason,
    now_ms: i64,
) -> (pb::StudyState, pb::StudyCompleted) {
    s.status = pb::StudyStatus::Completed as i32;
    s.completed_at_unix_ms = now_ms;
    s.last_reason = Some(reason.clone());
    let ev = pb::StudyCompleted {
        study_instance_uid: s.study_instance_uid.clone(),
        generation: s.generation,
        reason: Some(reason),
        series_count: s.series_instance_uids.len() as u32,
        instance_count: instances_in_generation(&s),
        first_instance_unix_ms: s.first_instance_unix_ms,
        last_instance_unix_ms: s.last_instance_unix_ms,
        completed_at_unix_ms: now_ms,
        spool_study_dir: s.study_instance_uid.clone(),
    };
    (s, ev)
}

/// Instances counted for the study so far (all generations: the spool holds them all).
fn instances_in_generation(s: &pb::StudyState) -> u64 {
    s.instance_hashes.len() as u64
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
    fn quiet_period_extends_and_duplicates_do_not_count() {
        let (s, a) = apply_instance(None, &ev("1.1", "9.1"), 1_000, 60_000, None);
        assert_eq!(a, Applied::NewStudy);
        assert_eq!(s.deadline_unix_ms, 61_000);
        let (s, a) = apply_instance(Some(s), &ev("1.2", "9.2"), 5_000, 60_000, None);
        assert_eq!(a, Applied::Added);
        assert_eq!(s.deadline_unix_ms, 65_000);
        let (s, a) = apply_instance(Some(s), &ev("1.2", "9.2"), 9_000, 60_000, None);
        assert_eq!(a, Applied::Duplicate);
        assert_eq!(s.deadline_unix_ms, 65_000);
        let (_, done) = complete(s, pb::CompletionReason::default(), 70_000);
        assert_eq!((done.instance_count, done.series_count, done.generation), (2, 2, 0));
    }

    #[test]
    fn late_arrivals_open_an_amendment_and_resends_do_not() {
        let (s, _) = apply_instance(None, &ev("1.1", "9.1"), 0, 10, Some("tp".into()));
        let (s, _) = complete(s, pb::CompletionReason::default(), 20);
        let (s2, a) = apply_instance(Some(s.clone()), &ev("1.1", "9.1"), 30, 10, None);
        assert_eq!(a, Applied::Duplicate);
        assert_eq!(s2.status, pb::StudyStatus::Completed as i32);
        let (s3, a) = apply_instance(Some(s), &ev("1.9", "9.3"), 30, 10, None);
        assert_eq!(a, Applied::Amendment);
        assert_eq!((s3.generation, s3.status), (1, pb::StudyStatus::Open as i32));
        assert_eq!(s3.traceparent, "tp");
    }
}
