//! `bidsflux-ctl`: the operator's CLI over the study-completion admin API (`bidsflux.v1.StudyAdmin`).
//!
//! ```text
//! bidsflux-ctl [--server URL] [--json] studies [--status S[,S…]] [--limit N]
//! bidsflux-ctl [--server URL] [--json] study UID [--patient-values]
//! bidsflux-ctl [--server URL] [--json] complete|hold|release|discard|reindex UID
//! ```
//!
//! The server defaults to `BIDSFLUX_CTL_SERVER`, else `http://127.0.0.1:50051` (the service's
//! default `BIDSFLUX_COMPLETION_GRPC_BIND`). Tables for people, `--json` for scripts.

mod render;

use std::fmt;

use bidsflux_proto::v1 as pb;
use bidsflux_proto::v1::study_admin_client::StudyAdminClient;

pub use render::{detail_json, detail_table, list_json, list_table};

/// Where the admin API listens unless told otherwise.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:50051";

/// Usage text.
pub const USAGE: &str = "\
usage: bidsflux-ctl [--server URL] [--json] COMMAND

commands:
  studies [--status S[,S...]] [--limit N]   list studies (S: open, held, completed, discarded)
  study UID [--patient-values]              show one study (attributes only with --patient-values)
  complete UID                              force-complete an open or held study (indexes it)
  hold UID                                  hold an open study for an operator
  release UID                               lift a hold (operator hold: back to its rule; else index)
  discard UID                               discard an open or held study
  reindex UID                               publish its last study completed again

options:
  --server URL   admin API (default: $BIDSFLUX_CTL_SERVER or http://127.0.0.1:50051)
  --json         JSON instead of tables
";

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// List studies.
    Studies {
        /// Only these statuses (empty: all).
        statuses: Vec<pb::StudyStatus>,
        /// At most this many (0: the server's default).
        limit: u32,
    },
    /// Show one.
    Study {
        /// StudyInstanceUID.
        uid: String,
        /// Include the attributes (may hold patient values).
        patient_values: bool,
    },
    /// An operator command on one study.
    Command {
        /// Which.
        command: Command,
        /// StudyInstanceUID.
        uid: String,
    },
}

/// The commands that change a study.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `complete`.
    Complete,
    /// `hold`.
    Hold,
    /// `release`.
    Release,
    /// `discard`.
    Discard,
    /// `reindex`.
    Reindex,
}

/// A parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    /// Admin API URL.
    pub server: String,
    /// JSON output.
    pub json: bool,
    /// What to do.
    pub action: Action,
}

/// A command line that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}\n\n{USAGE}", self.0)
    }
}

impl std::error::Error for UsageError {}

fn status(word: &str) -> Result<pb::StudyStatus, UsageError> {
    match word.trim().to_ascii_lowercase().as_str() {
        "open" => Ok(pb::StudyStatus::Open),
        "held" | "hold" => Ok(pb::StudyStatus::Held),
        "completed" | "complete" => Ok(pb::StudyStatus::Completed),
        "discarded" => Ok(pb::StudyStatus::Discarded),
        other => Err(UsageError(format!("unknown status {other:?} (open, held, completed, discarded)"))),
    }
}

/// Parses the arguments after the program name; `server` is the default server.
pub fn parse_args(args: &[String], server: &str) -> Result<Args, UsageError> {
    let mut server = server.to_owned();
    let mut json = false;
    let mut words: Vec<&str> = Vec::new();
    let mut statuses = Vec::new();
    let mut limit = 0;
    let mut patient_values = false;
    let mut it = args.iter().map(String::as_str);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| UsageError(format!("{name} needs a value")));
        match a {
            "--server" => server = value("--server")?.to_owned(),
            "--json" => json = true,
            "--status" => {
                for w in value("--status")?.split(',') {
                    statuses.push(status(w)?);
                }
            }
            "--limit" => {
                let v = value("--limit")?;
                limit = v.parse().map_err(|_| UsageError(format!("--limit {v:?} is not a number")))?;
            }
            "--patient-values" => patient_values = true,
            "-h" | "--help" => return Err(UsageError("help".to_owned())),
            flag if flag.starts_with("--") => return Err(UsageError(format!("unknown option {flag}"))),
            word => words.push(word),
        }
    }
    let uid = |words: &[&str]| match words {
        [_, uid] => Ok((*uid).to_owned()),
        [cmd] => Err(UsageError(format!("{cmd} needs a StudyInstanceUID"))),
        _ => Err(UsageError("too many arguments".to_owned())),
    };
    let listing = !statuses.is_empty() || limit != 0;
    let command = |c| uid(&words).map(|uid| Action::Command { command: c, uid });
    let action = match words.first().copied() {
        Some("studies") if words.len() == 1 => Action::Studies { statuses, limit },
        Some("studies") => return Err(UsageError("studies takes no arguments".to_owned())),
        Some("study") => Action::Study { uid: uid(&words)?, patient_values },
        Some("complete") => command(Command::Complete)?,
        Some("hold") => command(Command::Hold)?,
        Some("release") => command(Command::Release)?,
        Some("discard") => command(Command::Discard)?,
        Some("reindex") => command(Command::Reindex)?,
        Some(other) => return Err(UsageError(format!("unknown command {other:?}"))),
        None => return Err(UsageError("no command".to_owned())),
    };
    if !matches!(action, Action::Studies { .. }) && listing {
        return Err(UsageError("--status and --limit go with studies".to_owned()));
    }
    if !matches!(action, Action::Study { .. }) && patient_values {
        return Err(UsageError("--patient-values goes with study".to_owned()));
    }
    Ok(Args { server, json, action })
}

/// Runs `args` against the admin API and returns what to print.
pub async fn run(args: &Args) -> anyhow::Result<String> {
    let mut client = StudyAdminClient::connect(args.server.clone())
        .await
        .map_err(|e| anyhow::anyhow!("connect to the admin API at {}: {e}", args.server))?;
    let status = |e: tonic::Status| anyhow::anyhow!("{:?}: {}", e.code(), e.message());
    match &args.action {
        Action::Studies { statuses, limit } => {
            let req = pb::ListStudiesRequest { statuses: statuses.iter().map(|s| *s as i32).collect(), limit: *limit };
            let list = client.list_studies(req).await.map_err(status)?.into_inner();
            Ok(if args.json { list_json(&list) } else { list_table(&list) })
        }
        Action::Study { uid, patient_values } => {
            let req = pb::GetStudyRequest { study_instance_uid: uid.clone(), include_patient_values: *patient_values };
            let d = client.get_study(req).await.map_err(status)?.into_inner();
            Ok(if args.json { detail_json(&d) } else { detail_table(&d) })
        }
        Action::Command { command, uid } => {
            let req = pb::StudyRequest { study_instance_uid: uid.clone() };
            let d = match command {
                Command::Complete => client.force_complete(req).await,
                Command::Hold => client.hold(req).await,
                Command::Release => client.release(req).await,
                Command::Discard => client.discard(req).await,
                Command::Reindex => client.reindex(req).await,
            }
            .map_err(status)?
            .into_inner();
            Ok(if args.json { detail_json(&d) } else { detail_table(&d) })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<Args, UsageError> {
        let args: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        parse_args(&args, DEFAULT_SERVER)
    }

    #[test]
    fn parses_every_command() {
        let a = parse("--json studies --status open,held --status completed --limit 5").unwrap();
        let statuses = vec![pb::StudyStatus::Open, pb::StudyStatus::Held, pb::StudyStatus::Completed];
        assert_eq!((a.json, a.action), (true, Action::Studies { statuses, limit: 5 }));
        let a = parse("study 1.2.3 --patient-values --server http://h:1").unwrap();
        assert_eq!(a.server, "http://h:1");
        assert_eq!(a.action, Action::Study { uid: "1.2.3".into(), patient_values: true });
        for (word, command) in [
            ("complete", Command::Complete),
            ("hold", Command::Hold),
            ("release", Command::Release),
            ("discard", Command::Discard),
            ("reindex", Command::Reindex),
        ] {
            let a = parse(&format!("{word} 1.2.3")).unwrap();
            assert_eq!(a.action, Action::Command { command, uid: "1.2.3".into() });
        }
    }

    #[test]
    fn refuses_what_it_cannot_use() {
        for (line, says) in [
            ("", "no command"),
            ("studies --status maybe", "unknown status"),
            ("hold", "needs a StudyInstanceUID"),
            ("hold 1.2 1.3", "too many"),
            ("frobnicate 1.2", "unknown command"),
            ("hold 1.2 --status open", "go with studies"),
            ("studies --patient-values", "goes with study"),
            ("studies --limit x", "not a number"),
            ("studies --server", "needs a value"),
            ("studies --jsn", "unknown option"),
        ] {
            let e = parse(line).unwrap_err().to_string();
            assert!(e.contains(says) && e.contains("usage:"), "{line:?}: {e}");
        }
    }
}
