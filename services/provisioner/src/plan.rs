//! What a command changes, one line per object: `create`, `update` or `keep`, never a value.
//!
//! A dry run prints the lines of what it would do and exits 2 when one of them is a change (0
//! when everything is kept), as `terraform plan -detailed-exitcode`; a real run prints the same
//! lines for what it did.

use std::fmt;
use std::io::Write;

pub use bidsflux_messaging::topology::Change;

/// One object and what was (or would be) done to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// What is done.
    pub change: Change,
    /// The kind of object: `secret`, `stream`, `consumer`, ...
    pub kind: String,
    /// Its name (never its value).
    pub name: String,
    /// A word for the operator (why, or what to do next); never a value.
    pub note: Option<String>,
}

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<6} {} {}", self.change.as_str(), self.kind, self.name)?;
        if let Some(note) = &self.note {
            write!(f, " ({note})")?;
        }
        Ok(())
    }
}

/// The lines of a run, printed as they come.
pub struct Plan {
    /// Whether nothing is written.
    pub dry_run: bool,
    lines: Vec<Line>,
    out: Box<dyn Write + Send>,
}

impl fmt::Debug for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plan").field("dry_run", &self.dry_run).field("lines", &self.lines).finish_non_exhaustive()
    }
}

impl Plan {
    /// A plan printing to standard output.
    pub fn new(dry_run: bool) -> Self {
        Self::with_output(dry_run, Box::new(std::io::stdout()))
    }

    /// A plan printing to `out`.
    pub fn with_output(dry_run: bool, out: Box<dyn Write + Send>) -> Self {
        Self { dry_run, lines: Vec::new(), out }
    }

    /// Records (and prints) one line.
    pub fn record(&mut self, change: Change, kind: &str, name: &str, note: Option<String>) {
        let line = Line { change, kind: kind.to_owned(), name: name.to_owned(), note };
        // The plan is the command's output: a closed stdout must not stop provisioning.
        let _ = writeln!(self.out, "{line}");
        let _ = self.out.flush();
        self.lines.push(line);
    }

    /// Every line so far.
    pub fn lines(&self) -> &[Line] {
        &self.lines
    }

    /// How many lines are changes (create or update).
    pub fn changes(&self) -> usize {
        self.lines.iter().filter(|l| l.change != Change::Keep).count()
    }

    /// The exit code: 2 for a dry run that found something to change, else 0.
    pub fn exit_code(&self) -> u8 {
        if self.dry_run && self.changes() > 0 { 2 } else { 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_exit_codes() {
        let mut dry = Plan::with_output(true, Box::new(std::io::sink()));
        dry.record(Change::Keep, "secret", "s3_id", None);
        assert_eq!(dry.exit_code(), 0);
        dry.record(Change::Create, "secret", "s3_secret", Some("random, 40 characters".into()));
        assert_eq!(dry.exit_code(), 2);
        assert_eq!(dry.lines()[1].to_string(), "create secret s3_secret (random, 40 characters)");
        assert_eq!(dry.lines()[0].to_string(), "keep   secret s3_id");
        let mut real = Plan::with_output(false, Box::new(std::io::sink()));
        real.record(Change::Update, "stream", "X", None);
        assert_eq!(real.exit_code(), 0);
        assert_eq!(real.changes(), 1);
    }
}
