//! The command line of `bidsflux-provisioner`.

use std::path::PathBuf;

use bidsflux_config::secrets::Origin;

use crate::secrets;

/// `bidsflux-provisioner --help`.
pub const USAGE: &str = "\
usage: bidsflux-provisioner [COMMAND] [--dry-run] [OPTIONS]

Commands (each can be run again at any time; what is already as wanted is kept):
  bus        the JetStream streams, consumers, KV buckets and object stores (the default: what the
             stack's provisioner job runs), on NATS_URL
  secrets    the secrets with random values (S3 credentials, GitLab's root password)
  gitlab     GitLab as the pipelines need it: the group NI_DATAOPS_GITLAB_ROOT and its projects
             ci-pipelines and containers, the users dicom_bot and bids_bot, their tokens and SSH
             keys (into secrets), GitLab's SSH host keys, the instance CI/CD variables
  runners    the four instance runners (dind; untagged, bids, preproc) and the config.toml of
             each runner service (into secrets)
  up         secrets, gitlab, runners and bus, in that order

Options:
  --dry-run                print what would be done, change nothing; exit 2 if something would
                           change, 0 if nothing would
  --docker-host URL        where secrets are kept: the swarm of this manager's Engine API
                           (default: $DOCKER_HOST, else unix:///var/run/docker.sock)
  --secrets-dir DIR        keep secrets as files DIR/<name> (mode 0600) instead, for a host
                           without swarm
  --rotate NAME            make the next version of the secret NAME (NAME_v2, ...): a random
                           value, a GitLab token, an SSH key or a runner config; repeatable
  --reveal-to FILE         secrets: write the values to keep (GitLab's root password) to FILE
                           (mode 0600) instead of showing them once on standard error
  --gitlab-token-file FILE gitlab, runners: an administrator's personal access token (scopes
                           api, admin_mode; default: $GITLAB_ADMIN_TOKEN_FILE)
  --secrets-from DIR       gitlab: where swarm secrets are mounted for this process (e.g.
                           /run/secrets), to read the S3 secret for its CI variable

Settings (environment): GITLAB_URL (or GITLAB_HOST), NI_DATAOPS_GITLAB_ROOT, BOT_EMAIL_DOMAIN
(or GITLAB_BOT_EMAIL), GIT_SSH_PORT, BIDSFLUX_GITLAB_SSH_HOST, NATS_URL; docs/provisioning.md.

Output: one line per object, `create`, `update` or `keep`, never a secret's value.
Exit: 0 done (or nothing to change), 1 error, 2 a dry run found changes.";

/// What to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// The bus topology.
    Bus,
    /// The random secrets.
    Secrets,
    /// GitLab's group, projects, bots, tokens, keys and variables.
    Gitlab,
    /// The runners.
    Runners,
    /// All of them.
    Up,
    /// `--help`.
    Help,
}

impl Command {
    fn name(self) -> &'static str {
        match self {
            Self::Bus => "bus",
            Self::Secrets => "secrets",
            Self::Gitlab => "gitlab",
            Self::Runners => "runners",
            Self::Up => "up",
            Self::Help => "help",
        }
    }

    /// Whether this command runs `part`.
    pub fn runs(self, part: Self) -> bool {
        self == part || (self == Self::Up && part != Self::Help)
    }
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
    /// Where secrets are kept.
    pub target: Target,
    /// Rotations and where to reveal.
    pub options: secrets::Options,
    /// The administrator's token for GitLab.
    pub gitlab_token_file: Option<PathBuf>,
    /// Where swarm secrets are mounted for this process.
    pub secrets_from: Option<PathBuf>,
}

/// The command that handles the secret `name`, or why there is none.
fn rotated_by(name: &str) -> Result<Command, String> {
    match secrets::site_secret(name) {
        Some(Origin::Generated { .. }) => Ok(Command::Secrets),
        Some(Origin::GitlabToken | Origin::SshKey | Origin::KnownHosts) => Ok(Command::Gitlab),
        Some(Origin::RunnerConfig) => Ok(Command::Runners),
        None => Err(format!("{name} is not a secret of the site (known: {})", secrets::known())),
    }
}

/// Parses the arguments after the program name; `docker_host` is `$DOCKER_HOST` if set.
pub fn parse_args(args: &[String], docker_host: Option<&str>) -> Result<Args, String> {
    let mut it = args.iter().map(String::as_str).peekable();
    let name = match it.peek() {
        Some(a) if !a.starts_with('-') => it.next(),
        _ => None,
    };
    let command = match name {
        None | Some("bus") => Command::Bus,
        Some("secrets") => Command::Secrets,
        Some("gitlab") => Command::Gitlab,
        Some("runners") => Command::Runners,
        Some("up") => Command::Up,
        Some("help") => Command::Help,
        Some(other) => return Err(format!("unknown command {other}")),
    };
    let mut dry_run = false;
    let mut host = docker_host.filter(|h| !h.is_empty()).unwrap_or("unix:///var/run/docker.sock").to_owned();
    let mut options = secrets::Options::default();
    let mut dir: Option<PathBuf> = None;
    let mut gitlab_token_file = None;
    let mut secrets_from = None;
    let mut given_host = false;
    while let Some(a) = it.next() {
        let mut value = |flag: &str| it.next().map(str::to_owned).ok_or_else(|| format!("{flag} needs a value"));
        // The commands each option is for.
        let allowed: &[Command] = match a {
            "--dry-run" => {
                dry_run = true;
                continue;
            }
            "-h" | "--help" => {
                return Ok(Args {
                    command: Command::Help,
                    dry_run,
                    target: Target::Swarm(host),
                    options,
                    gitlab_token_file,
                    secrets_from,
                });
            }
            "--docker-host" => {
                host = value(a)?;
                given_host = true;
                &[Command::Secrets, Command::Gitlab, Command::Runners]
            }
            "--secrets-dir" => {
                dir = Some(PathBuf::from(value(a)?));
                &[Command::Secrets, Command::Gitlab, Command::Runners]
            }
            "--rotate" => {
                options.rotate.push(value(a)?);
                &[Command::Secrets, Command::Gitlab, Command::Runners]
            }
            "--reveal-to" => {
                options.reveal_to = Some(PathBuf::from(value(a)?));
                &[Command::Secrets]
            }
            "--gitlab-token-file" => {
                gitlab_token_file = Some(PathBuf::from(value(a)?));
                &[Command::Gitlab, Command::Runners]
            }
            "--secrets-from" => {
                secrets_from = Some(PathBuf::from(value(a)?));
                &[Command::Gitlab]
            }
            other => return Err(format!("unknown option {other}")),
        };
        if command != Command::Help && !allowed.iter().any(|c| command.runs(*c)) {
            let names: Vec<&str> = allowed.iter().map(|c| c.name()).collect();
            return Err(format!("{a} is an option of `{}` (and `up`)", names.join("`, `")));
        }
    }
    if dir.is_some() && given_host {
        return Err("--docker-host and --secrets-dir exclude each other".to_owned());
    }
    for name in &options.rotate {
        let by = rotated_by(name)?;
        if !command.runs(by) {
            return Err(if by == Command::Secrets || command != Command::Secrets {
                format!("{name} is rotated by `bidsflux-provisioner {}` (or `up`)", by.name())
            } else {
                format!(
                    "{name} is not a random secret: GitLab tokens, SSH keys and runner configs are rotated by `bidsflux-provisioner gitlab` and `runners`"
                )
            });
        }
    }
    options.placeholders = command == Command::Secrets;
    let target = dir.map_or(Target::Swarm(host), Target::Dir);
    Ok(Args { command, dry_run, target, options, gitlab_token_file, secrets_from })
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
        let a = parse(&[]).unwrap();
        assert_eq!((a.command, a.dry_run), (Command::Bus, false));
        assert!(parse(&["--dry-run"]).unwrap().dry_run);
        assert_eq!(parse(&["bus", "--dry-run"]).unwrap().command, Command::Bus);
        let a = parse(&["secrets", "--rotate", "s3_secret", "--reveal-to", "/root/keep", "--dry-run"]).unwrap();
        assert!(a.dry_run);
        assert_eq!(a.command, Command::Secrets);
        assert_eq!(a.target, Target::Swarm("unix:///x.sock".into()));
        assert_eq!(
            a.options,
            secrets::Options {
                rotate: vec!["s3_secret".into()],
                reveal_to: Some(PathBuf::from("/root/keep")),
                placeholders: true
            }
        );
        let a = parse_args(&["secrets".to_owned()], None).unwrap();
        assert_eq!(a.target, Target::Swarm("unix:///var/run/docker.sock".into()));
        let a = parse(&["secrets", "--secrets-dir", "/etc/bidsflux/secrets"]).unwrap();
        assert_eq!(a.target, Target::Dir(Path::new("/etc/bidsflux/secrets").into()));
        assert!(
            parse(&["secrets", "--secrets-dir", "/d", "--docker-host", "unix:///s"]).unwrap_err().contains("exclude")
        );
        assert!(parse(&["bus", "--rotate", "s3_id"]).unwrap_err().contains("option of `secrets`"));
        assert!(parse(&["secrets", "--rotate"]).unwrap_err().contains("needs a value"));
        assert!(parse(&["frobnicate"]).unwrap_err().contains("unknown command"));
        assert!(parse(&["--force"]).unwrap_err().contains("unknown option"));
        assert_eq!(parse(&["--help"]).unwrap().command, Command::Help);
    }

    #[test]
    fn rotations_go_to_the_command_that_makes_the_secret() {
        assert!(parse(&["secrets", "--rotate", "dicom_bot_gitlab_token"]).unwrap_err().contains("not a random secret"));
        assert!(parse(&["secrets", "--rotate", "nope"]).unwrap_err().contains("not a secret of the site"));
        assert!(parse(&["gitlab", "--rotate", "s3_id"]).unwrap_err().contains("`bidsflux-provisioner secrets`"));
        assert!(parse(&["gitlab", "--rotate", "gitlab_runner_proc_config"]).unwrap_err().contains("runners"));
        let a = parse(&["gitlab", "--rotate", "bids_bot_gitlab_token", "--gitlab-token-file", "/t"]).unwrap();
        assert_eq!(a.gitlab_token_file, Some(PathBuf::from("/t")));
        let a = parse(&["up", "--rotate", "s3_id", "--rotate", "gitlab_runner_data_config", "--secrets-dir", "/d"])
            .unwrap();
        assert_eq!((a.command, a.options.rotate.len(), a.options.placeholders), (Command::Up, 2, false));
        assert!(parse(&["runners", "--reveal-to", "/k"]).unwrap_err().contains("option of `secrets`"));
        assert!(parse(&["gitlab", "--secrets-from", "/run/secrets"]).is_ok());
        assert!(Command::Up.runs(Command::Bus) && !Command::Gitlab.runs(Command::Runners));
    }
}
