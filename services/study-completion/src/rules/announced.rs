//! Announced counts: what an instance says about the size of its series and study.
//!
//! A leaf module: the rules file (which tags a rule reads) and the completion
//! evaluator (when a study is complete) both use it; it uses neither.
//!
//! Only tags whose standard meaning is "the number of instances (series) in
//! this series (study)" are read ([`COUNT_KEYWORDS`]). Values are Integer
//! Strings; a missing, unparsable, zero or multi-valued value announces
//! nothing. If instances of one series disagree, the caller must treat the
//! count as unknown ([`merge_announced`]).

/// Instances in this series (0020,1209).
pub const SERIES_INSTANCES_KEYWORD: &str = "NumberOfSeriesRelatedInstances";
/// Series in this study (0020,1206).
pub const STUDY_SERIES_KEYWORD: &str = "NumberOfStudyRelatedSeries";
/// Instances in this study (0020,1208).
pub const STUDY_INSTANCES_KEYWORD: &str = "NumberOfStudyRelatedInstances";
/// Every tag `expected_counts` reads from an instance.
pub const COUNT_KEYWORDS: [&str; 3] = [SERIES_INSTANCES_KEYWORD, STUDY_SERIES_KEYWORD, STUDY_INSTANCES_KEYWORD];

/// The counts one instance announces.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Announced {
    /// Instances in the instance's series.
    pub series_instances: Option<u32>,
    /// Series in the study.
    pub study_series: Option<u32>,
    /// Instances in the study.
    pub study_instances: Option<u32>,
}

impl Announced {
    /// Reads the counts from an instance's attributes (value by keyword).
    pub fn from_lookup<'a>(lookup: impl Fn(&str) -> Option<&'a str>) -> Self {
        Self {
            series_instances: parse_count(lookup(SERIES_INSTANCES_KEYWORD)),
            study_series: parse_count(lookup(STUDY_SERIES_KEYWORD)),
            study_instances: parse_count(lookup(STUDY_INSTANCES_KEYWORD)),
        }
    }
}

/// An Integer String (IS) count: trimmed, optional `+`, positive.
fn parse_count(value: Option<&str>) -> Option<u32> {
    let v = value?.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    v.strip_prefix('+').unwrap_or(v).parse::<u32>().ok().filter(|n| *n > 0)
}

/// What is known about a count after a further instance announced `next`.
/// `known` is the current state: `None` before the first instance.
/// A disagreement, or an instance announcing nothing after others did,
/// makes the count unknown for good (`Some(None)`), so a wrong count can
/// never complete a study early.
pub fn merge_announced(known: Option<Option<u32>>, next: Option<u32>) -> Option<Option<u32>> {
    match known {
        None => Some(next),
        Some(k) if k == next => Some(k),
        Some(_) => Some(None),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn announced_counts_are_parsed_strictly() {
        let a = Announced::from_lookup(|k| match k {
            SERIES_INSTANCES_KEYWORD => Some(" 176 "),
            STUDY_SERIES_KEYWORD => Some("+4"),
            STUDY_INSTANCES_KEYWORD => Some("12\\13"),
            _ => None,
        });
        assert_eq!(a, Announced { series_instances: Some(176), study_series: Some(4), study_instances: None });
        assert_eq!(parse_count(Some("0")), None);
        assert_eq!(parse_count(Some("-3")), None);
        assert_eq!(parse_count(Some("")), None);
        assert_eq!(parse_count(None), None);
    }

    #[test]
    fn disagreeing_announcements_make_the_count_unknown() {
        let k = merge_announced(None, Some(10));
        assert_eq!(k, Some(Some(10)));
        assert_eq!(merge_announced(k, Some(10)), Some(Some(10)));
        assert_eq!(merge_announced(k, Some(11)), Some(None));
        assert_eq!(merge_announced(k, None), Some(None));
        assert_eq!(merge_announced(Some(None), Some(10)), Some(None), "unknown for good");
    }
}
