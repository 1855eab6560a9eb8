//! The rules file: TOML deserialised with serde (unknown fields rejected),
//! then validated into a [`RuleSet`] whose errors name the rule and the field.
//!
//! The schema is documented in `docs/completion-rules.md`; an example is
//! `services/study-completion/rules.example.toml`.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use super::announced;
use super::expr::{Expr, SeriesExpr};

/// Quiet period when neither the rule nor `[defaults]` sets one.
pub const DEFAULT_QUIET_PERIOD: Duration = Duration::from_secs(60);

/// The word `fallback` uses for "hold studies that match no rule"; no rule may be named so.
const HOLD: &str = "hold";

/// A rules file that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RulesError {
    /// Not TOML, or not the schema (unknown field, wrong type); the message
    /// from the TOML parser names the line and column.
    #[error("rules file: {0}")]
    Syntax(String),
    /// The file parsed but does not make sense; every problem found is listed.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

/// One validation problem, e.g. `rule "mrsi": field "select": expected a string after …`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `rule "mrsi"`, `rule #3` (a rule without a usable name, numbered from 1 in file order),
    /// `[defaults]` or `rules file`.
    pub location: String,
    /// The field as written in the file, e.g. `select`, `completion.force_after`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: field \"{}\": {}", self.location, self.field, self.message)
    }
}

/// What to do with a study once its rule says it is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Hand it to the pipeline (*study completed*).
    Index,
    /// Delete it from the spool, recording that it was discarded.
    Discard,
    /// Keep it until an operator releases, discards or force-completes it.
    Hold,
}

impl Action {
    /// The word used in the rules file.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Index => "index",
            Action::Discard => "discard",
            Action::Hold => "hold",
        }
    }

    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "index" => Ok(Action::Index),
            "discard" => Ok(Action::Discard),
            "hold" => Ok(Action::Hold),
            other => Err(format!("unknown action {other:?} (one of \"index\", \"discard\", \"hold\")")),
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What `force_after` does to a study that is still open at its maximum age.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForceAction {
    /// Complete it and apply the rule's [`Action`].
    Proceed,
    /// Discard it (recorded), whatever the rule's action.
    Discard,
    /// Hold it for an operator, whatever the rule's action.
    Hold,
}

impl ForceAction {
    /// The word used in the rules file.
    pub fn as_str(self) -> &'static str {
        match self {
            ForceAction::Proceed => "proceed",
            ForceAction::Discard => "discard",
            ForceAction::Hold => "hold",
        }
    }

    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "proceed" => Ok(ForceAction::Proceed),
            "discard" => Ok(ForceAction::Discard),
            "hold" => Ok(ForceAction::Hold),
            other => Err(format!("unknown force action {other:?} (one of \"proceed\", \"discard\", \"hold\")")),
        }
    }
}

impl fmt::Display for ForceAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Forced completion at a maximum age (counted from the study's first instance).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Force {
    /// Maximum age.
    pub after: Duration,
    /// What happens then.
    pub action: ForceAction,
}

/// When a rule's study is complete: the first criterion that fires wins
/// (see [`Completion::evaluate`] for the exact semantics).
#[derive(Debug, Clone)]
pub struct Completion {
    /// Complete once no instance arrived for this long; `None` when the rule turned it `"off"`.
    pub quiet_period: Option<Duration>,
    /// A series counts as received for `series_received` once no instance of it arrived for this long.
    pub series_quiet_period: Option<Duration>,
    /// Complete once these series descriptions have been received.
    pub series_received: Option<SeriesExpr>,
    /// Use the instance counts announced by the instances' own tags.
    pub expected_counts: bool,
    /// Maximum age and what to do then.
    pub force: Option<Force>,
}

/// One validated rule.
#[derive(Debug, Clone)]
pub struct Rule {
    name: String,
    priority: i64,
    select: Expr,
    action: Action,
    completion: Completion,
}

impl Rule {
    /// The rule's name, unique in its file (recorded in the completion reason).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Higher priorities are tried first; equal priorities in file order.
    pub fn priority(&self) -> i64 {
        self.priority
    }

    /// Which studies the rule takes ([`Expr::always`] when the file has no `select`).
    pub fn select(&self) -> &Expr {
        &self.select
    }

    /// What happens to a complete study.
    pub fn action(&self) -> Action {
        self.action
    }

    /// When a study is complete.
    pub fn completion(&self) -> &Completion {
        &self.completion
    }
}

/// Which rule a study falls under.
#[derive(Debug, Clone, Copy)]
pub enum Selected<'a> {
    /// The first rule (by priority, then file order) whose `select` is true.
    Matched(&'a Rule),
    /// No `select` was true; `[defaults] fallback` names this rule.
    Fallback(&'a Rule),
    /// No `select` was true and the fallback is `"hold"`: keep the study for
    /// an operator. Never dropped.
    Hold,
}

impl<'a> Selected<'a> {
    /// The rule, unless the study is held for want of one.
    pub fn rule(&self) -> Option<&'a Rule> {
        match *self {
            Selected::Matched(r) | Selected::Fallback(r) => Some(r),
            Selected::Hold => None,
        }
    }
}

/// A validated rules file.
#[derive(Debug, Clone)]
pub struct RuleSet {
    /// Sorted by priority (highest first), then file order.
    rules: Vec<Rule>,
    /// Index into `rules`, or `None` for "hold".
    fallback: Option<usize>,
}

impl RuleSet {
    /// Parses and validates a rules file.
    pub fn parse(text: &str) -> Result<Self, RulesError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| RulesError::Syntax(e.to_string().trim_end().to_owned()))?;
        validate(raw)
    }

    /// The rule set equivalent to running without a rules file: one rule,
    /// `default`, that takes every study, completes it after `quiet_period`
    /// without instances, and indexes it.
    pub fn default_from_quiet_period(quiet_period: Duration) -> Self {
        Self::builtin("default", quiet_period)
    }

    /// [`RuleSet::default_from_quiet_period`] with another rule name (check it with
    /// [`validate_rule_name`]).
    pub fn builtin(name: &str, quiet_period: Duration) -> Self {
        let rule = Rule {
            name: name.to_owned(),
            priority: 0,
            select: Expr::always(),
            action: Action::Index,
            completion: Completion {
                quiet_period: Some(quiet_period),
                series_quiet_period: None,
                series_received: None,
                expected_counts: false,
                force: None,
            },
        };
        Self { rules: vec![rule], fallback: None }
    }

    /// Picks the rule for a study: the first rule, by priority then file
    /// order, whose `select` is true for `lookup` (attribute value by keyword),
    /// else the fallback; [`Selected::Hold`] when there is none.
    pub fn select<'a>(&self, lookup: impl Fn(&str) -> Option<&'a str>) -> Selected<'_> {
        if let Some(rule) = self.rules.iter().find(|r| r.select.eval(&lookup)) {
            return Selected::Matched(rule);
        }
        match self.fallback.and_then(|i| self.rules.get(i)) {
            Some(rule) => Selected::Fallback(rule),
            None => Selected::Hold,
        }
    }

    /// The rules, highest priority first (ties in file order).
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// A rule by name.
    pub fn rule(&self, name: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.name == name)
    }

    /// The fallback rule, `None` when unmatched studies are held.
    pub fn fallback(&self) -> Option<&Rule> {
        self.fallback.and_then(|i| self.rules.get(i))
    }

    /// Every attribute keyword used by a `select`: what the receiver must
    /// extract from an instance for [`RuleSet::select`].
    pub fn attribute_keywords(&self) -> BTreeSet<&str> {
        self.rules.iter().flat_map(|r| r.select.keywords()).collect()
    }

    /// The keywords the completion criteria read from every instance:
    /// `SeriesDescription` when a rule uses `series_received`, and the count
    /// tags ([`announced::COUNT_KEYWORDS`]) when a rule uses `expected_counts`.
    pub fn completion_keywords(&self) -> BTreeSet<&'static str> {
        let mut out = BTreeSet::new();
        for r in &self.rules {
            if r.completion.series_received.is_some() {
                out.insert("SeriesDescription");
            }
            if r.completion.expected_counts {
                out.extend(announced::COUNT_KEYWORDS);
            }
        }
        out
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default)]
    rule: Vec<RawRule>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    quiet_period: Option<String>,
    fallback: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Option<String>,
    priority: Option<i64>,
    select: Option<String>,
    action: Option<String>,
    #[serde(default)]
    completion: RawCompletion,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCompletion {
    quiet_period: Option<String>,
    series_quiet_period: Option<String>,
    series_received: Option<String>,
    expected_counts: Option<bool>,
    force_after: Option<String>,
    force_action: Option<String>,
}

/// Collects problems while validating.
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, location: &str, field: &str, message: impl Into<String>) {
        self.0.push(Problem { location: location.to_owned(), field: field.to_owned(), message: message.into() });
    }

    /// `Some(value)` when `r` is `Ok`, else records the problem.
    fn check<T>(&mut self, location: &str, field: &str, r: Result<T, String>) -> Option<T> {
        r.map_err(|m| self.add(location, field, m)).ok()
    }
}

/// A positive duration (`60s`, `500ms`, `2m`, `1h`).
fn duration(text: &str) -> Result<Duration, String> {
    let d = bidsflux_config::parse_duration(text)?;
    if d.is_zero() {
        return Err(format!("{text:?}: must be greater than zero"));
    }
    Ok(d)
}

/// Whether `name` can name a rule: at most 64 letters, digits, `_`, `-` or `.`, and not `hold`.
pub fn validate_rule_name(name: &str) -> Result<(), String> {
    valid_name(name)
}

fn valid_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')) {
        return Err(format!("{name:?}: use at most 64 letters, digits, `_`, `-` or `.`"));
    }
    if name == HOLD {
        return Err(format!("{HOLD:?} is reserved (`fallback = \"hold\"` means: hold unmatched studies)"));
    }
    Ok(())
}

fn validate(raw: RawFile) -> Result<RuleSet, RulesError> {
    let mut p = Problems(Vec::new());
    let defaults_quiet = match &raw.defaults.quiet_period {
        Some(t) => p.check("[defaults]", "quiet_period", duration(t)).unwrap_or(DEFAULT_QUIET_PERIOD),
        None => DEFAULT_QUIET_PERIOD,
    };
    if raw.rule.is_empty() {
        p.add("rules file", "rule", "no [[rule]] is defined (every study would be held)");
    }

    let mut first_with_name: HashMap<String, usize> = HashMap::new();
    let mut rules = Vec::new();
    for (i, r) in raw.rule.into_iter().enumerate() {
        let number = i + 1;
        let name = r.name.clone().unwrap_or_default();
        let location = match (&r.name, valid_name(&name)) {
            (Some(_), Ok(())) => format!("rule {name:?}"),
            _ => format!("rule #{number}"),
        };
        match (&r.name, valid_name(&name)) {
            (None, _) => p.add(&location, "name", "missing"),
            (Some(_), Err(m)) => p.add(&location, "name", m),
            (Some(_), Ok(())) => {
                if let Some(first) = first_with_name.get(&name) {
                    p.add(&location, "name", format!("duplicate: rule #{first} has the same name"));
                } else {
                    first_with_name.insert(name.clone(), number);
                }
            }
        }
        if let Some(rule) = validate_rule(&mut p, &location, name, r, defaults_quiet) {
            rules.push(rule);
        }
    }

    let fallback_name = raw.defaults.fallback.as_deref().unwrap_or(HOLD);
    // Stable: equal priorities keep file order.
    rules.sort_by_key(|r| std::cmp::Reverse(r.priority));
    let fallback = if fallback_name == HOLD {
        None
    } else if let Some(i) = rules.iter().position(|r| r.name == fallback_name) {
        Some(i)
    } else {
        if !first_with_name.contains_key(fallback_name) {
            let names: Vec<String> =
                first_with_name.keys().map(|n| format!("{n:?}")).collect::<BTreeSet<_>>().into_iter().collect();
            p.add(
                "[defaults]",
                "fallback",
                format!("no rule is named {fallback_name:?} (use \"hold\" or one of: {})", names.join(", ")),
            );
        }
        None
    };

    if !p.0.is_empty() {
        return Err(RulesError::Invalid(p.0));
    }
    Ok(RuleSet { rules, fallback })
}

/// Validates one rule, recording problems; `None` if any field was invalid.
fn validate_rule(p: &mut Problems, loc: &str, name: String, r: RawRule, defaults_quiet: Duration) -> Option<Rule> {
    let before = p.0.len();
    let select = match &r.select {
        Some(s) => p.check(loc, "select", Expr::parse(s).map_err(|e| e.to_string())),
        None => Some(Expr::always()),
    };
    let action = match &r.action {
        Some(a) => p.check(loc, "action", Action::parse(a)),
        None => {
            p.add(loc, "action", "missing (one of \"index\", \"discard\", \"hold\")");
            None
        }
    };

    let c = r.completion;
    let quiet_period = match c.quiet_period.as_deref() {
        None => Some(defaults_quiet),
        Some("off") => None,
        Some(t) => p.check(loc, "completion.quiet_period", duration(t).map_err(|m| format!("{m} (or \"off\")"))),
    };
    let series_received = c
        .series_received
        .as_deref()
        .and_then(|s| p.check(loc, "completion.series_received", SeriesExpr::parse(s).map_err(|e| e.to_string())));
    let series_quiet_period =
        c.series_quiet_period.as_deref().and_then(|t| p.check(loc, "completion.series_quiet_period", duration(t)));
    if c.series_quiet_period.is_some() && c.series_received.is_none() {
        p.add(loc, "completion.series_quiet_period", "has no effect without completion.series_received");
    }
    let force_after = c.force_after.as_deref().and_then(|t| p.check(loc, "completion.force_after", duration(t)));
    let force_action = match c.force_action.as_deref() {
        Some(a) if c.force_after.is_none() => {
            // Still report an unknown word, not only the missing force_after.
            let _ = p.check(loc, "completion.force_action", ForceAction::parse(a));
            p.add(loc, "completion.force_action", "needs completion.force_after");
            None
        }
        Some(a) => p.check(loc, "completion.force_action", ForceAction::parse(a)),
        None => Some(ForceAction::Proceed),
    };
    if c.quiet_period.as_deref() == Some("off") && c.force_after.is_none() {
        p.add(
            loc,
            "completion.quiet_period",
            "is \"off\", so completion.force_after is required (a study whose series never arrive would wait \
             forever; use force_action = \"hold\" to hand it to an operator)",
        );
    }

    if p.0.len() != before {
        return None;
    }
    let force = match (force_after, force_action) {
        (Some(after), Some(action)) => Some(Force { after, action }),
        _ => None,
    };
    Some(Rule {
        name,
        priority: r.priority.unwrap_or(0),
        select: select?,
        action: action?,
        completion: Completion {
            quiet_period,
            series_quiet_period,
            series_received,
            expected_counts: c.expected_counts.unwrap_or(false),
            force,
        },
    })
}

/// Formats a duration the way the rules file writes it: `2h`, `90s`, `500ms`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        "0s".to_owned()
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../rules.example.toml");

    fn problems(text: &str) -> String {
        match RuleSet::parse(text) {
            Ok(_) => panic!("expected an error for:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    fn assert_problem(text: &str, want: &str) {
        let got = problems(text);
        assert!(got.lines().any(|l| l == want), "want the line\n  {want}\ngot\n{got}");
    }

    fn selected_name(set: &RuleSet, pairs: &[(&str, &str)]) -> String {
        let found = |k: &str| pairs.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
        match set.select(found) {
            Selected::Matched(r) => r.name().to_owned(),
            Selected::Fallback(r) => format!("fallback:{}", r.name()),
            Selected::Hold => "hold".to_owned(),
        }
    }

    #[test]
    fn the_example_file_is_valid() {
        let set = RuleSet::parse(EXAMPLE).unwrap();
        assert_eq!(
            set.attribute_keywords().into_iter().collect::<Vec<_>>(),
            ["CallingAETitle", "Modality", "StationName", "StudyDescription"]
        );
        assert_eq!(selected_name(&set, &[("StudyDescription", "Weekly QA ")]), "phantom");
        assert_eq!(selected_name(&set, &[("StudyDescription", "PHANTOM")]), "phantom");
        assert_eq!(selected_name(&set, &[("StudyDescription", "AQUA"), ("Modality", "MR")]), "hold");
        assert_eq!(selected_name(&set, &[("StudyDescription", "MRSI visit 2"), ("Modality", "MR")]), "mrsi");
        assert_eq!(selected_name(&set, &[("Modality", "CT"), ("StationName", "PRISMA_A")]), "research-mr");
        assert_eq!(selected_name(&set, &[("Modality", "MR"), ("CallingAETitle", "SCANNER1")]), "research-mr");
        assert_eq!(selected_name(&set, &[("Modality", "US"), ("CallingAETitle", "SCANNER1")]), "hold");
    }

    #[test]
    fn a_full_rule_is_read_into_types() {
        let set = RuleSet::parse(
            r#"
            [defaults]
            quiet_period = "90s"
            fallback = "hold"

            [[rule]]
            name = "mrsi"
            priority = 10
            select = 'Modality == "MR" and not (StudyDescription contains "phantom")'
            action = "index"
            [rule.completion]
            quiet_period = "2m"
            series_quiet_period = "30s"
            series_received = '"MRSI" and "STAGE_preproc"'
            expected_counts = true
            force_after = "2h"
            force_action = "hold"

            [[rule]]
            name = "rest"
            action = "discard"
            "#,
        )
        .unwrap();
        let mrsi = set.rule("mrsi").unwrap();
        assert_eq!(mrsi.priority(), 10);
        assert_eq!(mrsi.action(), Action::Index);
        let c = mrsi.completion();
        assert_eq!(c.quiet_period, Some(Duration::from_secs(120)));
        assert_eq!(c.series_quiet_period, Some(Duration::from_secs(30)));
        assert_eq!(c.series_received.as_ref().unwrap().source(), r#""MRSI" and "STAGE_preproc""#);
        assert!(c.expected_counts);
        assert_eq!(c.force, Some(Force { after: Duration::from_secs(7200), action: ForceAction::Hold }));

        let rest = set.rule("rest").unwrap();
        assert_eq!(rest.select().source(), "true");
        assert_eq!(rest.action(), Action::Discard);
        assert_eq!(rest.completion().quiet_period, Some(Duration::from_secs(90)), "from [defaults]");
        assert!(rest.completion().force.is_none());
        assert!(set.fallback().is_none());
        assert_eq!(set.attribute_keywords().into_iter().collect::<Vec<_>>(), ["Modality", "StudyDescription"]);
        assert_eq!(
            set.completion_keywords().into_iter().collect::<Vec<_>>(),
            [
                "NumberOfSeriesRelatedInstances",
                "NumberOfStudyRelatedInstances",
                "NumberOfStudyRelatedSeries",
                "SeriesDescription"
            ]
        );
    }

    #[test]
    fn defaults_apply_when_the_file_says_nothing() {
        let set = RuleSet::parse("[[rule]]\nname = \"a\"\naction = \"index\"\n").unwrap();
        let c = set.rule("a").unwrap().completion();
        assert_eq!(c.quiet_period, Some(DEFAULT_QUIET_PERIOD));
        assert!(c.series_received.is_none() && !c.expected_counts && c.force.is_none());
        let set =
            RuleSet::parse("[[rule]]\nname = \"a\"\naction = \"index\"\n[rule.completion]\nforce_after = \"1h\"\n")
                .unwrap();
        assert_eq!(set.rules()[0].completion().force.unwrap().action, ForceAction::Proceed);
    }

    #[test]
    fn priority_then_file_order_then_fallback() {
        let set = RuleSet::parse(
            r#"
            [defaults]
            fallback = "catch-all"
            [[rule]]
            name = "low"
            priority = 1
            select = 'Modality == "MR"'
            action = "index"
            [[rule]]
            name = "catch-all"
            priority = -5
            select = 'StationName == "never"'
            action = "hold"
            [[rule]]
            name = "high"
            priority = 10
            select = 'Modality == "MR" and StudyDescription contains "MRSI"'
            action = "index"
            [[rule]]
            name = "low-too"
            priority = 1
            select = 'Modality in ["MR", "CT"]'
            action = "index"
            "#,
        )
        .unwrap();
        let order: Vec<&str> = set.rules().iter().map(Rule::name).collect();
        assert_eq!(order, ["high", "low", "low-too", "catch-all"]);
        assert_eq!(selected_name(&set, &[("Modality", "MR"), ("StudyDescription", "MRSI study")]), "high");
        assert_eq!(selected_name(&set, &[("Modality", "MR")]), "low", "tie broken by file order");
        assert_eq!(selected_name(&set, &[("Modality", "CT")]), "low-too");
        assert_eq!(selected_name(&set, &[("Modality", "US")]), "fallback:catch-all");
        assert_eq!(selected_name(&set, &[]), "fallback:catch-all");
        assert_eq!(set.fallback().unwrap().name(), "catch-all");
    }

    #[test]
    fn unmatched_studies_are_held_by_default() {
        let set =
            RuleSet::parse("[[rule]]\nname = \"mr\"\nselect = 'Modality == \"MR\"'\naction = \"index\"\n").unwrap();
        assert_eq!(selected_name(&set, &[("Modality", "MR")]), "mr");
        assert_eq!(selected_name(&set, &[("Modality", "CT")]), "hold");
        assert!(set.select(|_| None).rule().is_none());
    }

    #[test]
    fn default_rule_set_takes_everything() {
        let set = RuleSet::default_from_quiet_period(Duration::from_secs(45));
        let Selected::Matched(rule) = set.select(|_| None) else { panic!("the default rule takes every study") };
        assert_eq!(rule.name(), "default");
        assert_eq!(rule.action(), Action::Index);
        assert_eq!(rule.completion().quiet_period, Some(Duration::from_secs(45)));
        assert!(set.attribute_keywords().is_empty());
        assert!(set.completion_keywords().is_empty());
    }

    #[test]
    fn errors_name_the_rule_and_the_field() {
        let rule = |body: &str| format!("[[rule]]\nname = \"mrsi\"\naction = \"index\"\n{body}\n");
        assert_problem(
            &rule("select = 'Modality == \"MR\" and StudyDescription contains'"),
            "rule \"mrsi\": field \"select\": expected a string after `contains`, found end of expression at column 47",
        );
        assert_problem(
            &rule("[rule.completion]\nseries_received = '\"MRSI\" and SeriesDescription == \"x\"'"),
            "rule \"mrsi\": field \"completion.series_received\": `SeriesDescription`: series_received lists series \
             descriptions as strings (e.g. `\"MRSI\" and \"STAGE_preproc\"`), comparisons are not allowed here \
              at column 12",
        );
        assert_problem(
            "[[rule]]\nname = \"mrsi\"\naction = \"indx\"\n",
            "rule \"mrsi\": field \"action\": unknown action \"indx\" (one of \"index\", \"discard\", \"hold\")",
        );
        assert_problem(
            "[[rule]]\nname = \"mrsi\"\n",
            "rule \"mrsi\": field \"action\": missing (one of \"index\", \"discard\", \"hold\")",
        );
        assert_problem(
            &rule("[rule.completion]\nquiet_period = \"0s\""),
            "rule \"mrsi\": field \"completion.quiet_period\": \"0s\": must be greater than zero (or \"off\")",
        );
        assert_problem(
            &rule("[rule.completion]\nforce_after = \"soon\""),
            "rule \"mrsi\": field \"completion.force_after\": \"soon\" is not a duration (e.g. 60s, 500ms, 2m)",
        );
        assert_problem(
            &rule("[rule.completion]\nforce_action = \"discard\""),
            "rule \"mrsi\": field \"completion.force_action\": needs completion.force_after",
        );
        assert_problem(
            &rule("[rule.completion]\nforce_after = \"2h\"\nforce_action = \"drop\""),
            "rule \"mrsi\": field \"completion.force_action\": unknown force action \"drop\" (one of \
             \"proceed\", \"discard\", \"hold\")",
        );
        assert_problem(
            &rule("[rule.completion]\nseries_quiet_period = \"30s\""),
            "rule \"mrsi\": field \"completion.series_quiet_period\": has no effect without completion.series_received",
        );
        assert_problem(
            &rule("[rule.completion]\nquiet_period = \"off\"\nseries_received = '\"MRSI\"'"),
            "rule \"mrsi\": field \"completion.quiet_period\": is \"off\", so completion.force_after is \
             required (a study \
             whose series never arrive would wait forever; use force_action = \"hold\" to hand it to an operator)",
        );
        assert_problem(
            "[defaults]\nquiet_period = \"0\"\n[[rule]]\nname = \"a\"\naction = \"index\"\n",
            "[defaults]: field \"quiet_period\": \"0\": must be greater than zero",
        );
    }

    #[test]
    fn names_are_checked() {
        let two = "[[rule]]\nname = \"a\"\naction = \"index\"\n[[rule]]\nname = \"a\"\naction = \"hold\"\n";
        assert_problem(two, "rule \"a\": field \"name\": duplicate: rule #1 has the same name");
        assert_problem("[[rule]]\naction = \"index\"\n", "rule #1: field \"name\": missing");
        assert_problem(
            "[[rule]]\nname = \"a b\"\naction = \"index\"\n",
            "rule #1: field \"name\": \"a b\": use at most 64 letters, digits, `_`, `-` or `.`",
        );
        assert_problem(
            "[[rule]]\nname = \"hold\"\naction = \"index\"\n",
            "rule #1: field \"name\": \"hold\" is reserved (`fallback = \"hold\"` means: hold unmatched studies)",
        );
        // A nameless rule's other problems are still reported, by number.
        assert_problem(
            "[[rule]]\nname = \"ok\"\naction = \"index\"\n[[rule]]\naction = \"x\"\n",
            "rule #2: field \"action\": unknown action \"x\" (one of \"index\", \"discard\", \"hold\")",
        );
    }

    #[test]
    fn fallback_must_name_a_rule() {
        assert_problem(
            "[defaults]\nfallback = \"nope\"\n[[rule]]\nname = \"b\"\naction = \"index\"\n[[rule]]\n\
             name = \"a\"\naction = \"index\"\n",
            "[defaults]: field \"fallback\": no rule is named \"nope\" (use \"hold\" or one of: \"a\", \"b\")",
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let got = problems(
            "[[rule]]\nname = \"a\"\nselect = 'Modality =='\naction = \"index\"\n[[rule]]\nname = \"b\"\n\
             action = \"nope\"\n",
        );
        assert_eq!(got.lines().count(), 2, "{got}");
        assert!(got.contains("rule \"a\": field \"select\""), "{got}");
        assert!(got.contains("rule \"b\": field \"action\""), "{got}");
    }

    #[test]
    fn an_empty_file_is_an_error() {
        assert_problem("", "rules file: field \"rule\": no [[rule]] is defined (every study would be held)");
    }

    #[test]
    fn unknown_fields_and_wrong_types_are_rejected_with_a_position() {
        let got = problems("[[rule]]\nname = \"a\"\nprority = 10\naction = \"index\"\n");
        assert!(got.contains("unknown field `prority`"), "{got}");
        assert!(got.contains("line 3"), "{got}");
        let got = problems("[[rule]]\nname = \"a\"\naction = \"index\"\n[rule.completion]\nquiet = \"1s\"\n");
        assert!(got.contains("unknown field `quiet`"), "{got}");
        let got = problems("[defaults]\nquiet_period = 60\n[[rule]]\nname = \"a\"\naction = \"index\"\n");
        assert!(got.contains("invalid type: integer `60`, expected a string"), "{got}");
        let got = problems("[[rule]\n");
        assert!(got.starts_with("rules file: TOML parse error"), "{got}");
    }

    #[test]
    fn durations_are_formatted_as_written() {
        assert_eq!(format_duration(Duration::from_secs(7200)), "2h");
        assert_eq!(format_duration(Duration::from_secs(120)), "2m");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::ZERO), "0s");
    }
}
