//! Configuration shared by every bidsflux service.
//!
//! Configuration is parsed from an [`Env`] — a map of variables — rather than
//! from the process environment directly, so parsing is testable. Every error
//! names the variable and what was wrong with it, and secrets are read from
//! files into [`Secret`], whose `Debug` and `Display` print `[redacted]`.

pub mod secrets;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// A configuration error that names the variable at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A required variable is unset or empty.
    #[error("{var} is required but not set")]
    Missing {
        /// Variable name.
        var: String,
    },
    /// A variable is set to a value that cannot be used.
    #[error("{var} is invalid: {reason}")]
    Invalid {
        /// Variable name.
        var: String,
        /// What was wrong, without echoing secret values.
        reason: String,
    },
    /// A secret file could not be read.
    #[error("cannot read secret {var} from {path}: {source}")]
    SecretFile {
        /// Variable that named (or defaulted) the file.
        var: String,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl ConfigError {
    /// Builds an [`ConfigError::Invalid`].
    pub fn invalid(var: &str, reason: impl Into<String>) -> Self {
        Self::Invalid { var: var.to_owned(), reason: reason.into() }
    }
}

/// A string that must not be logged (passwords, keys, tokens).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The secret value; use only where it is sent to its destination.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// The variables a service is configured from.
#[derive(Debug, Clone, Default)]
pub struct Env {
    vars: HashMap<String, String>,
}

impl Env {
    /// The process environment.
    pub fn from_process() -> Self {
        Self { vars: std::env::vars().collect() }
    }

    /// An environment made of the given pairs (tests, embedded defaults).
    pub fn from_pairs<K: Into<String>, V: Into<String>>(pairs: impl IntoIterator<Item = (K, V)>) -> Self {
        Self { vars: pairs.into_iter().map(|(k, v)| (k.into(), v.into())).collect() }
    }

    /// Sets a variable (builder style).
    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.vars.insert(key.into(), value.into());
        self
    }

    /// Sets a variable.
    pub fn set(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.vars.insert(key.into(), value.into());
    }

    /// The value of `var`, treating an empty value as unset.
    pub fn get(&self, var: &str) -> Option<&str> {
        self.vars.get(var).map(|v| v.trim()).filter(|v| !v.is_empty())
    }

    /// The value of `var` or `default`.
    pub fn get_or<'a>(&'a self, var: &str, default: &'a str) -> &'a str {
        self.get(var).unwrap_or(default)
    }

    /// The value of `var`, which must be set.
    pub fn required(&self, var: &str) -> Result<&str, ConfigError> {
        self.get(var).ok_or_else(|| ConfigError::Missing { var: var.to_owned() })
    }

    /// Parses `var` with [`FromStr`], or returns `default` when unset.
    pub fn parse_or<T>(&self, var: &str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        match self.get(var) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|e| ConfigError::invalid(var, format!("{v:?}: {e}"))),
        }
    }

    /// A listen address: `default` when unset, `None` for `off` (in any case), else parsed.
    pub fn listen_addr_or(
        &self,
        var: &str,
        default: std::net::SocketAddr,
    ) -> Result<Option<std::net::SocketAddr>, ConfigError> {
        match self.get(var) {
            Some(v) if v.eq_ignore_ascii_case("off") => Ok(None),
            _ => self.parse_or(var, default).map(Some),
        }
    }

    /// Parses a boolean (`1/0`, `true/false`, `yes/no`, `on/off`).
    pub fn bool_or(&self, var: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(var).map(str::to_ascii_lowercase).as_deref() {
            None => Ok(default),
            Some("1" | "true" | "yes" | "on") => Ok(true),
            Some("0" | "false" | "no" | "off") => Ok(false),
            Some(v) => Err(ConfigError::invalid(var, format!("{v:?} is not a boolean (true/false)"))),
        }
    }

    /// Parses a duration such as `60`, `60s`, `500ms`, `2m` or `1h` (a bare number is seconds).
    pub fn duration_or(&self, var: &str, default: Duration) -> Result<Duration, ConfigError> {
        match self.get(var) {
            None => Ok(default),
            Some(v) => parse_duration(v).map_err(|reason| ConfigError::invalid(var, reason)),
        }
    }

    /// A path, or `default` when unset.
    pub fn path_or(&self, var: &str, default: impl AsRef<Path>) -> PathBuf {
        self.get(var).map(PathBuf::from).unwrap_or_else(|| default.as_ref().to_path_buf())
    }

    /// Reads a secret.
    ///
    /// Order: the file named by `<var>_FILE`; else `default_file` if it exists;
    /// else the value of `var` itself. Returns `Ok(None)` when none is given.
    /// Trailing newlines of files are removed.
    pub fn secret(&self, var: &str, default_file: Option<&Path>) -> Result<Option<Secret>, ConfigError> {
        let file_var = format!("{var}_FILE");
        if let Some(path) = self.get(&file_var) {
            return read_secret_file(&file_var, Path::new(path)).map(Some);
        }
        if let Some(path) = default_file.filter(|p| p.exists()) {
            return read_secret_file(var, path).map(Some);
        }
        Ok(self.get(var).map(Secret::new))
    }
}

fn read_secret_file(var: &str, path: &Path) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::SecretFile {
        var: var.to_owned(),
        path: path.to_path_buf(),
        source,
    })?;
    Ok(Secret::new(text.trim_end_matches(['\n', '\r'])))
}

/// Parses `60`, `60s`, `500ms`, `2m`, `1h`, `1.5s`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| format!("{text:?} is not a duration (e.g. 60s, 500ms, 2m)"))?;
    let secs = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("{text:?}: unknown unit {other:?} (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{text:?} is not a valid duration"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_default_parse_or_are_off_in_any_case() {
        let d: std::net::SocketAddr = "0.0.0.0:9464".parse().unwrap();
        let env = Env::from_pairs([("A", "off"), ("B", " OFF "), ("C", "127.0.0.1:80"), ("D", ""), ("E", "nowhere")]);
        assert_eq!(env.listen_addr_or("A", d).unwrap(), None);
        assert_eq!(env.listen_addr_or("B", d).unwrap(), None);
        assert_eq!(env.listen_addr_or("C", d).unwrap(), Some("127.0.0.1:80".parse().unwrap()));
        assert_eq!(env.listen_addr_or("D", d).unwrap(), Some(d));
        assert_eq!(env.listen_addr_or("unset", d).unwrap(), Some(d));
        assert!(env.listen_addr_or("E", d).unwrap_err().to_string().contains('E'));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("60").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("60s").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("99999999999999999999999h").is_err());
    }

    #[test]
    fn errors_name_the_variable() {
        let env = Env::from_pairs([("BIDSFLUX_X", "abc"), ("BIDSFLUX_B", "maybe")]);
        let e = env.parse_or::<u16>("BIDSFLUX_X", 1).unwrap_err().to_string();
        assert!(e.contains("BIDSFLUX_X"), "{e}");
        let e = env.bool_or("BIDSFLUX_B", false).unwrap_err().to_string();
        assert!(e.contains("BIDSFLUX_B"), "{e}");
        let e = env.required("BIDSFLUX_NOPE").unwrap_err().to_string();
        assert!(e.contains("BIDSFLUX_NOPE"), "{e}");
    }

    #[test]
    fn empty_is_unset() {
        let env = Env::from_pairs([("A", "  ")]);
        assert_eq!(env.get("A"), None);
        assert_eq!(env.parse_or("A", 7u8).unwrap(), 7);
    }

    #[test]
    fn secrets_come_from_files_and_are_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("s3_secret");
        std::fs::write(&f, "hunter2\n").unwrap();
        let env = Env::from_pairs([("S3_SECRET_FILE", f.to_str().unwrap()), ("S3_SECRET", "fallback")]);
        let s = env.secret("S3_SECRET", None).unwrap().unwrap();
        assert_eq!(s.expose(), "hunter2");
        assert_eq!(format!("{s:?} {s}"), "[redacted] [redacted]");
        let env = Env::from_pairs([("S3_SECRET", "fallback")]);
        assert_eq!(env.secret("S3_SECRET", Some(&dir.path().join("missing"))).unwrap().unwrap().expose(), "fallback");
        assert_eq!(env.secret("S3_SECRET", Some(&f)).unwrap().unwrap().expose(), "hunter2");
    }
}
