//! The expression language of the rules file, parsed once into a tree and
//! never evaluated as code.
//!
//! Two dialects share one grammar:
//!
//! - [`Expr`] (`select`): comparisons over DICOM attributes named by keyword,
//!   e.g. `Modality == "MR" and not (StudyDescription contains "phantom")`.
//! - [`SeriesExpr`] (`series_received`): bare strings naming series
//!   descriptions, e.g. `"MRSI" and "STAGE_preproc"`; a string is true when a
//!   series with that SeriesDescription was received.
//!
//! ```text
//! expr       := and_expr (("or" | "||") and_expr)*
//! and_expr   := unary (("and" | "&&") unary)*
//! unary      := ("not" | "!") unary | primary
//! primary    := "(" expr ")" | "true" | "false"
//!             | comparison                      (select only)
//!             | STRING                          (series_received only)
//! comparison := KEYWORD ("==" | "!=" | "contains" | "matches") STRING
//!             | KEYWORD "in" "[" STRING ("," STRING)* ","? "]"
//! KEYWORD    := [A-Z][A-Za-z0-9]*               (a DICOM attribute keyword)
//! STRING     := '"' ( [^"\\] | '\"' | '\\' )* '"'
//! ```
//!
//! Operator words are case-insensitive (`and`, `AND`). Evaluation semantics
//! (missing attributes, trimming, multi-valued strings) are on [`Expr::eval`].

use std::collections::BTreeSet;
use std::fmt;

use regex::Regex;

/// Deepest nesting of parentheses and `not` accepted (keeps the recursive
/// parser far from the stack limit on hostile input).
const MAX_DEPTH: usize = 64;

/// A malformed expression: where and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} at {}", self.position())]
pub struct ParseError {
    /// Byte offset of the offending token in the expression.
    pub offset: usize,
    /// 1-based line (expressions written as TOML multi-line strings can span lines).
    pub line: usize,
    /// 1-based column, in characters, within `line`.
    pub column: usize,
    /// What was wrong, without the position (e.g. "expected a string after `contains`, found end of expression").
    pub message: String,
    /// Whether the expression spans several lines (then the position names the line too).
    multiline: bool,
}

impl ParseError {
    fn new(source: &str, offset: usize, message: impl Into<String>) -> Self {
        let offset = offset.min(source.len());
        let before = source.get(..offset).unwrap_or(source);
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
        Self { offset, line, column, message: message.into(), multiline: source.contains('\n') }
    }

    fn position(&self) -> String {
        if self.multiline {
            format!("line {}, column {}", self.line, self.column)
        } else {
            format!("column {}", self.column)
        }
    }
}

/// A parsed `select` expression over DICOM attributes.
#[derive(Debug, Clone)]
pub struct Expr {
    source: String,
    root: Node,
}

/// A parsed `series_received` expression over received series descriptions.
#[derive(Debug, Clone)]
pub struct SeriesExpr {
    source: String,
    root: Node,
}

#[derive(Debug, Clone)]
enum Node {
    Const(bool),
    Or(Vec<Node>),
    And(Vec<Node>),
    Not(Box<Node>),
    Compare { keyword: String, op: Op },
    Series(String),
}

#[derive(Debug, Clone)]
enum Op {
    Eq(String),
    Ne(String),
    Contains(String),
    Matches(Regex),
    In(Vec<String>),
}

impl Expr {
    /// Parses a `select` expression. Bare strings are rejected (they only mean
    /// something in `series_received`).
    pub fn parse(source: &str) -> Result<Self, ParseError> {
        let root = Parser::run(source, Dialect::Select)?;
        Ok(Self { source: source.to_owned(), root })
    }

    /// The expression that is always true (a rule without `select`).
    pub fn always() -> Self {
        Self { source: "true".to_owned(), root: Node::Const(true) }
    }

    /// The text as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The attribute keywords the expression reads, sorted and de-duplicated:
    /// what a caller must extract from an instance to evaluate it.
    pub fn keywords(&self) -> BTreeSet<&str> {
        let mut out = BTreeSet::new();
        self.root.visit(&mut |n| {
            if let Node::Compare { keyword, .. } = n {
                out.insert(keyword.as_str());
            }
        });
        out
    }

    /// Evaluates the expression; `lookup` returns an attribute's value by keyword.
    ///
    /// - Values are trimmed (spaces, other whitespace and NUL padding) before
    ///   comparing; a value that is empty after trimming counts as missing.
    /// - A missing attribute is never an error: every comparison on it is
    ///   false, `!=` and `in` included, so `not (X == "a")` is true for it.
    /// - A multi-valued string (`ORIGINAL\PRIMARY\M`) is one string: `==`,
    ///   `!=` and `in` compare the whole value, `contains` and `matches` look
    ///   inside it.
    /// - `==`, `!=`, `in` and `contains` are case-sensitive; `matches` is an
    ///   unanchored regular-expression search (`^…$` anchors, `(?i)` ignores case).
    pub fn eval<'a>(&self, lookup: impl Fn(&str) -> Option<&'a str>) -> bool {
        self.root.eval(&|keyword| lookup(keyword), &|_| false)
    }
}

impl SeriesExpr {
    /// Parses a `series_received` expression. Comparisons over attributes are
    /// rejected: the terms are series descriptions.
    pub fn parse(source: &str) -> Result<Self, ParseError> {
        let root = Parser::run(source, Dialect::Series)?;
        Ok(Self { source: source.to_owned(), root })
    }

    /// The text as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The series descriptions the expression names, sorted and de-duplicated.
    pub fn descriptions(&self) -> BTreeSet<&str> {
        let mut out = BTreeSet::new();
        self.root.visit(&mut |n| {
            if let Node::Series(s) = n {
                out.insert(s.as_str());
            }
        });
        out
    }

    /// Evaluates the expression; `received(description)` says whether a series
    /// with exactly that (trimmed) SeriesDescription was received.
    pub fn eval(&self, received: impl Fn(&str) -> bool) -> bool {
        self.root.eval(&|_| None, &|d| received(d))
    }

    /// Evaluates the expression over the descriptions of the received series
    /// (trimmed here; exact, case-sensitive match).
    pub fn eval_descriptions<'a>(&self, received: impl IntoIterator<Item = &'a str>) -> bool {
        let set: BTreeSet<&str> = received.into_iter().map(trim_value).collect();
        self.eval(|d| set.contains(d))
    }
}

/// Trims DICOM padding: whitespace (including the trailing space of even
/// lengths) and NUL.
fn trim_value(v: &str) -> &str {
    v.trim_matches(|c: char| c.is_whitespace() || c == '\0')
}

impl Node {
    fn visit<'n>(&'n self, f: &mut impl FnMut(&'n Node)) {
        f(self);
        match self {
            Node::Or(xs) | Node::And(xs) => xs.iter().for_each(|x| x.visit(f)),
            Node::Not(x) => x.visit(f),
            Node::Const(_) | Node::Compare { .. } | Node::Series(_) => {}
        }
    }

    fn eval<'a>(&self, lookup: &dyn Fn(&str) -> Option<&'a str>, received: &dyn Fn(&str) -> bool) -> bool {
        match self {
            Node::Const(b) => *b,
            Node::Or(xs) => xs.iter().any(|x| x.eval(lookup, received)),
            Node::And(xs) => xs.iter().all(|x| x.eval(lookup, received)),
            Node::Not(x) => !x.eval(lookup, received),
            Node::Series(d) => received(d),
            Node::Compare { keyword, op } => {
                let Some(v) = lookup(keyword).map(trim_value).filter(|v| !v.is_empty()) else {
                    return false;
                };
                match op {
                    Op::Eq(s) => v == s,
                    Op::Ne(s) => v != s,
                    Op::Contains(s) => v.contains(s.as_str()),
                    Op::Matches(re) => re.is_match(v),
                    Op::In(list) => list.iter().any(|s| s == v),
                }
            }
        }
    }
}

/// Writes a string literal with the escapes the lexer reads.
fn write_str(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    f.write_str("\"")?;
    for c in s.chars() {
        match c {
            '"' => f.write_str("\\\"")?,
            '\\' => f.write_str("\\\\")?,
            c => write!(f, "{c}")?,
        }
    }
    f.write_str("\"")
}

fn write_joined(f: &mut fmt::Formatter<'_>, xs: &[Node], sep: &str) -> fmt::Result {
    f.write_str("(")?;
    for (i, x) in xs.iter().enumerate() {
        if i > 0 {
            f.write_str(sep)?;
        }
        write!(f, "{x}")?;
    }
    f.write_str(")")
}

/// The canonical, fully parenthesised form (for logs and tests).
impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Node::Const(b) => write!(f, "{b}"),
            Node::Or(xs) => write_joined(f, xs, " or "),
            Node::And(xs) => write_joined(f, xs, " and "),
            Node::Not(x) => write!(f, "(not {x})"),
            Node::Series(d) => write_str(f, d),
            Node::Compare { keyword, op } => {
                write!(f, "{keyword} ")?;
                match op {
                    Op::Eq(s) => f.write_str("== ").and_then(|_| write_str(f, s)),
                    Op::Ne(s) => f.write_str("!= ").and_then(|_| write_str(f, s)),
                    Op::Contains(s) => f.write_str("contains ").and_then(|_| write_str(f, s)),
                    Op::Matches(re) => f.write_str("matches ").and_then(|_| write_str(f, re.as_str())),
                    Op::In(list) => {
                        f.write_str("in [")?;
                        for (i, s) in list.iter().enumerate() {
                            if i > 0 {
                                f.write_str(", ")?;
                            }
                            write_str(f, s)?;
                        }
                        f.write_str("]")
                    }
                }
            }
        }
    }
}

/// The canonical, fully parenthesised form, e.g. `((A == "x") or ((not B == "y") and C in ["z"]))`.
impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.root.fmt(f)
    }
}

/// The canonical, fully parenthesised form.
impl fmt::Display for SeriesExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.root.fmt(f)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Select,
    Series,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Keyword(String),
    Str(String),
    EqEq,
    NotEq,
    And,
    Or,
    Not,
    Contains,
    Matches,
    In,
    True,
    False,
    LParen,
    RParen,
    LBracket,
    RBracket,
    Comma,
    End,
}

impl Tok {
    /// How the token is named in "found …" messages.
    fn describe(&self) -> String {
        let s = match self {
            Tok::Keyword(k) => return format!("`{k}`"),
            Tok::Str(s) => return format!("the string {s:?}"),
            Tok::End => return "end of expression".to_owned(),
            Tok::EqEq => "==",
            Tok::NotEq => "!=",
            Tok::And => "and",
            Tok::Or => "or",
            Tok::Not => "not",
            Tok::Contains => "contains",
            Tok::Matches => "matches",
            Tok::In => "in",
            Tok::True => "true",
            Tok::False => "false",
            Tok::LParen => "(",
            Tok::RParen => ")",
            Tok::LBracket => "[",
            Tok::RBracket => "]",
            Tok::Comma => ",",
        };
        format!("`{s}`")
    }
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    /// Byte offset of the token's first character.
    at: usize,
}

fn lex(src: &str) -> Result<Vec<Token>, ParseError> {
    let err = |at: usize, msg: String| ParseError::new(src, at, msg);
    let mut out = Vec::new();
    let mut chars = src.char_indices().peekable();
    while let Some(&(at, c)) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        chars.next();
        let next = chars.peek().map(|&(_, c)| c);
        let tok = match c {
            '(' => Tok::LParen,
            ')' => Tok::RParen,
            '[' => Tok::LBracket,
            ']' => Tok::RBracket,
            ',' => Tok::Comma,
            '=' if next == Some('=') => {
                chars.next();
                Tok::EqEq
            }
            '=' => return Err(err(at, "unexpected `=`: equality is written `==`".to_owned())),
            '!' if next == Some('=') => {
                chars.next();
                Tok::NotEq
            }
            '!' => Tok::Not,
            '&' if next == Some('&') => {
                chars.next();
                Tok::And
            }
            '|' if next == Some('|') => {
                chars.next();
                Tok::Or
            }
            '&' | '|' => return Err(err(at, format!("unexpected `{c}`: write `{c}{c}` or `{}`", and_or(c)))),
            '\'' => return Err(err(at, "unexpected `'`: strings are written in double quotes".to_owned())),
            '"' => {
                let mut s = String::new();
                loop {
                    match chars.next() {
                        None => return Err(err(at, "unterminated string (no closing `\"`)".to_owned())),
                        Some((_, '"')) => break,
                        Some((_, '\\')) => match chars.next() {
                            Some((_, e @ ('"' | '\\'))) => s.push(e),
                            Some((e_at, e)) => {
                                return Err(err(
                                    e_at.saturating_sub(1),
                                    format!(
                                        "unknown escape `\\{e}` in string (only `\\\"` and `\\\\` are allowed; \
                                         a regular expression's `\\{e}` is written `\\\\{e}`)"
                                    ),
                                ));
                            }
                            None => return Err(err(at, "unterminated string (no closing `\"`)".to_owned())),
                        },
                        Some((_, c)) => s.push(c),
                    }
                }
                Tok::Str(s)
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let mut end = at + c.len_utf8();
                while let Some(&(i, c)) = chars.peek() {
                    if !(c.is_ascii_alphanumeric() || c == '_') {
                        break;
                    }
                    end = i + c.len_utf8();
                    chars.next();
                }
                let word = src.get(at..end).unwrap_or_default();
                word_token(word).map_err(|m| err(at, m))?
            }
            c if c.is_ascii_digit() => {
                return Err(err(at, format!("unexpected `{c}`: values are written as strings, e.g. \"{c}\"")));
            }
            c => return Err(err(at, format!("unexpected character `{c}`"))),
        };
        out.push(Token { tok, at });
    }
    out.push(Token { tok: Tok::End, at: src.len() });
    Ok(out)
}

fn and_or(c: char) -> &'static str {
    if c == '&' { "and" } else { "or" }
}

/// Operator words (case-insensitive) or a DICOM keyword.
fn word_token(word: &str) -> Result<Tok, String> {
    let tok = match word.to_ascii_lowercase().as_str() {
        "and" => Tok::And,
        "or" => Tok::Or,
        "not" => Tok::Not,
        "contains" => Tok::Contains,
        "matches" => Tok::Matches,
        "in" => Tok::In,
        "true" => Tok::True,
        "false" => Tok::False,
        _ => {
            let camel =
                word.starts_with(|c: char| c.is_ascii_uppercase()) && word.chars().all(|c| c.is_ascii_alphanumeric());
            if !camel {
                return Err(format!(
                    "`{word}` is not a DICOM attribute keyword (keywords are CamelCase letters and digits, \
                     e.g. `StudyDescription`)"
                ));
            }
            Tok::Keyword(word.to_owned())
        }
    };
    Ok(tok)
}

struct Parser<'s> {
    src: &'s str,
    toks: Vec<Token>,
    pos: usize,
    depth: usize,
    dialect: Dialect,
}

impl<'s> Parser<'s> {
    fn run(src: &'s str, dialect: Dialect) -> Result<Node, ParseError> {
        let toks = lex(src)?;
        let mut p = Parser { src, toks, pos: 0, depth: 0, dialect };
        if p.peek().tok == Tok::End {
            return Err(p.error_here("empty expression"));
        }
        let node = p.or_expr()?;
        let t = p.peek();
        if t.tok != Tok::End {
            let found = t.tok.describe();
            return Err(p.error_here(format!("expected `and`, `or` or the end of the expression, found {found}")));
        }
        Ok(node)
    }

    fn peek(&self) -> &Token {
        // `lex` always ends the list with `End`, and `bump` never moves past it.
        &self.toks[self.pos.min(self.toks.len() - 1)]
    }

    fn bump(&mut self) -> Token {
        let t = self.peek().clone();
        if t.tok != Tok::End {
            self.pos += 1;
        }
        t
    }

    fn error_at(&self, at: usize, message: impl Into<String>) -> ParseError {
        ParseError::new(self.src, at, message)
    }

    fn error_here(&self, message: impl Into<String>) -> ParseError {
        self.error_at(self.peek().at, message)
    }

    fn enter(&mut self) -> Result<(), ParseError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.error_here(format!("expression nested deeper than {MAX_DEPTH} levels")));
        }
        Ok(())
    }

    fn or_expr(&mut self) -> Result<Node, ParseError> {
        let mut xs = vec![self.and_expr()?];
        while self.peek().tok == Tok::Or {
            self.bump();
            xs.push(self.and_expr()?);
        }
        Ok(if xs.len() == 1 { xs.remove(0) } else { Node::Or(xs) })
    }

    fn and_expr(&mut self) -> Result<Node, ParseError> {
        let mut xs = vec![self.unary()?];
        while self.peek().tok == Tok::And {
            self.bump();
            xs.push(self.unary()?);
        }
        Ok(if xs.len() == 1 { xs.remove(0) } else { Node::And(xs) })
    }

    fn unary(&mut self) -> Result<Node, ParseError> {
        if self.peek().tok == Tok::Not {
            self.bump();
            self.enter()?;
            let inner = self.unary()?;
            self.depth -= 1;
            return Ok(Node::Not(Box::new(inner)));
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Node, ParseError> {
        let t = self.bump();
        match t.tok {
            Tok::LParen => {
                self.enter()?;
                let inner = self.or_expr()?;
                self.depth -= 1;
                let close = self.peek();
                if close.tok != Tok::RParen {
                    let found = close.tok.describe();
                    let open = ParseError::new(self.src, t.at, "").position();
                    return Err(self.error_here(format!("expected `)` to close the `(` at {open}, found {found}")));
                }
                self.bump();
                Ok(inner)
            }
            Tok::True => Ok(Node::Const(true)),
            Tok::False => Ok(Node::Const(false)),
            Tok::Keyword(keyword) if self.dialect == Dialect::Select => self.comparison(keyword),
            Tok::Str(s) if self.dialect == Dialect::Series => {
                exact_literal(&s).map_err(|m| self.error_at(t.at, format!("series description {s:?}: {m}")))?;
                Ok(Node::Series(s))
            }
            Tok::Keyword(keyword) => Err(self.error_at(
                t.at,
                format!(
                    "`{keyword}`: series_received lists series descriptions as strings \
                     (e.g. `\"MRSI\" and \"STAGE_preproc\"`), comparisons are not allowed here"
                ),
            )),
            Tok::Str(s) => Err(self.error_at(
                t.at,
                format!(
                    "a bare string ({s:?}) only means something in series_received; compare an attribute \
                     instead, e.g. `SeriesDescription == {s:?}`"
                ),
            )),
            other => {
                let expected = match self.dialect {
                    Dialect::Select => "a comparison (e.g. `Modality == \"MR\"`), `not` or `(`",
                    Dialect::Series => "a series description (a string), `not` or `(`",
                };
                Err(self.error_at(t.at, format!("expected {expected}, found {}", other.describe())))
            }
        }
    }

    fn comparison(&mut self, keyword: String) -> Result<Node, ParseError> {
        let op_tok = self.bump();
        let op_name = op_tok.tok.describe();
        let op = match op_tok.tok {
            Tok::EqEq | Tok::NotEq => {
                let (at, s) = self.string_after(&op_name)?;
                exact_literal(&s).map_err(|m| self.error_at(at, m))?;
                if op_tok.tok == Tok::EqEq { Op::Eq(s) } else { Op::Ne(s) }
            }
            Tok::Contains => {
                let (at, s) = self.string_after(&op_name)?;
                non_empty(&s).map_err(|m| self.error_at(at, m))?;
                Op::Contains(s)
            }
            Tok::Matches => {
                let (at, s) = self.string_after(&op_name)?;
                non_empty(&s).map_err(|m| self.error_at(at, m))?;
                let re = Regex::new(&s).map_err(|e| {
                    self.error_at(at, format!("invalid regular expression after `matches`: {}", regex_reason(&e)))
                })?;
                Op::Matches(re)
            }
            Tok::In => Op::In(self.list()?),
            other => {
                return Err(self.error_at(
                    op_tok.at,
                    format!(
                        "expected `==`, `!=`, `contains`, `matches` or `in` after `{keyword}`, found {}",
                        other.describe()
                    ),
                ));
            }
        };
        Ok(Node::Compare { keyword, op })
    }

    /// The string operand of an operator, with its offset.
    fn string_after(&mut self, op_name: &str) -> Result<(usize, String), ParseError> {
        let t = self.peek().clone();
        match t.tok {
            Tok::Str(s) => {
                self.bump();
                Ok((t.at, s))
            }
            other => Err(self.error_here(format!("expected a string after {op_name}, found {}", other.describe()))),
        }
    }

    fn list(&mut self) -> Result<Vec<String>, ParseError> {
        let open = self.peek().clone();
        if open.tok != Tok::LBracket {
            return Err(self.error_here(format!("expected `[` after `in`, found {}", open.tok.describe())));
        }
        self.bump();
        let mut items = Vec::new();
        loop {
            let t = self.bump();
            match t.tok {
                Tok::RBracket if items.is_empty() => {
                    return Err(self.error_at(open.at, "empty list after `in` (it could never match)"));
                }
                Tok::RBracket => return Ok(items),
                Tok::Str(s) => {
                    exact_literal(&s).map_err(|m| self.error_at(t.at, m))?;
                    items.push(s);
                }
                other => {
                    return Err(
                        self.error_at(t.at, format!("expected a string in the list, found {}", other.describe()))
                    );
                }
            }
            let sep = self.bump();
            match sep.tok {
                Tok::Comma => {}
                Tok::RBracket => return Ok(items),
                other => {
                    return Err(
                        self.error_at(sep.at, format!("expected `,` or `]` in the list, found {}", other.describe()))
                    );
                }
            }
        }
    }
}

fn non_empty(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("empty string: an empty DICOM value counts as missing, so this could never be true".to_owned());
    }
    Ok(())
}

/// Literals compared for equality: values are trimmed before comparing, so
/// padding in the literal could never match.
fn exact_literal(s: &str) -> Result<(), String> {
    non_empty(s)?;
    if trim_value(s) != s {
        return Err("leading or trailing spaces could never match (values are compared trimmed)".to_owned());
    }
    Ok(())
}

/// The one-line reason from a `regex` error (its `Display` draws a diagram over several lines).
fn regex_reason(e: &regex::Error) -> String {
    let text = e.to_string();
    text.lines()
        .find_map(|l| l.trim().strip_prefix("error: ").map(str::to_owned))
        .unwrap_or_else(|| text.split_whitespace().collect::<Vec<_>>().join(" "))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn attrs(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn eval(src: &str, pairs: &[(&str, &str)]) -> bool {
        let map = attrs(pairs);
        Expr::parse(src).unwrap().eval(|k| map.get(k).map(String::as_str))
    }

    fn canon(src: &str) -> String {
        Expr::parse(src).unwrap().to_string()
    }

    fn err(src: &str) -> String {
        Expr::parse(src).unwrap_err().to_string()
    }

    fn series_err(src: &str) -> String {
        SeriesExpr::parse(src).unwrap_err().to_string()
    }

    #[test]
    fn parses_the_documented_example() {
        let e = Expr::parse(r#"Modality == "MR" and not (StudyDescription contains "phantom")"#).unwrap();
        assert_eq!(e.to_string(), r#"(Modality == "MR" and (not StudyDescription contains "phantom"))"#);
        assert_eq!(e.keywords().into_iter().collect::<Vec<_>>(), ["Modality", "StudyDescription"]);
        assert!(e.eval(|k| (k == "Modality").then_some("MR")));
        assert!(!e.eval(|k| match k {
            "Modality" => Some("MR"),
            "StudyDescription" => Some("QA phantom weekly"),
            _ => None,
        }));
    }

    #[test]
    fn precedence_is_not_then_and_then_or() {
        assert_eq!(canon(r#"A == "1" or B == "2" and C == "3""#), r#"(A == "1" or (B == "2" and C == "3"))"#);
        assert_eq!(canon(r#"A == "1" and B == "2" or C == "3""#), r#"((A == "1" and B == "2") or C == "3")"#);
        assert_eq!(canon(r#"not A == "1" and B == "2""#), r#"((not A == "1") and B == "2")"#);
        assert_eq!(canon(r#"not A == "1" or not B == "2""#), r#"((not A == "1") or (not B == "2"))"#);
        // Evaluated too, not just printed: `true or (false and false)`.
        assert!(eval(r#"A == "1" or B == "x" and C == "x""#, &[("A", "1"), ("B", "2"), ("C", "3")]));
        assert!(!eval(r#"(A == "1" or B == "x") and C == "x""#, &[("A", "1"), ("B", "2"), ("C", "3")]));
    }

    #[test]
    fn parentheses_group_and_chains_flatten() {
        assert_eq!(canon(r#"(A == "1" or B == "2") and C == "3""#), r#"((A == "1" or B == "2") and C == "3")"#);
        assert_eq!(canon(r#"((A == "1"))"#), r#"A == "1""#);
        assert_eq!(canon(r#"A == "1" or B == "2" or C == "3""#), r#"(A == "1" or B == "2" or C == "3")"#);
        assert_eq!(canon(r#"not not A == "1""#), r#"(not (not A == "1"))"#);
    }

    #[test]
    fn operator_words_are_case_insensitive_and_symbols_work() {
        assert_eq!(
            canon(r#"A == "1" AND NOT B Contains "x" Or C IN ["y"]"#),
            canon(r#"A == "1" and not B contains "x" or C in ["y"]"#)
        );
        assert_eq!(canon(r#"A == "1" && !(B == "2") || C == "3""#), r#"((A == "1" and (not B == "2")) or C == "3")"#);
        assert_eq!(canon("TRUE or false"), "(true or false)");
    }

    #[test]
    fn every_operator() {
        let a =
            [("Modality", "MR"), ("StudyDescription", "Research^Brain phantom"), ("ImageType", r"ORIGINAL\PRIMARY\M")];
        assert!(eval(r#"Modality == "MR""#, &a));
        assert!(!eval(r#"Modality == "mr""#, &a), "== is case-sensitive");
        assert!(eval(r#"Modality != "CT""#, &a));
        assert!(!eval(r#"Modality != "MR""#, &a));
        assert!(eval(r#"StudyDescription contains "Brain""#, &a));
        assert!(!eval(r#"StudyDescription contains "brain""#, &a));
        assert!(eval(r#"StudyDescription matches "^Research\\^""#, &a));
        assert!(eval(r#"StudyDescription matches "(?i)PHANTOM""#, &a), "matches searches, (?i) ignores case");
        assert!(!eval(r#"StudyDescription matches "^phantom$""#, &a));
        assert!(eval(r#"Modality in ["CT", "MR"]"#, &a));
        assert!(eval(r#"Modality in ["MR",]"#, &a), "trailing comma");
        assert!(!eval(r#"Modality in ["CT", "PT"]"#, &a));
        assert!(eval("true", &a));
        assert!(!eval("false", &a));
    }

    #[test]
    fn multi_valued_strings_are_one_string() {
        let a = [("ImageType", r"ORIGINAL\PRIMARY\M\ND")];
        assert!(!eval(r#"ImageType == "ORIGINAL""#, &a));
        assert!(eval(r#"ImageType == "ORIGINAL\\PRIMARY\\M\\ND""#, &a));
        assert!(eval(r#"ImageType contains "PRIMARY""#, &a));
        assert!(eval(r#"ImageType matches "(^|\\\\)M(\\\\|$)""#, &a));
        assert!(!eval(r#"ImageType in ["ORIGINAL", "DERIVED"]"#, &a));
    }

    #[test]
    fn missing_attributes_make_comparisons_false() {
        for src in [
            r#"StationName == "x""#,
            r#"StationName != "x""#,
            r#"StationName contains "x""#,
            r#"StationName matches ".""#,
            r#"StationName in ["x", "y"]"#,
        ] {
            assert!(!eval(src, &[]), "{src} on a missing attribute");
            assert!(eval(&format!("not ({src})"), &[]), "not ({src}) on a missing attribute");
            // Empty and padding-only values count as missing.
            assert!(!eval(src, &[("StationName", "  ")]), "{src} on an empty attribute");
            assert!(!eval(src, &[("StationName", "\0")]), "{src} on a NUL-padded empty attribute");
        }
    }

    #[test]
    fn values_are_trimmed() {
        assert!(eval(r#"Modality == "MR""#, &[("Modality", "MR ")]));
        assert!(eval(r#"Modality in ["MR"]"#, &[("Modality", " MR\0")]));
        assert!(eval(r#"Modality matches "^MR$""#, &[("Modality", "MR ")]));
    }

    #[test]
    fn string_escapes() {
        let e = Expr::parse(r#"StudyDescription == "say \"hi\" \\ bye""#).unwrap();
        assert!(e.eval(|_| Some(r#"say "hi" \ bye"#)));
        assert_eq!(e.to_string(), r#"StudyDescription == "say \"hi\" \\ bye""#);
        // The canonical form parses back to itself.
        assert_eq!(Expr::parse(&e.to_string()).unwrap().to_string(), e.to_string());
    }

    #[test]
    fn keywords_are_collected_once_and_sorted() {
        let e = Expr::parse(
            r#"(StationName == "a" or Modality == "MR") and not StationName in ["b"]
               and CallingAETitle matches "^SCAN""#,
        )
        .unwrap();
        assert_eq!(e.keywords().into_iter().collect::<Vec<_>>(), ["CallingAETitle", "Modality", "StationName"]);
        assert!(Expr::always().keywords().is_empty());
        assert!(Expr::always().eval(|_| None));
    }

    #[test]
    fn malformed_expressions_say_what_and_where() {
        let cases = [
            (
                r#"StudyDescription contains"#,
                "expected a string after `contains`, found end of expression at column 26",
            ),
            (r#"Modality == MR"#, "expected a string after `==`, found `MR` at column 13"),
            (r#"Modality = "MR""#, "unexpected `=`: equality is written `==` at column 10"),
            (
                r#"Modality "MR""#,
                "expected `==`, `!=`, `contains`, `matches` or `in` after `Modality`, found the string \"MR\" \
                 at column 10",
            ),
            (
                r#"modality == "MR""#,
                "`modality` is not a DICOM attribute keyword (keywords are CamelCase letters and digits, e.g. \
                 `StudyDescription`) at column 1",
            ),
            (r#"Study_Description == "x""#, "`Study_Description` is not a DICOM attribute keyword"),
            (r#"Modality == "MR"#, "unterminated string (no closing `\"`) at column 13"),
            (
                r#"Modality == "M\R""#,
                "unknown escape `\\R` in string (only `\\\"` and `\\\\` are allowed; a regular expression's \
                 `\\R` is written `\\\\R`) at column 15",
            ),
            (r#"Modality == 'MR'"#, "unexpected `'`: strings are written in double quotes at column 13"),
            (r#"(Modality == "MR""#, "expected `)` to close the `(` at column 1, found end of expression at column 18"),
            (r#"Modality == "MR")"#, "expected `and`, `or` or the end of the expression, found `)` at column 17"),
            (
                r#"Modality == "MR" StationName == "x""#,
                "expected `and`, `or` or the end of the expression, found `StationName` at column 18",
            ),
            (
                r#"Modality == "MR" and"#,
                "expected a comparison (e.g. `Modality == \"MR\"`), `not` or `(`, found end of expression at column 21",
            ),
            (r#"Modality == "MR" & StationName == "x""#, "unexpected `&`: write `&&` or `and` at column 18"),
            (r#"Modality in "MR""#, "expected `[` after `in`, found the string \"MR\" at column 13"),
            (r#"Modality in []"#, "empty list after `in` (it could never match) at column 13"),
            (r#"Modality in ["MR" "CT"]"#, "expected `,` or `]` in the list, found the string \"CT\" at column 19"),
            (r#"Modality in ["MR", CT]"#, "expected a string in the list, found `CT` at column 20"),
            (
                r#"SeriesDescription matches "(unclosed""#,
                "invalid regular expression after `matches`: unclosed group at column 27",
            ),
            (
                r#"Modality == """#,
                "empty string: an empty DICOM value counts as missing, so this could never be true at column 13",
            ),
            (
                r#"Modality == "MR ""#,
                "leading or trailing spaces could never match (values are compared trimmed) at column 13",
            ),
            (r#"Rows == 256"#, "unexpected `2`: values are written as strings, e.g. \"2\" at column 9"),
            (r#""MRSI""#, "a bare string (\"MRSI\") only means something in series_received"),
            ("", "empty expression at column 1"),
            ("   ", "empty expression at column 4"),
            ("Modality == \"MR\" and\n  Station$ == \"x\"", "unexpected character `$` at line 2, column 10"),
        ];
        for (src, want) in cases {
            let got = err(src);
            assert!(got.contains(want), "{src:?}\n  got:  {got}\n  want: {want}");
        }
    }

    #[test]
    fn errors_carry_offsets() {
        let e = Expr::parse(r#"Modality == "MR" and Modality contains"#).unwrap_err();
        assert_eq!((e.offset, e.line, e.column), (38, 1, 39));
        assert_eq!(e.message, "expected a string after `contains`, found end of expression");
        // Columns count characters, not bytes.
        let e = Expr::parse(r#"StudyDescription == "Gehirn ü" x"#).unwrap_err();
        assert_eq!((e.offset, e.column), (32, 32));
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = format!("{}Modality == \"MR\"{}", "(".repeat(10_000), ")".repeat(10_000));
        assert!(err(&deep).contains("nested deeper than 64 levels"));
        let nots = format!("{}Modality == \"MR\"", "not ".repeat(10_000));
        assert!(err(&nots).contains("nested deeper than 64 levels"));
        let ok = format!("{}Modality == \"MR\"{}", "(".repeat(60), ")".repeat(60));
        assert!(eval(&ok, &[("Modality", "MR")]));
    }

    #[test]
    fn series_received_mode() {
        let e = SeriesExpr::parse(r#""MRSI" and "STAGE_preproc""#).unwrap();
        assert_eq!(e.descriptions().into_iter().collect::<Vec<_>>(), ["MRSI", "STAGE_preproc"]);
        assert!(!e.eval_descriptions(["MRSI"]));
        assert!(!e.eval_descriptions(["mrsi", "STAGE_preproc"]), "exact, case-sensitive");
        assert!(e.eval_descriptions(["T1w", "MRSI ", "STAGE_preproc"]), "received values are trimmed");
        assert!(!e.eval_descriptions(["MRSI_2", "STAGE_preproc"]), "no substring match");

        let e = SeriesExpr::parse(r#"("T1w" or "MPRAGE") and not "localizer""#).unwrap();
        assert_eq!(e.to_string(), r#"(("T1w" or "MPRAGE") and (not "localizer"))"#);
        assert!(e.eval_descriptions(["MPRAGE"]));
        assert!(!e.eval_descriptions(["MPRAGE", "localizer"]));
        assert!(e.eval(|d| d == "T1w"));
    }

    #[test]
    fn series_received_rejects_comparisons() {
        assert!(
            series_err(r#"SeriesDescription == "MRSI""#).contains(
                "`SeriesDescription`: series_received lists series descriptions as strings (e.g. `\"MRSI\" and \
                 \"STAGE_preproc\"`), comparisons are not allowed here at column 1"
            ),
            "{}",
            series_err(r#"SeriesDescription == "MRSI""#)
        );
        assert!(
            series_err(r#""MRSI" and"#).contains(
                "expected a series description (a string), `not` or `(`, found end of expression at column 11"
            )
        );
        assert!(series_err(r#""MRSI" and """#).contains("series description \"\": empty string"));
    }
}
