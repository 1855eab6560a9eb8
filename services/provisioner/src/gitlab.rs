//! `bidsflux-provisioner gitlab`: what the original `init_ni-dataops.py` made by hand, made so
//! that it can be run again at any time.
//!
//! In order, each object looked up before it is created (GitLab answers 409 for some duplicates
//! and 400 for others):
//! 1. the token is an administrator's;
//! 2. the values the CI variables need and that are read, not made (the S3 secret), are there
//!    and GitLab can mask them — checked before any write;
//! 3. the group `NI_DATAOPS_GITLAB_ROOT` (internal) and its projects `ci-pipelines` and
//!    `containers` (internal: every user's pipelines may include their files), seeded with the
//!    files of `services/provisioner/gitlab/` that are missing (a file the site edited is kept);
//! 4. the users `dicom_bot` (the indexer's) and `bids_bot` (the BIDS pipelines', an
//!    administrator as in the original: its pipelines work on every study's projects);
//! 5. a personal access token of each (name `bidsflux`, scopes and expiry explicit), created or
//!    rotated straight into its secret, whose label holds the token's GitLab id: a token whose
//!    secret is lost, or whose secret holds another (revoked) token, is rotated, not recreated;
//!    one closer than `renew_days` to its expiry is rotated too;
//! 6. each bot's SSH key pair: the private key in a secret (its public half in the secret's
//!    label), then the public key on the user (`dicom_bot`'s for the indexer's git over SSH,
//!    `bids_bot`'s for the pipelines' `BOT_SSH_KEY`);
//! 7. GitLab's SSH host keys (`ssh-keyscan`), in a secret;
//! 8. the instance CI/CD variables the BIDS pipelines read.
//!
//! A crash (or a GitLab failure) anywhere leaves what is done done; the next run finds it and
//! finishes. No value is printed, logged or put in an error.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::Context as _;
use bidsflux_config::secrets::{self as names, SiteSecret};
use bidsflux_gitlab_api::Fail;
use serde_json::Value;
use sha2::Digest as _;

use crate::plan::{Change, Plan};
use crate::rest::{Rest, esc};
use crate::secrets::{Labels, SHA256_LABEL, Store, Stored};
use crate::site::{Site, fail, id, sha256_hex, text};

/// Label of a token's secret: the token's id in GitLab.
pub const TOKEN_ID_LABEL: &str = "org.bidsflux.gitlab-token-id";
/// Label of the SSH key's secret: its public key (OpenSSH format).
pub const PUBLIC_KEY_LABEL: &str = "org.bidsflux.public-key";
/// Name of the bots' personal access tokens in GitLab (how a run finds them again).
pub const TOKEN_NAME: &str = "bidsflux";
/// Title of the bot's SSH key in GitLab.
pub const KEY_TITLE: &str = "bidsflux";
/// The branch of the seeded projects.
pub const BRANCH: &str = "main";

/// A bot user.
#[derive(Debug, Clone, Copy)]
pub struct Bot {
    /// Its username.
    pub username: &'static str,
    /// Its display name.
    pub name: &'static str,
    /// The secret of its token.
    pub secret: &'static str,
    /// Its token's scopes.
    pub scopes: &'static [&'static str],
    /// An administrator (as the original's bots were): `bids_bot`'s pipelines work on every
    /// study's projects. `dicom_bot` is not one: it creates the study groups it then owns.
    pub admin: bool,
    /// The secret of its SSH private key.
    pub ssh_key: &'static str,
}

/// The bots: `dicom_bot` creates the study groups and projects and pushes the datasets
/// (`api`; git over HTTPS with the token, or SSH with its key); `bids_bot` runs the BIDS
/// pipelines' API calls and pushes (`api`, repositories, the `containers` registry; its key is
/// the pipelines' `BOT_SSH_KEY`).
pub const BOTS: [Bot; 2] = [
    Bot {
        username: "dicom_bot",
        name: "DICOM bot",
        secret: names::DICOM_BOT_GITLAB_TOKEN,
        scopes: &["api", "read_repository", "write_repository"],
        admin: false,
        ssh_key: names::DICOM_BOT_SSH_KEY,
    },
    Bot {
        username: "bids_bot",
        name: "BIDS bot",
        secret: names::BIDS_BOT_GITLAB_TOKEN,
        scopes: &["api", "read_repository", "write_repository", "read_registry", "write_registry"],
        admin: true,
        ssh_key: names::BIDS_BOT_SSH_KEY,
    },
];

/// The files each project of the root group is seeded with (path, content).
pub const SEEDS: [(&str, &[(&str, &str)]); 2] = [
    (
        "ci-pipelines",
        &[
            ("README.md", include_str!("../gitlab/ci-pipelines/README.md")),
            ("bids.yml", include_str!("../gitlab/ci-pipelines/bids.yml")),
            ("study.yml", include_str!("../gitlab/ci-pipelines/study.yml")),
        ],
    ),
    ("containers", &[("README.md", include_str!("../gitlab/containers/README.md"))]),
];

/// How an instance CI/CD variable is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variable {
    /// Its key.
    pub key: &'static str,
    /// `env_var` or `file`.
    pub variable_type: &'static str,
    /// Masked in job logs.
    pub masked: bool,
    /// Only on protected branches and tags.
    pub protected: bool,
    /// Not expanded (`$` kept).
    pub raw: bool,
}

/// The instance variables, as the original set them: the BIDS pipelines clone and push with
/// `bids_bot`'s token and the SSH key, and read archives from S3.
pub const VARIABLES: [Variable; 6] = [
    Variable { key: "BIDS_API_TOKEN", variable_type: "env_var", masked: true, protected: false, raw: true },
    Variable { key: "BOT_SSH_KEY", variable_type: "file", masked: false, protected: false, raw: true },
    Variable { key: "GIT_BOT_USERNAME", variable_type: "env_var", masked: false, protected: false, raw: true },
    Variable { key: "GIT_BOT_EMAIL", variable_type: "env_var", masked: false, protected: false, raw: true },
    Variable { key: "S3_SECRET", variable_type: "env_var", masked: true, protected: false, raw: true },
    Variable { key: "SSH_KNOWN_HOSTS", variable_type: "file", masked: false, protected: false, raw: true },
];

/// Whether GitLab can mask `value` (`\A[a-zA-Z0-9_+=/@:.~-]{8,}\z`).
pub fn maskable(value: &str) -> bool {
    value.len() >= 8 && value.bytes().all(|c| c.is_ascii_alphanumeric() || b"_+=/@:.~-".contains(&c))
}

/// Values learnt or made during the run (never printed), by secret or variable name.
#[derive(Default)]
struct Values(BTreeMap<String, String>);

impl Values {
    fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }
    fn set(&mut self, k: &str, v: String) {
        self.0.insert(k.to_owned(), v);
    }
}

/// The description of a variable whose value comes from a secret: names the secret and the
/// SHA-256 of the value (never the value), so that a run that cannot read the secret can still
/// tell whether the variable holds its latest version.
fn describe(source: &str, value: &str) -> String {
    format!("set by bidsflux-provisioner from the secret {source}; sha256 {}", sha256_hex(value))
}

/// Whether the variable `var` holds the value of `stored` (by the SHA-256 in its description).
/// A secret made before labels cannot be compared: it is taken to match.
fn var_holds(var: Option<&Value>, stored: Option<&Stored>) -> bool {
    let (Some(var), Some(stored)) = (var, stored) else { return false };
    let Some(sha) = stored.labels.get(SHA256_LABEL) else { return true };
    text(var, "description").ends_with(&format!("; sha256 {sha}"))
}

/// Runs the `gitlab` command.
pub async fn run(site: &Site<'_>, plan: &mut Plan) -> anyhow::Result<()> {
    let me = site.get("the administrator's token", Rest::get("user")).await?.unwrap_or_default();
    if me.get("is_admin").and_then(Value::as_bool) != Some(true) {
        anyhow::bail!(
            "the GitLab token belongs to {:?}, who is not an administrator: make a personal access token as an administrator (scopes api and admin_mode)",
            text(&me, "username")
        );
    }
    let variables = existing_variables(site).await?;
    let mut values = Values::default();
    preflight(site, plan.dry_run, &variables, &mut values).await?;

    let group = root_group(site, plan).await?;
    for (project, files) in SEEDS {
        seed_project(site, plan, group, project, files).await?;
    }
    let mut users = BTreeMap::new();
    for bot in BOTS {
        let uid = user(site, plan, &bot).await?;
        users.insert(bot.username, uid);
    }
    for bot in BOTS {
        let var = (bot.secret == names::BIDS_BOT_GITLAB_TOKEN).then(|| variables.get("BIDS_API_TOKEN"));
        token(site, plan, &bot, users[bot.username], var, &mut values).await?;
    }
    for bot in BOTS {
        let var = (bot.ssh_key == names::BIDS_BOT_SSH_KEY).then(|| variables.get("BOT_SSH_KEY"));
        ssh_key(site, plan, &bot, users[bot.username], var, &mut values).await?;
    }
    known_hosts(site, plan, &mut values).await?;
    values.set("GIT_BOT_USERNAME", "bids_bot".to_owned());
    values.set("GIT_BOT_EMAIL", format!("bids_bot@{}", site.settings.email_domain));
    for v in &VARIABLES {
        variable(site, plan, v, variables.get(v.key), &values).await?;
    }
    Ok(())
}

/// Which secret or setting a variable's value comes from.
fn source_of(key: &str) -> &'static str {
    match key {
        "BIDS_API_TOKEN" => names::BIDS_BOT_GITLAB_TOKEN,
        "BOT_SSH_KEY" => names::BIDS_BOT_SSH_KEY,
        "S3_SECRET" => names::S3_SECRET,
        "SSH_KNOWN_HOSTS" => names::SSH_KNOWN_HOSTS,
        _ => "",
    }
}

async fn existing_variables(site: &Site<'_>) -> anyhow::Result<BTreeMap<String, Value>> {
    let list = site.list("the instance CI/CD variables", Rest::get("admin/ci/variables")).await?;
    Ok(list.into_iter().map(|v| (text(&v, "key").to_owned(), v)).collect())
}

/// Reads the S3 secret and checks, before anything is written, that GitLab will take it.
async fn preflight(
    site: &Site<'_>,
    dry_run: bool,
    variables: &BTreeMap<String, Value>,
    values: &mut Values,
) -> anyhow::Result<()> {
    let stored = site.latest(names::S3_SECRET).await?;
    // An operator's file may end with a newline, which services drop too.
    let value =
        site.read_latest(stored.as_ref(), names::S3_SECRET)?.map(|v| v.trim_end_matches(['\r', '\n']).to_owned());
    match value {
        Some(v) => {
            if !maskable(&v) {
                anyhow::bail!(
                    "CI variable S3_SECRET: GitLab cannot mask the value of the secret {} (it needs at least 8 characters of a-z A-Z 0-9 _ + = / @ : . ~ -); nothing was written",
                    names::S3_SECRET
                );
            }
            values.set(names::S3_SECRET, v);
        }
        // A dry run of `up` plans the secret before this: it does not exist yet.
        None if dry_run && stored.is_none() => {}
        None if variables.contains_key("S3_SECRET") && !var_holds(variables.get("S3_SECRET"), stored.as_ref()) => {
            anyhow::bail!(
                "CI variable S3_SECRET does not hold the latest version of the secret {} ({}), which this process cannot read: run where that version is mounted (--secrets-from) or with --secrets-dir; nothing was written",
                names::S3_SECRET,
                stored.as_ref().map_or("", |s| s.name.as_str())
            )
        }
        None if !variables.contains_key("S3_SECRET") => anyhow::bail!(
            "CI variable S3_SECRET needs the value of the secret {}, which this process cannot read: run `bidsflux-provisioner secrets` first, and run `gitlab` where the secret is mounted (--secrets-from /run/secrets) or with --secrets-dir; nothing was written",
            names::S3_SECRET
        ),
        None => {}
    }
    Ok(())
}

/// The root group; `None` in a dry run that would create it.
async fn root_group(site: &Site<'_>, plan: &mut Plan) -> anyhow::Result<Option<u64>> {
    let path = &site.settings.root_group;
    let object = format!("group {path}");
    if let Some(g) = site.get(&object, Rest::get(format!("groups/{}", esc(path)))).await? {
        plan.record(Change::Keep, "gitlab group", path, None);
        return Ok(Some(id(&g)?));
    }
    if plan.dry_run {
        plan.record(Change::Create, "gitlab group", path, Some("internal".into()));
        return Ok(None);
    }
    let create = Rest::post("groups").form("name", path).form("path", path).form("visibility", "internal");
    let g = match site.write(create).await {
        Ok(g) => g,
        Err(Fail::Taken(_) | Fail::Conflict(_)) => site
            .get(&object, Rest::get(format!("groups/{}", esc(path))))
            .await?
            .ok_or_else(|| anyhow::anyhow!("{object}: the path is taken by a user or a group this token cannot see"))?,
        Err(f) => return Err(fail(&object, f)),
    };
    plan.record(Change::Create, "gitlab group", path, Some("internal".into()));
    Ok(Some(id(&g)?))
}

/// A project of the root group, and its seed files that are missing (committed in one commit).
async fn seed_project(
    site: &Site<'_>,
    plan: &mut Plan,
    group: Option<u64>,
    project: &str,
    files: &[(&str, &str)],
) -> anyhow::Result<()> {
    let full = format!("{}/{project}", site.settings.root_group);
    let object = format!("project {full}");
    let mut pid = match site.get(&object, Rest::get(format!("projects/{}", esc(&full)))).await? {
        Some(p) => {
            plan.record(Change::Keep, "gitlab project", &full, None);
            Some(id(&p)?)
        }
        None => None,
    };
    if pid.is_none() {
        if let (false, Some(gid)) = (plan.dry_run, group) {
            let create = Rest::post("projects")
                .form("name", project)
                .form("path", project)
                .form("namespace_id", gid)
                .form("visibility", "internal")
                .form("default_branch", BRANCH);
            let p = match site.write(create).await {
                Ok(p) => p,
                Err(Fail::Taken(_) | Fail::Conflict(_)) => site
                    .get(&object, Rest::get(format!("projects/{}", esc(&full))))
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("{object}: GitLab says it exists but does not show it"))?,
                Err(f) => return Err(fail(&object, f)),
            };
            pid = Some(id(&p)?);
        }
        plan.record(Change::Create, "gitlab project", &full, Some("internal".into()));
    }
    let mut missing = Vec::new();
    for (path, content) in files {
        let name = format!("{full}:{path}");
        let existing = match pid {
            Some(p) => {
                let r = Rest::get(format!("projects/{p}/repository/files/{}", esc(path))).query("ref", BRANCH);
                site.get(&format!("file {name}"), r).await?
            }
            None => None,
        };
        match existing {
            Some(f) => {
                let sha = hex::encode(sha2::Sha256::digest(content.as_bytes()));
                let note =
                    (text(&f, "content_sha256") != sha).then(|| "edited in GitLab: kept as the site has it".to_owned());
                plan.record(Change::Keep, "gitlab file", &name, note);
            }
            None => missing.push((*path, *content)),
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    if let (false, Some(p)) = (plan.dry_run, pid) {
        let mut commit = Rest::post(format!("projects/{p}/repository/commits"))
            .form("branch", BRANCH)
            .form("commit_message", "Seed from bidsflux-provisioner")
            .form("author_name", "bidsflux-provisioner");
        for (path, content) in &missing {
            commit = commit
                .form("actions[][action]", "create")
                .form("actions[][file_path]", path)
                .form("actions[][content]", content);
        }
        site.write(commit).await.map_err(|f| fail(&object, f))?;
    }
    for (path, _) in missing {
        plan.record(Change::Create, "gitlab file", &format!("{full}:{path}"), None);
    }
    Ok(())
}

/// A bot user; its id, `None` in a dry run that would
/// create it.
async fn user(site: &Site<'_>, plan: &mut Plan, bot: &Bot) -> anyhow::Result<Option<u64>> {
    let object = format!("user {}", bot.username);
    let find = || Rest::get("users").query("username", bot.username);
    let found = site.list(&object, find()).await?;
    let uid = if let Some(u) = found.first() {
        plan.record(Change::Keep, "gitlab user", bot.username, None);
        Some(id(u)?)
    } else {
        let email = format!("{}@{}", bot.username, site.settings.email_domain);
        let note = Some(format!("email {email}{}", if bot.admin { ", administrator" } else { "" }));
        if plan.dry_run {
            plan.record(Change::Create, "gitlab user", bot.username, note);
            None
        } else {
            let create = Rest::post("users")
                .form("username", bot.username)
                .form("name", bot.name)
                .form("email", &email)
                .form("force_random_password", true)
                .form("skip_confirmation", true)
                .form("can_create_group", true)
                .form("admin", bot.admin);
            let u = match site.write(create).await {
                Ok(u) => u,
                // Made meanwhile, or the email is another user's: look again, say which.
                Err(f @ (Fail::Conflict(_) | Fail::Taken(_))) => {
                    site.list(&object, find()).await?.into_iter().next().ok_or_else(|| fail(&object, f))?
                }
                Err(f) => return Err(fail(&object, f)),
            };
            plan.record(Change::Create, "gitlab user", bot.username, note);
            Some(id(&u)?)
        }
    };
    Ok(uid)
}

/// Whether `stored` is the placeholder `secrets` made for the first deploy.
pub fn placeholder(stored: Option<&Stored>) -> bool {
    stored.is_some_and(|s| s.labels.contains_key(crate::secrets::PLACEHOLDER_LABEL))
}

/// What the operator does to use a new version of a secret.
fn switch_hint(store: &Store, secret: &SiteSecret, name: &str) -> Option<String> {
    if secrets_version(name) <= 1 {
        return None;
    }
    let variable = VARIABLES.iter().find(|v| source_of(v.key) == secret.name);
    Some(match (secret.in_stack, variable) {
        (true, _) => store.rotation_hint(secret.name, name),
        (false, Some(v)) => format!("new version of {}: the CI variable {} is updated by this run", secret.name, v.key),
        (false, None) => format!(
            "new version of {}: point what reads it (e.g. the indexer's GITLAB_SSH_KEY_FILE) at {name}",
            secret.name
        ),
    })
}

fn secrets_version(name: &str) -> u32 {
    name.rsplit_once("_v").and_then(|(_, n)| n.parse().ok()).unwrap_or(1)
}

/// Stores a new version of `base`; an error if a version of that name appeared meanwhile.
async fn store_new(
    site: &Site<'_>,
    plan: &mut Plan,
    base: &str,
    stored: Option<&Stored>,
    value: &str,
    labels: &Labels,
    why: &str,
) -> anyhow::Result<()> {
    let name = Stored::next_name(stored, base);
    let secret = names::get(base).ok_or_else(|| anyhow::anyhow!("{base} is not a secret of the site"))?;
    let note = switch_hint(site.store, secret, &name).map_or_else(|| why.to_owned(), |h| format!("{why}; {h}"));
    if !plan.dry_run && !site.store.create_labeled(&name, base, value, labels).await? {
        anyhow::bail!("the secret {name} was created by someone else meanwhile: run again");
    }
    plan.record(Change::Create, "secret", &name, Some(note));
    Ok(())
}

/// A bot's token: kept when its secret holds the active token, else created or rotated into a
/// new version of its secret.
async fn token(
    site: &Site<'_>,
    plan: &mut Plan,
    bot: &Bot,
    uid: Option<u64>,
    var: Option<Option<&Value>>,
    values: &mut Values,
) -> anyhow::Result<()> {
    let object = format!("token of {}", bot.username);
    let stored = site.latest(bot.secret).await?;
    let need_value = var.is_some_and(|v| !var_holds(v, stored.as_ref()));
    let active: Vec<Value> = match uid {
        Some(u) => site
            .list(&object, Rest::get("personal_access_tokens").query("user_id", u).query("state", "active"))
            .await?
            .into_iter()
            .filter(|t| text(t, "name") == TOKEN_NAME && t.get("active").and_then(Value::as_bool) != Some(false))
            .collect(),
        None => Vec::new(),
    };
    let held = stored.as_ref().and_then(|s| s.labels.get(TOKEN_ID_LABEL)).and_then(|i| i.parse::<u64>().ok());
    let current = active.iter().find(|t| t.get("id").and_then(Value::as_u64) == held.or(Some(u64::MAX)));
    let today = chrono::Utc::now().date_naive();
    let renew_by = today + chrono::Days::new(site.settings.renew_days.into());
    let expires = current.and_then(|t| t.get("expires_at")).and_then(Value::as_str).map(str::to_owned);
    let known = site.read_latest(stored.as_ref(), bot.secret)?;
    let why = match current {
        _ if site.rotating(bot.secret) => "rotation asked for".to_owned(),
        None if stored.is_none() && active.is_empty() => "new".to_owned(),
        None if active.is_empty() && placeholder(stored.as_ref()) => "replaces the placeholder".to_owned(),
        None if active.is_empty() => "the stored token is not active in GitLab".to_owned(),
        None => "its value is not stored (lost)".to_owned(),
        Some(_)
            if expires.as_deref().and_then(|e| e.parse::<chrono::NaiveDate>().ok()).is_some_and(|e| e <= renew_by) =>
        {
            format!("expires on {}", expires.unwrap_or_default())
        }
        Some(_) if need_value && known.is_none() => {
            "BIDS_API_TOKEN is missing or holds another token, and the value is not readable here".to_owned()
        }
        Some(_) => {
            plan.record(
                Change::Keep,
                "gitlab token",
                &format!("{} {TOKEN_NAME}", bot.username),
                expires.map(|e| format!("expires on {e}")),
            );
            if let Some(v) = known {
                values.set(bot.secret, v);
            }
            return Ok(());
        }
    };
    let expires_at = (today + chrono::Days::new(site.settings.token_days.saturating_sub(1).into())).to_string();
    // Rotate rather than make another: GitLab revokes the old one. The stored token if it is
    // active (a rotation asked for, an expiry), else the newest active one (a lost value).
    let newest = current
        .and_then(|t| t.get("id").and_then(Value::as_u64))
        .or_else(|| active.iter().filter_map(|t| t.get("id").and_then(Value::as_u64)).max());
    let change_note = if why == "new" {
        format!("scopes {}, expires on {expires_at}", bot.scopes.join(","))
    } else {
        format!("{why}; scopes {}, expires on {expires_at}", bot.scopes.join(","))
    };
    let token_note = |verb: &str| if why == "new" { change_note.clone() } else { format!("{verb}: {change_note}") };
    if plan.dry_run {
        let verb = if newest.is_some() { "rotate" } else { "new" };
        plan.record(Change::Create, "gitlab token", &format!("{} {TOKEN_NAME}", bot.username), Some(token_note(verb)));
        plan.record(Change::Create, "secret", &Stored::next_name(stored.as_ref(), bot.secret), Some(why));
        return Ok(());
    }
    let uid = uid.ok_or_else(|| anyhow::anyhow!("{object}: the user does not exist"))?;
    let made = match newest {
        Some(t) => site
            .write(Rest::post(format!("personal_access_tokens/{t}/rotate")).form("expires_at", &expires_at))
            .await
            .map_err(|f| fail(&object, f))?,
        None => {
            let mut create = Rest::post(format!("users/{uid}/personal_access_tokens"))
                .form("name", TOKEN_NAME)
                .form("expires_at", &expires_at);
            for s in bot.scopes {
                create = create.form("scopes[]", s);
            }
            site.write(create).await.map_err(|f| fail(&object, f))?
        }
    };
    let value = text(&made, "token").to_owned();
    if value.is_empty() {
        anyhow::bail!("{object}: GitLab's answer holds no token");
    }
    let verb = if newest.is_some() { "rotated" } else { "new" };
    plan.record(Change::Create, "gitlab token", &format!("{} {TOKEN_NAME}", bot.username), Some(token_note(verb)));
    let labels = Labels::from([(TOKEN_ID_LABEL.to_owned(), id(&made)?.to_string())]);
    store_new(site, plan, bot.secret, stored.as_ref(), &value, &labels, &why).await?;
    values.set(bot.secret, value);
    Ok(())
}

/// A bot's SSH key pair: private key in its secret first, then the public key on the user.
async fn ssh_key(
    site: &Site<'_>,
    plan: &mut Plan,
    bot: &Bot,
    uid: Option<u64>,
    var: Option<Option<&Value>>,
    values: &mut Values,
) -> anyhow::Result<()> {
    let base = bot.ssh_key;
    let stored = site.latest(base).await?;
    let need_value = var.is_some_and(|v| !var_holds(v, stored.as_ref()));
    let public = stored.as_ref().and_then(|s| s.labels.get(PUBLIC_KEY_LABEL)).cloned();
    let known = site.read_latest(stored.as_ref(), base)?;
    let why = match (&public, site.rotating(base)) {
        (_, true) => Some("rotation asked for"),
        (None, _) => Some("new"),
        (Some(_), _) if need_value && known.is_none() => {
            Some("BOT_SSH_KEY is missing or holds another key, and the key is not readable here")
        }
        _ => None,
    };
    let public = match why {
        None => {
            plan.record(Change::Keep, "secret", &stored.as_ref().map_or_else(String::new, |s| s.name.clone()), None);
            if let Some(k) = known {
                values.set(base, k);
            }
            public
        }
        Some(why) => {
            let (private, public) = new_key_pair(bot.username)?;
            let labels = Labels::from([(PUBLIC_KEY_LABEL.to_owned(), public.clone())]);
            store_new(site, plan, base, stored.as_ref(), &private, &labels, &format!("{why}: ed25519 key pair"))
                .await?;
            values.set(base, private);
            Some(public)
        }
    };
    let object = &format!("SSH key of {}", bot.username);
    let registered = match uid {
        Some(u) => site.list(object, Rest::get(format!("users/{u}/keys"))).await?,
        None => Vec::new(),
    };
    let blob = |k: &str| k.split_whitespace().nth(1).map(str::to_owned);
    let wanted = public.as_deref().and_then(blob);
    if registered.iter().any(|k| blob(text(k, "key")) == wanted && wanted.is_some()) {
        plan.record(Change::Keep, "gitlab ssh-key", bot.username, None);
        return Ok(());
    }
    if let (false, Some(u), Some(key)) = (plan.dry_run, uid, &public) {
        let add = Rest::post(format!("users/{u}/keys")).form("title", KEY_TITLE).form("key", key);
        match site.write(add).await {
            Ok(_) => {}
            Err(Fail::Taken(m)) => anyhow::bail!("{object}: the key is registered on another user: {m}"),
            Err(f) => return Err(fail(object, f)),
        }
    }
    plan.record(Change::Create, "gitlab ssh-key", bot.username, Some("ed25519".into()));
    Ok(())
}

/// A new ed25519 key pair: (private key in OpenSSH PEM, public key line).
pub fn new_key_pair(user: &str) -> anyhow::Result<(String, String)> {
    let key = ssh_key::PrivateKey::random(&mut ssh_key::rand_core::OsRng, ssh_key::Algorithm::Ed25519)
        .map_err(|e| anyhow::anyhow!("make an SSH key: {e}"))?;
    let private = key.to_openssh(ssh_key::LineEnding::LF).map_err(|e| anyhow::anyhow!("encode an SSH key: {e}"))?;
    let mut public = key.public_key().to_openssh().map_err(|e| anyhow::anyhow!("encode an SSH key: {e}"))?;
    public.push_str(&format!(" {user}@bidsflux"));
    Ok((private.to_string(), public))
}

/// GitLab's SSH host keys, scanned, in their secret (a new version when they changed).
async fn known_hosts(site: &Site<'_>, plan: &mut Plan, values: &mut Values) -> anyhow::Result<()> {
    let base = names::SSH_KNOWN_HOSTS;
    let (host, port) = (&site.settings.ssh_host, site.settings.ssh_port);
    let out = tokio::process::Command::new("ssh-keyscan")
        .args(["-T", "10", "-p", &port.to_string(), host])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .context("run ssh-keyscan (Debian's openssh-client) for GitLab's SSH host keys")?;
    let mut lines: Vec<&str> = std::str::from_utf8(&out.stdout)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect();
    lines.sort_unstable();
    if lines.is_empty() {
        anyhow::bail!(
            "GitLab's SSH endpoint {host}:{port} gave no host key (set BIDSFLUX_GITLAB_SSH_HOST and GIT_SSH_PORT to where GitLab's SSH listens): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut content = String::new();
    for l in lines {
        let _ = writeln!(content, "{l}");
    }
    let sha = sha256_hex(&content);
    let stored = site.latest(base).await?;
    match &stored {
        Some(s) if !site.rotating(base) && s.labels.get(SHA256_LABEL) == Some(&sha) => {
            plan.record(Change::Keep, "secret", &s.name, None);
        }
        _ => {
            let why = match &stored {
                None => "new",
                Some(_) if site.rotating(base) => "rotation asked for",
                Some(_) => "GitLab's host keys changed",
            };
            store_new(site, plan, base, stored.as_ref(), &content, &Labels::new(), &format!("{why}: {host}:{port}"))
                .await?;
        }
    }
    values.set(base, content);
    Ok(())
}

/// One instance CI/CD variable: created, updated when its flags or (known) value differ, kept.
async fn variable(
    site: &Site<'_>,
    plan: &mut Plan,
    want: &Variable,
    have: Option<&Value>,
    values: &Values,
) -> anyhow::Result<()> {
    let object = format!("CI variable {}", want.key);
    let source = source_of(want.key);
    let value = values.get(if source.is_empty() { want.key } else { source });
    if let Some(v) = value
        && want.masked
        && !maskable(v)
    {
        anyhow::bail!("{object}: GitLab cannot mask its value (from {source}); not written");
    }
    let flags = format!(
        "{}{}{}",
        want.variable_type,
        if want.masked { ", masked" } else { "" },
        if want.protected { ", protected" } else { "" }
    );
    let description = |v: &str| if source.is_empty() { String::new() } else { describe(source, v) };
    let form = |r: Rest, v: &str| {
        r.form("value", v)
            .form("variable_type", want.variable_type)
            .form("masked", want.masked)
            .form("protected", want.protected)
            .form("raw", want.raw)
            .form("description", description(v))
    };
    match have {
        Some(h) => {
            let same_flags = text(h, "variable_type") == want.variable_type
                && h.get("masked").and_then(Value::as_bool) == Some(want.masked)
                && h.get("protected").and_then(Value::as_bool) == Some(want.protected)
                && h.get("raw").and_then(Value::as_bool) == Some(want.raw);
            // A masked value comes back as GitLab stores it; `None` when GitLab hides it.
            let same_value = match (value, h.get("value").and_then(Value::as_str)) {
                (Some(v), Some(g)) => v.trim_end() == g.trim_end() && text(h, "description") == description(v),
                // Unreadable here: the steps before made sure it holds the latest version.
                _ => true,
            };
            if same_flags && same_value {
                let note = value.is_none().then(|| "value not compared: not readable here".to_owned());
                plan.record(Change::Keep, "ci variable", want.key, note);
                return Ok(());
            }
            let Some(v) = value.or_else(|| h.get("value").and_then(Value::as_str)) else {
                anyhow::bail!("{object}: its flags differ and its value is unknown");
            };
            if !plan.dry_run {
                site.write(form(Rest::put(format!("admin/ci/variables/{}", want.key)), v))
                    .await
                    .map_err(|f| fail(&object, f))?;
            }
            let what = if same_flags { "value" } else { "flags" };
            plan.record(Change::Update, "ci variable", want.key, Some(format!("{what} differed; {flags}")));
        }
        None => {
            if !plan.dry_run {
                let Some(v) = value else { anyhow::bail!("{object}: its value is unknown") };
                let create = form(Rest::post("admin/ci/variables").form("key", want.key), v);
                match site.write(create).await {
                    Ok(_) => {}
                    // Made meanwhile by another run: the next run compares it.
                    Err(Fail::Taken(_)) => {}
                    Err(f) => return Err(fail(&object, f)),
                }
            }
            plan.record(Change::Create, "ci variable", want.key, Some(flags));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masking_follows_gitlab_rules() {
        assert!(maskable("glpat-abcdefghij0123456789"));
        assert!(maskable("abc/def+ghi=@:.~-_"));
        assert!(!maskable("short"));
        assert!(!maskable("has a space in it"));
        assert!(!maskable("new\nline-value"));
        assert!(!maskable("dollar$value"));
    }

    #[test]
    fn key_pairs_are_openssh_ed25519() {
        let (private, public) = new_key_pair("dicom_bot").unwrap();
        assert!(private.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"));
        assert!(public.starts_with("ssh-ed25519 AAAA"), "{public}");
        assert!(public.ends_with(" dicom_bot@bidsflux"));
        assert_ne!(new_key_pair("dicom_bot").unwrap().1, public);
    }

    #[test]
    fn every_variable_has_a_source() {
        for v in &VARIABLES {
            let s = source_of(v.key);
            assert!(s.is_empty() || names::get(s).is_some(), "{}", v.key);
        }
        assert_eq!(secrets_version("dicom_bot_gitlab_token_v3"), 3);
        assert_eq!(secrets_version("dicom_bot_gitlab_token"), 1);
    }
}
