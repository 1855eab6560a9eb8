//! Tables for people and JSON for scripts.

use std::fmt::Write as _;

use bidsflux_proto::v1 as pb;
use serde_json::{Value, json};

fn status(s: i32) -> &'static str {
    match pb::StudyStatus::try_from(s) {
        Ok(pb::StudyStatus::Open) => "open",
        Ok(pb::StudyStatus::Held) => "held",
        Ok(pb::StudyStatus::Completed) => "completed",
        Ok(pb::StudyStatus::Discarded) => "discarded",
        _ => "unspecified",
    }
}

fn hold_cause(c: i32) -> &'static str {
    match pb::HoldCause::try_from(c) {
        Ok(pb::HoldCause::NoRule) => "no rule",
        Ok(pb::HoldCause::Rule) => "rule",
        Ok(pb::HoldCause::Operator) => "operator",
        _ => "",
    }
}

fn criterion(c: i32) -> &'static str {
    match pb::CompletionCriterion::try_from(c) {
        Ok(pb::CompletionCriterion::QuietPeriod) => "quiet_period",
        Ok(pb::CompletionCriterion::SeriesReceived) => "series_received",
        Ok(pb::CompletionCriterion::ExpectedCounts) => "expected_counts",
        Ok(pb::CompletionCriterion::Forced) => "forced",
        Ok(pb::CompletionCriterion::Operator) => "operator",
        Ok(pb::CompletionCriterion::NoRule) => "no_rule",
        _ => "",
    }
}

/// `YYYY-MM-DD HH:MM:SS` UTC, or `-` for 0.
pub fn time(unix_ms: i64) -> String {
    if unix_ms <= 0 {
        return "-".to_owned();
    }
    let secs = unix_ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

fn reason_text(r: Option<&pb::CompletionReason>) -> String {
    r.map(|r| r.detail.clone()).unwrap_or_default()
}

/// Renders rows as left-aligned columns separated by two spaces.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        let cells: Vec<String> = cells.zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    };
    line(&mut out, &mut header.iter().copied());
    for row in rows {
        line(&mut out, &mut row.iter().map(String::as_str));
    }
    out
}

/// The `studies` table.
pub fn list_table(list: &pb::ListStudiesResponse) -> String {
    let rows: Vec<Vec<String>> = list
        .studies
        .iter()
        .map(|s| {
            let state = match hold_cause(s.hold_cause) {
                "" => status(s.status).to_owned(),
                cause if s.status == pb::StudyStatus::Held as i32 => format!("held ({cause})"),
                _ => status(s.status).to_owned(),
            };
            vec![
                s.study_instance_uid.clone(),
                state,
                s.generation.to_string(),
                if s.rule.is_empty() { "-".to_owned() } else { s.rule.clone() },
                s.instance_count.to_string(),
                s.series_count.to_string(),
                time(s.last_instance_unix_ms),
                reason_text(s.last_reason.as_ref()),
            ]
        })
        .collect();
    let mut out = table(&["STUDY", "STATUS", "GEN", "RULE", "INSTANCES", "SERIES", "LAST INSTANCE", "REASON"], &rows);
    if list.truncated {
        out.push_str("(more studies than shown: use --limit)\n");
    }
    out
}

/// One study, as `key: value` lines and its series table.
pub fn detail_table(d: &pb::StudyDetail) -> String {
    let s = d.summary.clone().unwrap_or_default();
    let mut out = String::new();
    let mut kv = |k: &str, v: String| {
        let _ = writeln!(out, "{k:<20}{v}");
    };
    kv("study", s.study_instance_uid.clone());
    let cause = hold_cause(s.hold_cause);
    kv(
        "status",
        if s.status == pb::StudyStatus::Held as i32 && !cause.is_empty() {
            format!("held ({cause})")
        } else {
            status(s.status).to_owned()
        },
    );
    kv("rule", if s.rule.is_empty() { "- (no rule selected it)".to_owned() } else { s.rule.clone() });
    kv("generation", s.generation.to_string());
    kv("instances", format!("{} ({} in this generation)", s.instance_count, s.generation_instance_count));
    kv("series", format!("{} ({} in this generation)", s.series_count, s.generation_series_count));
    if d.expected_series > 0 || d.expected_instances > 0 {
        kv("announced", format!("{} series, {} instances", d.expected_series, d.expected_instances));
    }
    kv("created", time(s.created_at_unix_ms));
    kv("first instance", time(s.first_instance_unix_ms));
    kv("last instance", time(s.last_instance_unix_ms));
    if s.deadline_unix_ms > 0 {
        kv("next check", time(s.deadline_unix_ms));
    }
    kv("completed", time(s.completed_at_unix_ms));
    if let Some(r) = &s.last_reason {
        kv(
            "reason",
            format!(
                "{} ({}, rule {})",
                r.detail,
                criterion(r.criterion),
                if r.rule.is_empty() { "-" } else { &r.rule }
            ),
        );
    }
    if d.reindex_count > 0 {
        kv("re-indexed", format!("{} time(s)", d.reindex_count));
    }
    if s.unpublished_events > 0 {
        kv("unpublished events", s.unpublished_events.to_string());
    }
    let rows: Vec<Vec<String>> = d
        .series
        .iter()
        .map(|x| {
            vec![
                x.series_instance_uid.clone(),
                x.series_number.clone(),
                x.modality.clone(),
                x.description.clone(),
                if x.expected_instances > 0 {
                    format!("{}/{}", x.instances, x.expected_instances)
                } else {
                    x.instances.to_string()
                },
                time(x.last_instance_unix_ms),
            ]
        })
        .collect();
    out.push('\n');
    out.push_str(&table(&["SERIES", "NUMBER", "MODALITY", "DESCRIPTION", "INSTANCES", "LAST INSTANCE"], &rows));
    if !d.attributes.is_empty() {
        out.push_str("\nattributes (may contain patient values):\n");
        let mut attrs: Vec<_> = d.attributes.iter().collect();
        attrs.sort();
        for (k, v) in attrs {
            let _ = writeln!(out, "  {k:<30}{v}");
        }
    }
    out
}

fn reason_json(r: Option<&pb::CompletionReason>) -> Value {
    match r {
        Some(r) => json!({"rule": r.rule, "criterion": criterion(r.criterion), "detail": r.detail}),
        None => Value::Null,
    }
}

fn summary_json(s: &pb::StudySummary) -> Value {
    json!({
        "study_instance_uid": s.study_instance_uid,
        "status": status(s.status),
        "hold_cause": hold_cause(s.hold_cause),
        "generation": s.generation,
        "rule": s.rule,
        "instance_count": s.instance_count,
        "series_count": s.series_count,
        "generation_instance_count": s.generation_instance_count,
        "generation_series_count": s.generation_series_count,
        "created_at_unix_ms": s.created_at_unix_ms,
        "first_instance_unix_ms": s.first_instance_unix_ms,
        "last_instance_unix_ms": s.last_instance_unix_ms,
        "deadline_unix_ms": s.deadline_unix_ms,
        "completed_at_unix_ms": s.completed_at_unix_ms,
        "status_changed_at_unix_ms": s.status_changed_at_unix_ms,
        "last_reason": reason_json(s.last_reason.as_ref()),
        "unpublished_events": s.unpublished_events,
    })
}

/// The `studies` list as JSON.
pub fn list_json(list: &pb::ListStudiesResponse) -> String {
    let v = json!({"studies": list.studies.iter().map(summary_json).collect::<Vec<_>>(), "truncated": list.truncated});
    format!("{v:#}\n")
}

/// One study as JSON.
pub fn detail_json(d: &pb::StudyDetail) -> String {
    let mut v = d.summary.as_ref().map(summary_json).unwrap_or_else(|| json!({}));
    let series: Vec<Value> = d
        .series
        .iter()
        .map(|x| {
            json!({
                "series_instance_uid": x.series_instance_uid,
                "description": x.description,
                "modality": x.modality,
                "series_number": x.series_number,
                "instances": x.instances,
                "expected_instances": x.expected_instances,
                "first_instance_unix_ms": x.first_instance_unix_ms,
                "last_instance_unix_ms": x.last_instance_unix_ms,
            })
        })
        .collect();
    if let Value::Object(m) = &mut v {
        m.insert("series".into(), Value::Array(series));
        m.insert("expected_series".into(), json!(d.expected_series));
        m.insert("expected_instances".into(), json!(d.expected_instances));
        m.insert("reindex_count".into(), json!(d.reindex_count));
        if let Some(c) = &d.last_completed {
            m.insert(
                "last_completed".into(),
                json!({"generation": c.generation, "completed_at_unix_ms": c.completed_at_unix_ms,
                       "instance_count": c.instance_count, "series_count": c.series_count,
                       "reason": reason_json(c.reason.as_ref())}),
            );
        }
        if !d.attributes.is_empty() {
            m.insert("attributes".into(), json!(d.attributes));
        }
    }
    format!("{v:#}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn study() -> pb::StudyDetail {
        pb::StudyDetail {
            summary: Some(pb::StudySummary {
                study_instance_uid: "1.2.3".into(),
                status: pb::StudyStatus::Held as i32,
                hold_cause: pb::HoldCause::Rule as i32,
                rule: "mrsi".into(),
                instance_count: 12,
                series_count: 2,
                last_instance_unix_ms: 1_700_000_000_000,
                last_reason: Some(pb::CompletionReason {
                    rule: "mrsi".into(),
                    criterion: pb::CompletionCriterion::Forced as i32,
                    detail: "forced after 2h: hold".into(),
                }),
                ..Default::default()
            }),
            series: vec![pb::SeriesSummary {
                series_instance_uid: "1.2.3.1".into(),
                description: "MRSI".into(),
                instances: 4,
                expected_instances: 5,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn times_are_utc() {
        assert_eq!(time(0), "-");
        assert_eq!(time(1_700_000_000_000), "2023-11-14 22:13:20");
        assert_eq!(time(951_782_400_000), "2000-02-29 00:00:00");
    }

    #[test]
    fn tables_line_up_and_say_why() {
        let d = study();
        let list = pb::ListStudiesResponse { studies: vec![d.summary.clone().unwrap()], truncated: true };
        let t = list_table(&list);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("STUDY  STATUS       GEN  RULE"), "{t}");
        assert!(lines[1].starts_with("1.2.3  held (rule)  0    mrsi  12"), "{t}");
        assert!(lines[1].ends_with("2023-11-14 22:13:20  forced after 2h: hold"), "{t}");
        assert!(t.contains("--limit"));
        let t = detail_table(&d);
        assert!(t.contains("status              held (rule)"), "{t}");
        assert!(t.contains("reason              forced after 2h: hold (forced, rule mrsi)"), "{t}");
        assert!(t.contains("MRSI         4/5"), "{t}");
        assert!(!t.contains("attributes"), "{t}");
    }

    #[test]
    fn json_has_names_not_numbers() {
        let v: Value = serde_json::from_str(&detail_json(&study())).unwrap();
        assert_eq!(v["status"], "held");
        assert_eq!(v["hold_cause"], "rule");
        assert_eq!(v["last_reason"]["criterion"], "forced");
        assert_eq!(v["series"][0]["expected_instances"], 5);
        assert!(v.get("attributes").is_none());
        let list = pb::ListStudiesResponse { studies: vec![study().summary.unwrap()], truncated: false };
        let v: Value = serde_json::from_str(&list_json(&list)).unwrap();
        assert_eq!(v["studies"][0]["study_instance_uid"], "1.2.3");
    }
}
