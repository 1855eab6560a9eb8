//! The study state machine: which rule a study falls under, when it is complete and what then.
//!
//! Pure: every function takes the state read from the KV bucket and the time, and returns the
//! state to write with compare-and-set (`study_kv::update`). An event that a transition
//! decides (*study completed*, *discarded*, *held*) is put in the state's outbox in the same
//! write and published afterwards (`outbox`), so a transition and its event can never
//! be separated by a crash or a concurrent writer: whoever wins the compare-and-set defines the
//! event, and its de-duplication id makes the publication happen once.
//!
//! ```text
//!            first instance ──► OPEN ──(criterion fires)──► index ───► COMPLETED
//!   (no rule: HELD) │             │                        discard ─► DISCARDED
//!                   │             │                        hold ────► HELD ──(release, operator)──► COMPLETED
//!                   ▼             └──(operator hold)──► HELD ──(release)──► OPEN
//!   late instance on COMPLETED / DISCARDED ──► OPEN, generation + 1, same rule
//! ```

use std::sync::Arc;

use bidsflux_messaging::subjects;
use bidsflux_proto::v1 as pb;
use prost::Message as _;

use crate::rules::{Action, Criterion, ForceAction, Rule, RuleSet, Selected, Verdict};
use crate::state::{self, Applied};

/// What a study's generation turned into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// *study completed* for the pipeline.
    Indexed,
    /// *study discarded*; nothing for the pipeline.
    Discarded,
    /// Waiting for an operator.
    Held,
}

impl Outcome {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Indexed => "indexed",
            Outcome::Discarded => "discarded",
            Outcome::Held => "held",
        }
    }
}

/// A transition made by a write, for metrics and logs (no patient values).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// What fired.
    pub criterion: pb::CompletionCriterion,
    /// What it led to.
    pub outcome: Outcome,
    /// The reason's detail, e.g. `quiet 1m`.
    pub detail: String,
    /// The generation it concerns.
    pub generation: u32,
    /// Milliseconds from the generation's first and last instance to the decision.
    pub since_first_ms: i64,
    /// See `since_first_ms`.
    pub since_last_ms: i64,
}

/// An operator's request (admin API).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Complete now and index (OPEN or HELD).
    ForceComplete,
    /// Hold an open study.
    Hold,
    /// Lift a hold: an operator's hold goes back to OPEN and the rule; a rule's hold (or a study
    /// no rule selected) is indexed.
    Release,
    /// Discard (OPEN or HELD).
    Discard,
    /// Publish the last *study completed* again, with a new de-duplication id.
    Reindex,
}

impl Command {
    /// The command's name in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::ForceComplete => "force-complete",
            Command::Hold => "hold",
            Command::Release => "release",
            Command::Discard => "discard",
            Command::Reindex => "reindex",
        }
    }
}

/// Why an operator's request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// No such study.
    #[error("no study with this StudyInstanceUID")]
    NotFound,
    /// The study's status does not allow it.
    #[error("cannot {command} a study that is {status}{hint}")]
    Status {
        /// The command.
        command: &'static str,
        /// The status, e.g. `completed`.
        status: &'static str,
        /// What to do instead, if anything.
        hint: &'static str,
    },
}

/// Lower-case name of a status.
pub fn status_name(status: i32) -> &'static str {
    match pb::StudyStatus::try_from(status) {
        Ok(pb::StudyStatus::Open) => "open",
        Ok(pb::StudyStatus::Completed) => "completed",
        Ok(pb::StudyStatus::Held) => "held",
        Ok(pb::StudyStatus::Discarded) => "discarded",
        _ => "unspecified",
    }
}

/// Metric label of a criterion.
pub fn criterion_label(c: pb::CompletionCriterion) -> &'static str {
    match c {
        pb::CompletionCriterion::QuietPeriod => "quiet_period",
        pb::CompletionCriterion::SeriesReceived => "series_received",
        pb::CompletionCriterion::ExpectedCounts => "expected_counts",
        pb::CompletionCriterion::Forced => "forced",
        pb::CompletionCriterion::Operator => "operator",
        pb::CompletionCriterion::NoRule => "no_rule",
        pb::CompletionCriterion::Unspecified => "unspecified",
    }
}

fn criterion_kind(c: &Criterion) -> pb::CompletionCriterion {
    match c {
        Criterion::SeriesReceived(_) => pb::CompletionCriterion::SeriesReceived,
        Criterion::ExpectedCounts { .. } => pb::CompletionCriterion::ExpectedCounts,
        Criterion::Quiet(_) => pb::CompletionCriterion::QuietPeriod,
        Criterion::Forced { .. } => pb::CompletionCriterion::Forced,
    }
}

fn is(s: &pb::StudyState, status: pb::StudyStatus) -> bool {
    s.status == status as i32
}

/// The state machine over a validated rule set.
#[derive(Debug, Clone)]
pub struct Engine {
    rules: Arc<RuleSet>,
}

impl Engine {
    /// An engine deciding by `rules`.
    pub fn new(rules: Arc<RuleSet>) -> Self {
        Self { rules }
    }

    /// The rules.
    pub fn rules(&self) -> &RuleSet {
        &self.rules
    }

    /// Applies one stored instance at `now_ms` (Unix ms) and evaluates the study's rule.
    ///
    /// A [`Applied::Duplicate`] returns the state unchanged (nothing to write).
    pub fn apply_instance(
        &self,
        current: Option<pb::StudyState>,
        ev: &pb::InstanceStored,
        now_ms: i64,
        traceparent: Option<String>,
    ) -> (pb::StudyState, Applied, Option<Decision>) {
        let (mut s, applied) = match current {
            None => {
                let mut s = state::new_study(ev, now_ms, traceparent);
                match self.rules.select(|k| state::lookup(ev, k)) {
                    Selected::Matched(rule) | Selected::Fallback(rule) => s.rule = rule.name().to_owned(),
                    Selected::Hold => {}
                }
                (s, Applied::NewStudy)
            }
            Some(s) if state::seen(&s, &ev.sop_instance_uid) => return (s, Applied::Duplicate, None),
            Some(mut s) if is(&s, pb::StudyStatus::Completed) || is(&s, pb::StudyStatus::Discarded) => {
                state::open_next_generation(&mut s, now_ms);
                if s.traceparent.is_empty() {
                    s.traceparent = traceparent.unwrap_or_default();
                }
                (s, Applied::Amendment)
            }
            Some(s) => (s, Applied::Added),
        };
        state::add_instance(&mut s, ev, now_ms);
        if !is(&s, pb::StudyStatus::Open) {
            return (s, applied, None);
        }
        let (s, decision) = self.evaluate(s, now_ms);
        (s, applied, decision)
    }

    /// Evaluates an OPEN study whose re-check time has come; `None` when it is not (nothing to
    /// write).
    pub fn on_due(&self, s: pb::StudyState, now_ms: i64) -> Option<(pb::StudyState, Option<Decision>)> {
        if !is(&s, pb::StudyStatus::Open) || s.deadline_unix_ms == 0 || s.deadline_unix_ms > now_ms {
            return None;
        }
        Some(self.evaluate(s, now_ms))
    }

    /// The study's rule: the recorded one, else (a study from before rules, or a rules file that
    /// no longer has it) selected again from the attributes kept of its first instance.
    fn rule_of(&self, s: &mut pb::StudyState) -> Option<&Rule> {
        if let Some(rule) = self.rules.rule(&s.rule) {
            return Some(rule);
        }
        let attributes = &s.attributes;
        let rule = self.rules.select(|k| attributes.get(k).map(String::as_str)).rule();
        if let Some(r) = rule {
            if !s.rule.is_empty() {
                tracing::warn!(study_uid = %s.study_instance_uid, old = %s.rule, new = r.name(), "the study's rule is no longer in the rules file: selected again");
            }
            s.rule = r.name().to_owned();
        }
        rule
    }

    /// Applies the rule to an OPEN study at `now_ms`.
    fn evaluate(&self, mut s: pb::StudyState, now_ms: i64) -> (pb::StudyState, Option<Decision>) {
        let Some(rule) = self.rule_of(&mut s) else {
            s.rule.clear();
            let reason = reason("", pb::CompletionCriterion::NoRule, "no rule selected the study (fallback: hold)");
            let d = hold(&mut s, pb::HoldCause::NoRule, reason, now_ms);
            return (s, Some(d));
        };
        match rule.completion().evaluate(&state::progress(&s), now_ms) {
            Verdict::Wait { recheck_at_ms } => {
                s.deadline_unix_ms = recheck_at_ms.unwrap_or(0);
                (s, None)
            }
            Verdict::Complete(criterion) => {
                let action = match criterion {
                    Criterion::Forced { action: ForceAction::Discard, .. } => Action::Discard,
                    Criterion::Forced { action: ForceAction::Hold, .. } => Action::Hold,
                    _ => rule.action(),
                };
                let r = reason(rule.name(), criterion_kind(&criterion), &criterion.to_string());
                let d = match action {
                    Action::Index => complete(&mut s, r, now_ms),
                    Action::Discard => discard(&mut s, r, now_ms),
                    Action::Hold => hold(&mut s, pb::HoldCause::Rule, r, now_ms),
                };
                (s, Some(d))
            }
        }
    }

    /// Applies an operator's command at `now_ms`. `Ok` with the state unchanged means there was
    /// nothing to do (e.g. holding a held study).
    pub fn operate(
        &self,
        current: Option<pb::StudyState>,
        command: Command,
        now_ms: i64,
    ) -> Result<(pb::StudyState, Option<Decision>), Refused> {
        let mut s = current.ok_or(Refused::NotFound)?;
        let status = pb::StudyStatus::try_from(s.status).unwrap_or(pb::StudyStatus::Unspecified);
        let status_str = status_name(s.status);
        let refuse = |hint: &'static str| Refused::Status { command: command.as_str(), status: status_str, hint };
        let rule = s.rule.clone();
        let operator = |detail: &str| reason(&rule, pb::CompletionCriterion::Operator, detail);
        let d = match (command, status) {
            (Command::ForceComplete, pb::StudyStatus::Open | pb::StudyStatus::Held) => {
                let r = operator("operator");
                complete(&mut s, r, now_ms)
            }
            (Command::ForceComplete, pb::StudyStatus::Completed) => return Err(refuse(" (use reindex)")),
            (Command::Hold, pb::StudyStatus::Open) => {
                let r = operator("held by operator");
                hold(&mut s, pb::HoldCause::Operator, r, now_ms)
            }
            (Command::Hold, pb::StudyStatus::Held) => return Ok((s, None)),
            (Command::Release, pb::StudyStatus::Held) if s.hold_cause == pb::HoldCause::Operator as i32 => {
                s.status = pb::StudyStatus::Open as i32;
                s.status_changed_at_unix_ms = now_ms;
                s.hold_cause = pb::HoldCause::Unspecified as i32;
                return Ok(self.evaluate(s, now_ms));
            }
            (Command::Release, pb::StudyStatus::Held) => {
                let r = operator("released by operator");
                complete(&mut s, r, now_ms)
            }
            (Command::Discard, pb::StudyStatus::Open | pb::StudyStatus::Held) => {
                let r = operator("discarded by operator");
                discard(&mut s, r, now_ms)
            }
            (Command::Reindex, _) => {
                let Some(last) = s.last_completed.clone() else {
                    return Err(refuse(" and was never completed"));
                };
                s.reindex_count += 1;
                let id = subjects::reindex_msg_id(&s.study_instance_uid, last.generation, s.reindex_count);
                let again = pb::StudyCompleted { reindex: s.reindex_count, ..last };
                push(&mut s, pb::OutboxKind::StudyCompleted, id, again.encode_to_vec());
                return Ok((s, None));
            }
            _ => return Err(refuse("")),
        };
        Ok((s, Some(d)))
    }
}

fn reason(rule: &str, criterion: pb::CompletionCriterion, detail: &str) -> pb::CompletionReason {
    pb::CompletionReason { rule: rule.to_owned(), criterion: criterion as i32, detail: detail.to_owned() }
}

fn push(s: &mut pb::StudyState, kind: pb::OutboxKind, msg_id: String, payload: Vec<u8>) {
    s.outbox.push(pb::OutboxEntry { kind: kind as i32, msg_id, payload });
}

/// Ends the transition into `status` at `now_ms` and describes it.
fn decided(
    s: &mut pb::StudyState,
    status: pb::StudyStatus,
    r: &pb::CompletionReason,
    outcome: Outcome,
    now_ms: i64,
) -> Decision {
    s.status = status as i32;
    s.status_changed_at_unix_ms = now_ms;
    s.deadline_unix_ms = 0;
    s.last_reason = Some(r.clone());
    Decision {
        criterion: pb::CompletionCriterion::try_from(r.criterion).unwrap_or(pb::CompletionCriterion::Unspecified),
        outcome,
        detail: r.detail.clone(),
        generation: s.generation,
        since_first_ms: now_ms - s.first_instance_unix_ms,
        since_last_ms: now_ms - s.last_instance_unix_ms,
    }
}

fn generation_series(s: &pb::StudyState) -> u32 {
    u32::try_from(s.series.len()).unwrap_or(u32::MAX)
}

/// COMPLETED, with *study completed* in the outbox.
fn complete(s: &mut pb::StudyState, r: pb::CompletionReason, now_ms: i64) -> Decision {
    let d = decided(s, pb::StudyStatus::Completed, &r, Outcome::Indexed, now_ms);
    s.completed_at_unix_ms = now_ms;
    s.hold_cause = pb::HoldCause::Unspecified as i32;
    let ev = pb::StudyCompleted {
        study_instance_uid: s.study_instance_uid.clone(),
        generation: s.generation,
        reason: Some(r),
        series_count: u32::try_from(s.series_instance_uids.len()).unwrap_or(u32::MAX),
        instance_count: s.instance_hashes.len() as u64,
        first_instance_unix_ms: s.first_instance_unix_ms,
        last_instance_unix_ms: s.last_instance_unix_ms,
        completed_at_unix_ms: now_ms,
        spool_study_dir: s.study_instance_uid.clone(),
        generation_series_count: generation_series(s),
        generation_instance_count: u64::from(s.generation_instances),
        reindex: 0,
    };
    let id = subjects::completed_msg_id(&s.study_instance_uid, s.generation);
    push(s, pb::OutboxKind::StudyCompleted, id, ev.encode_to_vec());
    s.last_completed = Some(ev);
    s.reindex_count = 0;
    d
}

/// DISCARDED, with *study discarded* in the outbox.
fn discard(s: &mut pb::StudyState, r: pb::CompletionReason, now_ms: i64) -> Decision {
    let d = decided(s, pb::StudyStatus::Discarded, &r, Outcome::Discarded, now_ms);
    s.completed_at_unix_ms = now_ms;
    s.hold_cause = pb::HoldCause::Unspecified as i32;
    let ev = pb::StudyDiscarded {
        study_instance_uid: s.study_instance_uid.clone(),
        generation: s.generation,
        reason: Some(r),
        series_count: generation_series(s),
        instance_count: u64::from(s.generation_instances),
        first_instance_unix_ms: s.first_instance_unix_ms,
        last_instance_unix_ms: s.last_instance_unix_ms,
        discarded_at_unix_ms: now_ms,
        spool_study_dir: s.study_instance_uid.clone(),
    };
    let id = subjects::discarded_msg_id(&s.study_instance_uid, s.generation);
    push(s, pb::OutboxKind::StudyDiscarded, id, ev.encode_to_vec());
    d
}

/// HELD for `cause`, with *study held* in the outbox.
fn hold(s: &mut pb::StudyState, cause: pb::HoldCause, r: pb::CompletionReason, now_ms: i64) -> Decision {
    let d = decided(s, pb::StudyStatus::Held, &r, Outcome::Held, now_ms);
    s.hold_cause = cause as i32;
    s.hold_count += 1;
    let ev = pb::StudyHeld {
        study_instance_uid: s.study_instance_uid.clone(),
        generation: s.generation,
        cause: cause as i32,
        reason: Some(r),
        series_count: generation_series(s),
        instance_count: u64::from(s.generation_instances),
        held_at_unix_ms: now_ms,
    };
    let id = subjects::held_msg_id(&s.study_instance_uid, s.generation, s.hold_count);
    push(s, pb::OutboxKind::StudyHeld, id, ev.encode_to_vec());
    d
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;
