//! The safe template renderer.
//!
//! Templates such as `{ReferringPhysicianName}/{StudyDescriptionPath[1]}` are
//! parsed once into literals and placeholders; rendering only substitutes
//! [`SessionMetas`] values. There is no evaluation of any kind.
//!
//! Rendering is the original BIDS-flux's plain string formatting of values in
//! which DICOM's `^` already became `/`: a value may span path segments, so the
//! PersonName `Smith^John` renders `Smith/John` (nested groups, or a bucket and
//! a key prefix once an S3 URL is split). Each value's `/`-separated components
//! are trimmed and empty ones dropped (`DOE^JOHN^^MR` is `DOE/JOHN/MR`).
//!
//! Only what is unsafe or unusable in a path is refused: a value that is
//! missing or empty, has a `.` or `..` component, a `\` (DICOM's value
//! separator) or a control character, and a result with an empty, `.` or `..`
//! segment. Errors name the template and the variable, never the value (values
//! are patient data). [`Template::uses_patient_values`] tells callers whether
//! the rendered result itself is patient data (and so must not be logged).

use std::fmt;

use crate::metas::SessionMetas;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Var { name: String, index: Option<usize> },
}

/// A parsed template.
#[derive(Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

impl fmt::Debug for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Template({:?})", self.source)
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// A template that cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// `{` without `}` or a lone `}`.
    #[error("template {template:?}: unbalanced brace at byte {at}")]
    Unbalanced {
        /// The template.
        template: String,
        /// Byte offset.
        at: usize,
    },
    /// A placeholder naming no known variable.
    #[error(
        "template {template:?}: unknown variable {{{name}}} (known: StudyInstanceUID, PatientID, PatientName, ReferringPhysicianName, StudyDate, StudyDescription, StudyDescriptionPath[N])"
    )]
    UnknownVariable {
        /// The template.
        template: String,
        /// The placeholder text.
        name: String,
    },
}

/// A template whose values cannot be used (the message is dead-lettered).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// The variable has no value for this study (tag absent, index out of range).
    #[error("template {template:?}: {{{var}}} has no value for this study")]
    Missing {
        /// The template.
        template: String,
        /// The variable, e.g. `StudyDescriptionPath[1]`.
        var: String,
    },
    /// The value is empty or blank.
    #[error("template {template:?}: {{{var}}} is empty for this study")]
    Empty {
        /// The template.
        template: String,
        /// The variable.
        var: String,
    },
    /// The value is unsafe in a path (a `.`/`..` component, `\`, control characters).
    #[error("template {template:?}: {{{var}}} {why}; refusing to use it in a path")]
    Unsafe {
        /// The template.
        template: String,
        /// The variable.
        var: String,
        /// What is wrong, without the value.
        why: &'static str,
    },
    /// The rendered result has an empty, `.` or `..` segment.
    #[error("template {template:?} renders a path with an empty, '.' or '..' segment")]
    BadPath {
        /// The template.
        template: String,
    },
}

impl Template {
    /// Parses a template. `{{` and `}}` stand for literal braces.
    pub fn parse(source: &str) -> Result<Self, TemplateError> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let bytes: Vec<char> = source.chars().collect();
        let mut i = 0;
        let unbalanced = |at| TemplateError::Unbalanced { template: source.to_owned(), at };
        while i < bytes.len() {
            match bytes[i] {
                '{' if bytes.get(i + 1) == Some(&'{') => {
                    lit.push('{');
                    i += 2;
                }
                '}' if bytes.get(i + 1) == Some(&'}') => {
                    lit.push('}');
                    i += 2;
                }
                '}' => return Err(unbalanced(i)),
                '{' => {
                    let end = bytes[i + 1..].iter().position(|&c| c == '}').ok_or(unbalanced(i))?;
                    let inner: String = bytes[i + 1..i + 1 + end].iter().collect();
                    if inner.contains('{') {
                        return Err(unbalanced(i));
                    }
                    if !lit.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut lit)));
                    }
                    parts.push(parse_var(source, inner.trim())?);
                    i += end + 2;
                }
                c => {
                    lit.push(c);
                    i += 1;
                }
            }
        }
        if !lit.is_empty() {
            parts.push(Part::Literal(lit));
        }
        Ok(Self { source: source.to_owned(), parts })
    }

    /// The template text.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the template uses a patient variable (`PatientID`,
    /// `PatientName`, `StudyDate`): then what it renders is patient data and
    /// must never be logged or shown in an error.
    pub fn uses_patient_values(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Var { name, .. } if SessionMetas::is_patient_variable(name)))
    }

    /// Renders the template for a study as a relative `/`-separated path, as
    /// the original did: values may span segments (`Smith^John` is
    /// `Smith/John`), empty components of a value make no segment. Refused:
    /// missing or empty values, `.`/`..` components, `\` and control
    /// characters, and results with an empty, `.` or `..` segment.
    pub fn render(&self, metas: &SessionMetas) -> Result<String, RenderError> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(l) => out.push_str(l),
                Part::Var { name, index } => {
                    let var = || match index {
                        Some(i) => format!("{name}[{i}]"),
                        None => name.clone(),
                    };
                    let template = || self.source.clone();
                    let value = metas
                        .lookup(name, *index)
                        .ok_or_else(|| RenderError::Missing { template: template(), var: var() })?;
                    let segments = value_segments(value).map_err(|why| match why {
                        None => RenderError::Empty { template: template(), var: var() },
                        Some(why) => RenderError::Unsafe { template: template(), var: var(), why },
                    })?;
                    out.push_str(&segments.join("/"));
                }
            }
        }
        if out.split('/').any(|s| s.is_empty() || s == "." || s == "..") {
            return Err(RenderError::BadPath { template: self.source.clone() });
        }
        Ok(out)
    }
}

fn parse_var(template: &str, inner: &str) -> Result<Part, TemplateError> {
    let unknown = || TemplateError::UnknownVariable { template: template.to_owned(), name: inner.to_owned() };
    let (name, index) = match inner.split_once('[') {
        None => (inner.to_owned(), None),
        Some((name, rest)) => {
            let idx = rest.strip_suffix(']').ok_or_else(unknown)?;
            (name.to_owned(), Some(idx.parse::<usize>().map_err(|_| unknown())?))
        }
    };
    if !SessionMetas::is_known(&name, index.is_some()) {
        return Err(unknown());
    }
    Ok(Part::Var { name, index })
}

/// The path components of a value: trimmed, empty ones dropped. `Err(None)`
/// for a value with no component, `Err(Some(why))` for an unsafe one.
fn value_segments(value: &str) -> Result<Vec<&str>, Option<&'static str>> {
    if value.contains('\\') {
        return Err(Some("contains '\\' (a DICOM value separator)"));
    }
    if value.chars().any(char::is_control) {
        return Err(Some("contains control characters"));
    }
    let segments: Vec<&str> = value.split('/').map(str::trim).filter(|s| !s.is_empty()).collect();
    if segments.iter().any(|s| *s == "." || *s == "..") {
        return Err(Some("has a '.' or '..' path component"));
    }
    if segments.is_empty() {
        return Err(None);
    }
    Ok(segments)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metas::example;

    fn metas(refphys: &str, desc: &str) -> SessionMetas {
        SessionMetas::from_raw("1.2.3.4", "P001", "Doe^Jane", refphys, "20261127", desc).unwrap()
    }

    #[test]
    fn paths_may_take_segments_from_one_value() {
        let t = Template::parse("{PatientName}").unwrap();
        assert_eq!(t.render(&metas("PI", "Brain^Study1")).unwrap(), "Doe/Jane");
        let m = SessionMetas::from_raw("1.2.3.4", "P001", "DOE^JOHN^^MR^", "PI", "20261127", "x").unwrap();
        assert_eq!(t.render(&m).unwrap(), "DOE/JOHN/MR");
        let m = SessionMetas::from_raw("1.2.3.4", "P001", "^Jane ^ Q", "PI", "20261127", "x").unwrap();
        assert_eq!(t.render(&m).unwrap(), "Jane/Q");
        for name in ["..^x", "^^", "Doe\\x", "Doe^.", "Doe^\u{1b}x"] {
            let m = SessionMetas::from_raw("1.2.3.4", "P001", name, "PI", "20261127", "x").unwrap();
            let e = t.render(&m).unwrap_err().to_string();
            assert!(!e.contains("Doe"), "{name:?}: {e}");
        }
    }

    #[test]
    fn renders_the_default_group_template() {
        let t = Template::parse("{ReferringPhysicianName}/{StudyDescriptionPath[1]}").unwrap();
        assert_eq!(t.render(&example()).unwrap(), "Investigator/Study1");
        let t = Template::parse("test.{ReferringPhysicianName}.{StudyDescriptionPath[1]}.dicoms").unwrap();
        assert_eq!(t.render(&example()).unwrap(), "test.Investigator.Study1.dicoms");
        let t = Template::parse("{{literal}}-{StudyInstanceUID}").unwrap();
        assert_eq!(t.render(&example()).unwrap(), "{literal}-1.2.3.4");
    }

    /// A PersonName is `Family^Given`; the original rendered
    /// `Smith^John` as `Smith/John`, i.e. nested groups.
    #[test]
    fn a_person_name_in_the_group_template_makes_nested_groups() {
        let t = Template::parse("{ReferringPhysicianName}/{StudyDescriptionPath[1]}").unwrap();
        assert_eq!(t.render(&metas("Smith^John", "Brain^Study1")).unwrap(), "Smith/John/Study1");
        assert_eq!(t.render(&metas("Smith^John^^Dr", "Brain^Study1")).unwrap(), "Smith/John/Dr/Study1");
        assert_eq!(t.render(&metas("Müller^Jürgen", "Brain^Étude 1")).unwrap(), "Müller/Jürgen/Étude 1");
    }

    #[test]
    fn parse_errors_are_clear() {
        assert!(matches!(Template::parse("{Nope}"), Err(TemplateError::UnknownVariable { .. })));
        assert!(matches!(Template::parse("{StudyDescriptionPath}"), Err(TemplateError::UnknownVariable { .. })));
        assert!(matches!(Template::parse("{PatientName[0]}"), Err(TemplateError::UnknownVariable { .. })));
        assert!(matches!(Template::parse("{StudyDescriptionPath[x]}"), Err(TemplateError::UnknownVariable { .. })));
        assert!(matches!(Template::parse("{PatientName"), Err(TemplateError::Unbalanced { .. })));
        assert!(matches!(Template::parse("a}b"), Err(TemplateError::Unbalanced { .. })));
        let e = Template::parse("{__import__}").unwrap_err().to_string();
        assert!(e.contains("unknown variable"), "{e}");
    }

    #[test]
    fn hostile_values_are_rejected_without_echoing_them() {
        let t = Template::parse("{ReferringPhysicianName}/{StudyDescriptionPath[1]}").unwrap();
        for (refphys, desc) in [
            ("..", "X^Study"),
            ("a\\b", "X^Study"),
            ("Inv", "X^.."),
            ("Inv", "X^a\u{7}b"),
            ("Inv", "X^"),
            ("Inv", "OnlyOne"),
            ("", "X^S"),
        ] {
            let err = t.render(&metas(refphys, desc)).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains("template"), "{msg}");
            if refphys.len() > 2 {
                assert!(!msg.contains(refphys), "value leaked: {msg}");
            }
        }
    }

    #[test]
    fn patient_variables_are_detected() {
        for t in ["{PatientID}", "x/{PatientName}", "{StudyDate}.{ReferringPhysicianName}"] {
            assert!(Template::parse(t).unwrap().uses_patient_values(), "{t}");
        }
        for t in
            ["{ReferringPhysicianName}/{StudyDescriptionPath[1]}", "{StudyInstanceUID}", "PatientID", "{{PatientID}}"]
        {
            assert!(!Template::parse(t).unwrap().uses_patient_values(), "{t}");
        }
    }

    #[test]
    fn literal_dot_segments_are_rejected() {
        let t = Template::parse("../{StudyInstanceUID}").unwrap();
        assert!(matches!(t.render(&example()), Err(RenderError::BadPath { .. })));
        let t = Template::parse("a//{StudyInstanceUID}").unwrap();
        assert!(matches!(t.render(&example()), Err(RenderError::BadPath { .. })));
    }
}
