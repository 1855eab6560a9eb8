//! Unit tests of the state machine: every criterion and action at explicit times (Unix ms), with
//! no clock and no server.

use super::*;

const S: i64 = 1000;
const STUDY: &str = "1.2.3";

fn engine(toml: &str) -> Engine {
    Engine::new(Arc::new(RuleSet::parse(toml).unwrap()))
}

fn default_engine() -> Engine {
    Engine::new(Arc::new(RuleSet::default_from_quiet_period(std::time::Duration::from_secs(60))))
}

fn ev(sop: &str, series: &str, description: &str) -> pb::InstanceStored {
    pb::InstanceStored {
        study_instance_uid: STUDY.into(),
        series_instance_uid: series.into(),
        sop_instance_uid: sop.into(),
        series_description: description.into(),
        modality: "MR".into(),
        ..Default::default()
    }
}

/// Feeds instances `(sop, series, description, at_s)` in order.
fn feed(
    e: &Engine,
    s: Option<pb::StudyState>,
    instances: &[(&str, &str, &str, i64)],
) -> (pb::StudyState, Option<Decision>) {
    let mut s = s;
    let mut last = None;
    for (sop, series, description, at) in instances {
        let (next, _, d) = e.apply_instance(s, &ev(sop, series, description), at * S, None);
        s = Some(next);
        last = d;
    }
    (s.unwrap(), last)
}

fn status(s: &pb::StudyState) -> pb::StudyStatus {
    pb::StudyStatus::try_from(s.status).unwrap()
}

/// The outbox as (msg id, kind).
fn outbox(s: &pb::StudyState) -> Vec<(String, pb::OutboxKind)> {
    s.outbox.iter().map(|e| (e.msg_id.clone(), pb::OutboxKind::try_from(e.kind).unwrap())).collect()
}

fn completed(s: &pb::StudyState) -> pb::StudyCompleted {
    let e = s.outbox.iter().rev().find(|e| e.kind == pb::OutboxKind::StudyCompleted as i32).unwrap();
    pb::StudyCompleted::decode(e.payload.as_slice()).unwrap()
}

fn reason(s: &pb::StudyState) -> (String, pb::CompletionCriterion, String) {
    let r = s.last_reason.clone().unwrap();
    (r.rule, pb::CompletionCriterion::try_from(r.criterion).unwrap(), r.detail)
}

#[test]
fn quiet_period_completes_at_the_deadline_and_not_before() {
    let e = default_engine();
    let (s, d) = feed(&e, None, &[("1.1", "9.1", "T1w", 0), ("1.2", "9.1", "T1w", 5)]);
    assert_eq!((status(&s), s.deadline_unix_ms, d), (pb::StudyStatus::Open, 65 * S, None));
    assert!(e.on_due(s.clone(), 64 * S).is_none(), "not due yet");
    let (s, d) = e.on_due(s, 65 * S).unwrap();
    let d = d.unwrap();
    assert_eq!((d.outcome, d.since_first_ms, d.since_last_ms), (Outcome::Indexed, 65 * S, 60 * S));
    assert_eq!(status(&s), pb::StudyStatus::Completed);
    assert_eq!(reason(&s), ("default".into(), pb::CompletionCriterion::QuietPeriod, "quiet 1m".into()));
    assert_eq!(outbox(&s), [("completed:1.2.3:0".into(), pb::OutboxKind::StudyCompleted)]);
    let c = completed(&s);
    assert_eq!(
        (c.instance_count, c.series_count, c.generation_instance_count, c.spool_study_dir.as_str()),
        (2, 1, 2, STUDY)
    );
    assert_eq!(s.last_completed, Some(c));
    assert!(e.on_due(s, 999 * S).is_none(), "a completed study has no deadline");
}

#[test]
fn listed_series_complete_the_moment_the_last_one_arrives() {
    let e = engine(
        r#"
        [[rule]]
        name = "mrsi"
        action = "index"
        [rule.completion]
        quiet_period = "10m"
        series_received = '"MRSI" and "STAGE_preproc"'
        "#,
    );
    let (s, d) = feed(&e, None, &[("1.1", "9.1", "T1w", 0), ("1.2", "9.2", "MRSI", 3)]);
    assert_eq!((status(&s), d, s.deadline_unix_ms), (pb::StudyStatus::Open, None, 603 * S));
    let (s, d) = feed(&e, Some(s), &[("1.3", "9.3", " STAGE_preproc ", 4)]);
    assert_eq!(d.unwrap().since_last_ms, 0, "no wait at all");
    assert_eq!(
        reason(&s),
        ("mrsi".into(), pb::CompletionCriterion::SeriesReceived, "series_received: MRSI, STAGE_preproc".into())
    );
    assert_eq!(completed(&s).completed_at_unix_ms, 4 * S);
}

#[test]
fn series_quiet_period_waits_for_the_listed_series_to_settle() {
    let e = engine(
        r#"
        [[rule]]
        name = "mrsi"
        action = "index"
        [rule.completion]
        series_quiet_period = "10s"
        series_received = '"MRSI"'
        "#,
    );
    let (s, _) = feed(&e, None, &[("1.1", "9.1", "MRSI", 0), ("1.2", "9.1", "MRSI", 4)]);
    assert_eq!(s.deadline_unix_ms, 14 * S);
    let (s, d) = e.on_due(s, 14 * S).unwrap();
    assert_eq!(
        (status(&s), d.unwrap().criterion),
        (pb::StudyStatus::Completed, pb::CompletionCriterion::SeriesReceived)
    );
}

#[test]
fn announced_counts_complete_the_study_on_its_last_instance() {
    let e = engine("[[rule]]\nname = \"counted\"\naction = \"index\"\n[rule.completion]\nexpected_counts = true\n");
    let mut s = None;
    for (i, series) in ["9.1", "9.1", "9.2"].iter().enumerate() {
        let mut x = ev(&format!("1.{i}"), series, "");
        x.attributes.insert("NumberOfStudyRelatedInstances".into(), "3".into());
        let (next, _, d) = e.apply_instance(s, &x, i as i64 * S, None);
        assert_eq!(d.is_some(), i == 2, "instance {i}");
        s = Some(next);
    }
    let s = s.unwrap();
    assert_eq!(reason(&s).2, "expected counts: 2 series, 3 instances");
    assert_eq!(reason(&s).1, pb::CompletionCriterion::ExpectedCounts);
}

fn forced(action: &str) -> Engine {
    engine(&format!(
        "[[rule]]\nname = \"r\"\naction = \"index\"\n[rule.completion]\nquiet_period = \"1m\"\nforce_after = \"2m\"\nforce_action = \"{action}\"\n"
    ))
}

/// Instances every 30 s keep the quiet period from firing; force_after ends it at 2 min.
fn busy_study(e: &Engine) -> pb::StudyState {
    let (s, _) = feed(
        e,
        None,
        &[("1.1", "9.1", "a", 0), ("1.2", "9.1", "a", 30), ("1.3", "9.1", "a", 60), ("1.4", "9.2", "b", 90)],
    );
    assert_eq!(s.deadline_unix_ms, 120 * S);
    s
}

#[test]
fn forced_completion_proceeds_with_the_rules_action() {
    let e = forced("proceed");
    let (s, _) = e.on_due(busy_study(&e), 120 * S).unwrap();
    assert_eq!(status(&s), pb::StudyStatus::Completed);
    assert_eq!(reason(&s), ("r".into(), pb::CompletionCriterion::Forced, "forced after 2m: proceed".into()));
}

#[test]
fn forced_discard_publishes_study_discarded_and_no_completion() {
    let e = forced("discard");
    let (s, d) = e.on_due(busy_study(&e), 120 * S).unwrap();
    assert_eq!((status(&s), d.unwrap().outcome), (pb::StudyStatus::Discarded, Outcome::Discarded));
    assert_eq!(outbox(&s), [("discarded:1.2.3:0".into(), pb::OutboxKind::StudyDiscarded)]);
    let ev = pb::StudyDiscarded::decode(s.outbox[0].payload.as_slice()).unwrap();
    assert_eq!(
        (ev.instance_count, ev.series_count, ev.reason.unwrap().detail.as_str()),
        (4, 2, "forced after 2m: discard")
    );
    assert!(s.last_completed.is_none());
}

#[test]
fn forced_hold_waits_for_an_operator_who_releases_it_into_the_pipeline() {
    let e = forced("hold");
    let (s, d) = e.on_due(busy_study(&e), 120 * S).unwrap();
    assert_eq!((status(&s), d.unwrap().outcome), (pb::StudyStatus::Held, Outcome::Held));
    assert_eq!(s.hold_cause, pb::HoldCause::Rule as i32);
    assert_eq!(outbox(&s), [("held:1.2.3:0:1".into(), pb::OutboxKind::StudyHeld)]);
    // Held: instances still count, nothing is evaluated, no deadline.
    let (s, d) = feed(&e, Some(s), &[("1.5", "9.2", "b", 500)]);
    assert_eq!((status(&s), d, s.generation_instances, s.deadline_unix_ms), (pb::StudyStatus::Held, None, 5, 0));
    let (s, d) = e.operate(Some(s), Command::Release, 600 * S).unwrap();
    assert_eq!((status(&s), d.unwrap().criterion), (pb::StudyStatus::Completed, pb::CompletionCriterion::Operator));
    assert_eq!(reason(&s).2, "released by operator");
    assert_eq!(completed(&s).generation_instance_count, 5);
}

#[test]
fn rule_actions_discard_and_hold_apply_when_the_study_is_complete() {
    let e = engine(
        r#"
        [[rule]]
        name = "phantom"
        priority = 10
        select = 'StudyDescription matches "(?i)phantom"'
        action = "discard"
        [[rule]]
        name = "review"
        select = 'CallingAETitle == "OLDSCANNER"'
        action = "hold"
        "#,
    );
    let mut x = ev("1.1", "9.1", "");
    x.attributes.insert("StudyDescription".into(), "QA^Phantom".into());
    x.calling_ae_title = "OLDSCANNER".into();
    let (s, _, _) = e.apply_instance(None, &x, 0, None);
    assert_eq!(s.rule, "phantom", "the higher priority wins");
    let (s, _) = e.on_due(s, 60 * S).unwrap();
    assert_eq!((status(&s), reason(&s).2.as_str()), (pb::StudyStatus::Discarded, "quiet 1m"));

    x.attributes.clear();
    let (s, _, _) = e.apply_instance(None, &x, 0, None);
    assert_eq!(s.rule, "review", "CallingAETitle comes from the event's own field");
    let (s, _) = e.on_due(s, 60 * S).unwrap();
    assert_eq!((status(&s), s.hold_cause), (pb::StudyStatus::Held, pb::HoldCause::Rule as i32));
}

#[test]
fn a_study_no_rule_selects_is_held_or_goes_to_the_fallback() {
    let rules = "[[rule]]\nname = \"mr\"\nselect = 'Modality == \"MR\"'\naction = \"index\"\n";
    let e = engine(rules);
    let mut ct = ev("1.1", "9.1", "");
    ct.modality = "CT".into();
    let (s, applied, d) = e.apply_instance(None, &ct, 0, None);
    assert_eq!((applied, status(&s), s.rule.as_str()), (Applied::NewStudy, pb::StudyStatus::Held, ""));
    assert_eq!(s.hold_cause, pb::HoldCause::NoRule as i32);
    assert_eq!(d.unwrap().criterion, pb::CompletionCriterion::NoRule);
    assert_eq!(outbox(&s), [("held:1.2.3:0:1".into(), pb::OutboxKind::StudyHeld)]);
    // Released by an operator: indexed, recorded as the operator's decision.
    let (s, _) = e.operate(Some(s), Command::Release, S).unwrap();
    assert_eq!(reason(&s), (String::new(), pb::CompletionCriterion::Operator, "released by operator".into()));

    let e = engine(&format!("[defaults]\nfallback = \"mr\"\n{rules}"));
    let (s, _, _) = e.apply_instance(None, &ct, 0, None);
    assert_eq!((status(&s), s.rule.as_str()), (pb::StudyStatus::Open, "mr"));
}

#[test]
fn late_instances_open_an_amendment_completed_by_the_same_rule() {
    let e = default_engine();
    let (s, _) = feed(&e, None, &[("1.1", "9.1", "T1w", 0), ("1.2", "9.1", "T1w", 1)]);
    let (s, _) = e.on_due(s, 61 * S).unwrap();
    // A resend of an archived instance is a duplicate; a new one opens generation 1.
    let (s, applied, _) = e.apply_instance(Some(s), &ev("1.1", "9.1", "T1w"), 100 * S, None);
    assert_eq!((applied, status(&s)), (Applied::Duplicate, pb::StudyStatus::Completed));
    let (s, applied, _) = e.apply_instance(Some(s), &ev("1.3", "9.2", "DWI"), 100 * S, None);
    assert_eq!(
        (applied, status(&s), s.generation, s.rule.as_str()),
        (Applied::Amendment, pb::StudyStatus::Open, 1, "default")
    );
    assert_eq!((s.deadline_unix_ms, s.outbox.len()), (160 * S, 1), "generation 0's event stays in the outbox");
    let (s, _) = e.on_due(s, 160 * S).unwrap();
    let c = completed(&s);
    assert_eq!((c.generation, c.instance_count, c.series_count), (1, 3, 2));
    assert_eq!((c.generation_instance_count, c.generation_series_count, c.first_instance_unix_ms), (1, 1, 100 * S));
    assert_eq!(
        outbox(&s).iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
        ["completed:1.2.3:0", "completed:1.2.3:1"]
    );
}

#[test]
fn late_instances_of_a_discarded_study_are_discarded_too() {
    let e = engine("[[rule]]\nname = \"junk\"\naction = \"discard\"\n[rule.completion]\nquiet_period = \"10s\"\n");
    let (s, _) = feed(&e, None, &[("1.1", "9.1", "", 0)]);
    let (s, _) = e.on_due(s, 10 * S).unwrap();
    let (s, _) = feed(&e, Some(s), &[("1.2", "9.1", "", 20)]);
    let (s, _) = e.on_due(s, 30 * S).unwrap();
    assert_eq!((status(&s), s.generation), (pb::StudyStatus::Discarded, 1));
    assert_eq!(
        outbox(&s).iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
        ["discarded:1.2.3:0", "discarded:1.2.3:1"]
    );
}

#[test]
fn operators_hold_release_discard_force_and_reindex() {
    let e = default_engine();
    let (open, _) = feed(&e, None, &[("1.1", "9.1", "T1w", 0)]);

    let (held, d) = e.operate(Some(open.clone()), Command::Hold, 10 * S).unwrap();
    assert_eq!(
        (status(&held), held.hold_cause, d.unwrap().outcome),
        (pb::StudyStatus::Held, pb::HoldCause::Operator as i32, Outcome::Held)
    );
    assert!(e.on_due(held.clone(), 999 * S).is_none(), "a held study is not evaluated");
    let (again, d) = e.operate(Some(held.clone()), Command::Hold, 11 * S).unwrap();
    assert_eq!((again, d), (held.clone(), None), "holding a held study changes nothing");
    // Released before its quiet period ended: open again, same deadline.
    let (s, d) = e.operate(Some(held.clone()), Command::Release, 20 * S).unwrap();
    assert_eq!((status(&s), s.deadline_unix_ms, d), (pb::StudyStatus::Open, 60 * S, None));
    // Released after it: the rule completes it at once.
    let (s, _) = e.operate(Some(held), Command::Release, 90 * S).unwrap();
    assert_eq!((status(&s), reason(&s).2.as_str()), (pb::StudyStatus::Completed, "quiet 1m"));

    let (s, _) = e.operate(Some(open.clone()), Command::ForceComplete, 5 * S).unwrap();
    assert_eq!(reason(&s), ("default".into(), pb::CompletionCriterion::Operator, "operator".into()));
    let refused = e.operate(Some(s.clone()), Command::ForceComplete, 6 * S).unwrap_err();
    assert_eq!(refused.to_string(), "cannot force-complete a study that is completed (use reindex)");
    let (s, d) = e.operate(Some(s), Command::Reindex, 7 * S).unwrap();
    let (s, _) = e.operate(Some(s), Command::Reindex, 8 * S).unwrap();
    assert_eq!(d, None);
    let ids: Vec<String> = outbox(&s).into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, ["completed:1.2.3:0", "completed:1.2.3:0:reindex:1", "completed:1.2.3:0:reindex:2"]);
    // The same event again, marked as the n-th re-index.
    let events: Vec<pb::StudyCompleted> =
        s.outbox.iter().map(|e| prost::Message::decode(e.payload.as_slice()).unwrap()).collect();
    assert_eq!(events.iter().map(|c| c.reindex).collect::<Vec<_>>(), [0, 1, 2]);
    assert!(events.iter().all(|c| pb::StudyCompleted { reindex: 0, ..c.clone() } == events[0]), "the same event again");

    let (s, _) = e.operate(Some(open.clone()), Command::Discard, 5 * S).unwrap();
    assert_eq!((status(&s), reason(&s).2.as_str()), (pb::StudyStatus::Discarded, "discarded by operator"));
    assert!(matches!(e.operate(Some(s), Command::Release, 6 * S), Err(Refused::Status { status: "discarded", .. })));
    assert!(matches!(e.operate(Some(open.clone()), Command::Reindex, 6 * S), Err(Refused::Status { .. })));
    assert!(matches!(e.operate(Some(open), Command::Release, 6 * S), Err(Refused::Status { status: "open", .. })));
    assert_eq!(e.operate(None, Command::Hold, 0), Err(Refused::NotFound));
}

#[test]
fn a_rule_gone_from_the_rules_file_is_selected_again_from_the_kept_attributes() {
    let old = engine("[[rule]]\nname = \"old\"\naction = \"index\"\n");
    let mut x = ev("1.1", "9.1", "");
    x.attributes.insert("StudyDescription".into(), "Brain^MRSI".into());
    let (s, _, _) = old.apply_instance(None, &x, 0, None);
    assert_eq!(s.attributes.get("StudyDescription").map(String::as_str), Some("Brain^MRSI"));
    let new = engine(
        "[[rule]]\nname = \"mrsi\"\nselect = 'StudyDescription contains \"MRSI\"'\naction = \"discard\"\n\
         [[rule]]\nname = \"other\"\naction = \"index\"\n",
    );
    let (s, _) = new.on_due(s, 60 * S).unwrap();
    assert_eq!((s.rule.as_str(), status(&s)), ("mrsi", pb::StudyStatus::Discarded));
}
