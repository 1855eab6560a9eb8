//! Per-study state transitions, kept in the `bidsflux_v1_studies` KV bucket.
//!
//! Pure functions over [`pb::StudyState`] so they are testable without a
//! server; the callers apply them with compare-and-set ([`crate::store`]).

use std::collections::HashSet;

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

/// What to record after *study completed* was published for `published` and
/// the compare-and-set write of that completion lost to another writer.
#[derive(Debug, Clone, PartialEq)]
pub enum Reconciled {
    /// Nothing: this generation is recorded already, or the state moved on.
    Settled,
    /// Record the completion as published: nothing new arrived.
    Complete(pb::StudyState),
    /// Instances arrived after the state was read for publishing; they are
    /// not in the published event (the uploader may already be archiving
    /// without them), so the completion is recorded and the next generation
    /// opened with them. The state is OPEN: schedule its deadline.
    Reopen(pb::StudyState),
}

/// Decides what to write given the `current` state and the `published`
/// (completed) one. Times are Unix ms.
///
/// Instances beyond those published start generation `g + 1`: it keeps every
/// fingerprint (so resends of either generation stay duplicates, as in
/// [`apply_instance`]), starts at the latest arrival, and keeps the current
/// deadline (or `now + quiet` if that has passed).
pub fn reconcile_completion(
    current: Option<pb::StudyState>,
    published: &pb::StudyState,
    now_ms: i64,
    quiet_ms: i64,
) -> Reconciled {
    let Some(cur) = current else { return Reconciled::Settled };
    if cur.generation != published.generation || cur.status != pb::StudyStatus::Open as i32 {
        return Reconciled::Settled;
    }
    let seen: HashSet<u64> = published.instance_hashes.iter().copied().collect();
    if cur.instance_hashes.iter().all(|h| seen.contains(h)) {
        return Reconciled::Complete(published.clone());
    }
    let arrived_ms = cur.last_instance_unix_ms;
    let deadline = if cur.deadline_unix_ms > now_ms { cur.deadline_unix_ms } else { now_ms + quiet_ms };
    let mut next = cur;
    let kept: HashSet<u64> = next.instance_hashes.iter().copied().collect();
    next.instance_hashes.extend(published.instance_hashes.iter().filter(|h| !kept.contains(h)));
    next.status = pb::StudyStatus::Open as i32;
    next.generation = published.generation + 1;
    next.first_instance_unix_ms = arrived_ms;
    next.last_instance_unix_ms = arrived_ms;
    next.deadline_unix_ms = deadline;
    next.last_reason = published.last_reason.clone();
    next.completed_at_unix_ms = published.completed_at_unix_ms;
    Reconciled::Reopen(next)
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

    #[test]
    fn an_instance_landing_while_completing_opens_the_next_generation() {
        let (s, _) = apply_instance(None, &ev("1.1", "9.1"), 0, 100, Some("tp".into()));
        let (s, _) = apply_instance(Some(s), &ev("1.2", "9.1"), 10, 100, None);
        let (published, event) = complete(s.clone(), pb::CompletionReason::default(), 200);
        assert_eq!(event.instance_count, 2);
        // Between reading `s` and recording the completion, 1.3 arrived.
        let (current, a) = apply_instance(Some(s), &ev("1.3", "9.2"), 150, 100, None);
        assert_eq!(a, Applied::Added);

        let Reconciled::Reopen(next) = reconcile_completion(Some(current.clone()), &published, 200, 100) else {
            panic!("expected a new generation");
        };
        assert_eq!((next.status, next.generation), (pb::StudyStatus::Open as i32, 1));
        assert_eq!(next.instance_hashes.len(), 3);
        assert_eq!((next.first_instance_unix_ms, next.last_instance_unix_ms, next.deadline_unix_ms), (150, 150, 250));
        assert_eq!((next.completed_at_unix_ms, next.traceparent.as_str()), (200, "tp"));
        // Resends of either generation stay duplicates; the next completion is generation 1 with all three.
        for sop in ["1.1", "1.3"] {
            assert_eq!(apply_instance(Some(next.clone()), &ev(sop, "9.1"), 260, 100, None).1, Applied::Duplicate);
        }
        let (_, event) = complete(next, pb::CompletionReason::default(), 300);
        assert_eq!((event.generation, event.instance_count), (1, 3));

        // A deadline already past is pushed a quiet period ahead.
        let Reconciled::Reopen(late) = reconcile_completion(Some(current), &published, 400, 100) else {
            panic!("expected a new generation");
        };
        assert_eq!(late.deadline_unix_ms, 500);
    }

    #[test]
    fn completion_is_recorded_as_published_or_not_at_all() {
        let (s, _) = apply_instance(None, &ev("1.1", "9.1"), 0, 100, None);
        let (published, _) = complete(s.clone(), pb::CompletionReason::default(), 200);
        // Nothing new: record what was published.
        assert_eq!(reconcile_completion(Some(s), &published, 200, 100), Reconciled::Complete(published.clone()));
        // Recorded by someone else, or the study moved on, or the key is gone: nothing to do.
        assert_eq!(reconcile_completion(Some(published.clone()), &published, 200, 100), Reconciled::Settled);
        let (amended, _) = apply_instance(Some(published.clone()), &ev("1.2", "9.1"), 210, 100, None);
        assert_eq!(reconcile_completion(Some(amended), &published, 220, 100), Reconciled::Settled);
        assert_eq!(reconcile_completion(None, &published, 220, 100), Reconciled::Settled);
    }
}
