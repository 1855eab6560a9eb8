//! The command line of `bidsflux-provisioner`.

use std::path::PathBuf;

use crate::secrets;

/// `bidsflux-provisioner --help`.
pub const USAGE: &str = "\
usage: bidsflux-provisioner [COMMAND] [--dry-run] [OPTIONS]

Commands (each can be run again at any time; what is already as wanted is kept):
  bus        the JetStream streams, consumers, KV buckets and object stores (the default: what the
             stack's provisioner job runs), on NATS_URL
  secrets    the swarm secrets with random values (S3 credentials, GitLab's root password),
             through the Docker Engine API of a swarm manager

Options:
  --dry-run             print what would be done, change nothing; exit 2 if something would
                        change, 0 if nothing would
  --docker-host URL     secrets: the swarm manager's Engine API (default: $DOCKER_HOST,
                        else unix:///var/run/docker.sock)
  --secrets-dir DIR     secrets: keep them as files DIR/<name> (mode 0600) instead of in
                        a swarm, for a host without one
  --rotate NAME         secrets: create the next version of NAME (NAME_v2, ...); repeatable
  --reveal-to FILE      secrets: write the values to keep (GitLab's root password) to FILE
                        (mode 0600) instead of showing them once on standard error

Output: one line per object, `create`, `update` or `keep`, never a secret's value.
Exit: 0 done (or nothing to change), 1 error, 2 a dry run found changes.";

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// The bus topology.
    Bus,
    /// The random secrets.
    Secrets {
        /// Where they are kept.
        target: Target,
        /// Rotations and where to reveal.
        options: secrets::Options,
    },
    /// `--help`.
    Help,
}

/// Where secrets are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The swarm of the Engine API at this URL.
    Swarm(String),
    /// Files in this directory.
    Dir(PathBuf),
}

/// The parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    /// What to run.
    pub command: Command,
    /// Change nothing, print the plan.
    pub dry_run: bool,
}

/// Parses the arguments after the program name; `docker_host` is `$DOCKER_HOST` if set.
pub fn parse_args(args: &[String], docker_host: Option<&str>) -> Result<Args, String> {
    let mut it = args.iter().map(String::as_str).peekable();
    let name = match it.peek() {
        Some(a) if !a.starts_with('-') => it.next(),
        _ => None,
    };
    let mut dry_run = false;
    let mut host = docker_host.filter(|h| !h.is_empty()).unwrap_or("unix:///var/run/docker.sock").to_owned();
    let mut options = secrets::Options::default();
    let mut dir: Option<PathBuf> = None;
    let mut secrets_only = Vec::new();
    while let Some(a) = it.next() {
        let mut value = |flag: &str| it.next().map(str::to_owned).ok_or_else(|| format!("{flag} needs a value"));
        match a {
            "--dry-run" => dry_run = true,
            "-h" | "--help" => return Ok(Args { command: Command::Help, dry_run }),
            "--docker-host" => {
                host = value(a)?;
                secrets_only.push(a);
            }
            "--secrets-dir" => {
                dir = Some(PathBuf::from(value(a)?));
                secrets_only.push(a);
            }
            "--rotate" => {
                options.rotate.push(value(a)?);
                secrets_only.push(a);
            }
            "--reveal-to" => {
                options.reveal_to = Some(PathBuf::from(value(a)?));
                secrets_only.push(a);
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    let command = match name {
        None | Some("bus") => Command::Bus,
        Some("secrets") => {
            if dir.is_some() && secrets_only.contains(&"--docker-host") {
                return Err("--docker-host and --secrets-dir exclude each other".to_owned());
            }
            let target = dir.map_or(Target::Swarm(host), Target::Dir);
            Command::Secrets { target, options }
        }
        Some("help") => Command::Help,
        Some(other) => return Err(format!("unknown command {other}")),
    };
    if let (Command::Bus, Some(flag)) = (&command, secrets_only.first()) {
        return Err(format!("{flag} is an option of `secrets`"));
    }
    Ok(Args { command, dry_run })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn parse(args: &[&str]) -> Result<Args, String> {
        parse_args(&args.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>(), Some("unix:///x.sock"))
    }

    #[test]
    fn commands_and_options() {
        assert_eq!(parse(&[]).unwrap(), Args { command: Command::Bus, dry_run: false });
        assert_eq!(parse(&["--dry-run"]).unwrap(), Args { command: Command::Bus, dry_run: true });
        assert_eq!(parse(&["bus", "--dry-run"]).unwrap().command, Command::Bus);
        let a = parse(&["secrets", "--rotate", "s3_secret", "--reveal-to", "/root/keep", "--dry-run"]).unwrap();
        assert!(a.dry_run);
        assert_eq!(
            a.command,
            Command::Secrets {
                target: Target::Swarm("unix:///x.sock".into()),
                options: secrets::Options {
                    rotate: vec!["s3_secret".into()],
                    reveal_to: Some(PathBuf::from("/root/keep"))
                }
            }
        );
        let a = parse_args(&["secrets".to_owned()], None).unwrap();
        assert!(
            matches!(a.command, Command::Secrets { target: Target::Swarm(h), .. } if h == "unix:///var/run/docker.sock")
        );
        let a = parse(&["secrets", "--secrets-dir", "/etc/bidsflux/secrets"]).unwrap();
        assert!(
            matches!(a.command, Command::Secrets { target: Target::Dir(d), .. } if d == Path::new("/etc/bidsflux/secrets"))
        );
        assert!(
            parse(&["secrets", "--secrets-dir", "/d", "--docker-host", "unix:///s"]).unwrap_err().contains("exclude")
        );
        assert!(parse(&["bus", "--rotate", "s3_id"]).unwrap_err().contains("secrets"));
        assert!(parse(&["secrets", "--rotate"]).unwrap_err().contains("needs a value"));
        assert!(parse(&["frobnicate"]).unwrap_err().contains("unknown command"));
        assert!(parse(&["--force"]).unwrap_err().contains("unknown option"));
        assert_eq!(parse(&["--help"]).unwrap().command, Command::Help);
    }
}
