//! Completion rules: which rule a study falls under (`select`), when it is
//! complete (`completion`) and what happens then (`action`).
//!
//! Pure and self-contained: the rules file arrives as a string and is
//! validated once, at start, into a [`RuleSet`]; expressions are parsed into
//! trees ([`Expr`], [`SeriesExpr`]) and never evaluated as code; completion is
//! a function of what was received and the time ([`Completion::evaluate`]).
//! The user-facing reference is `docs/completion-rules.md`.

pub mod announced;
pub mod expr;
pub mod file;
pub mod series;

pub use announced::{Announced, COUNT_KEYWORDS, merge_announced};
pub use expr::{Expr, ParseError, SeriesExpr};
pub use file::{
    Action, Completion, DEFAULT_QUIET_PERIOD, Force, ForceAction, Problem, Rule, RuleSet, RulesError, Selected,
    format_duration, validate_rule_name,
};
pub use series::{Criterion, SeriesProgress, StudyProgress, Verdict};
