//! `bidsflux-provisioner runners`: the original's four instance runners, created with GitLab's
//! current flow (`POST /user/runners`: tags and run-untagged are set there; registration tokens
//! are disabled by default since GitLab 17), and the `config.toml` of each runner service in
//! its secret (`gitlab_runner_data_config`: `dind`; `gitlab_runner_proc_config`: untagged,
//! `bids`, `preproc`).
//!
//! A runner is found again by its description. A config secret's label holds the ids of its
//! runners: while they all exist in GitLab, nothing is done. Otherwise (a runner deleted in
//! GitLab, a secret lost, a crash between creating runners and storing their tokens, or
//! `--rotate`), the runners of that config that exist are deleted, since their tokens cannot be
//! read back, and made again; the new tokens go into the next version of the secret. Never two
//! runners of one description.

use std::collections::BTreeMap;

use bidsflux_config::secrets as names;
use serde_json::Value;

use crate::plan::{Change, Plan};
use crate::rest::Rest;
use crate::secrets::{Labels, Stored};
use crate::site::{Site, fail, id, text};

/// Label of a runner config's secret: `description=id` of its runners, comma-separated.
pub const RUNNER_IDS_LABEL: &str = "org.bidsflux.runner-ids";

/// One runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunnerDef {
    /// Its description in GitLab and its name in `config.toml`.
    pub description: &'static str,
    /// The secret of the `config.toml` it is in (which runner service runs it).
    pub config: &'static str,
    /// Its tags.
    pub tags: &'static [&'static str],
    /// Whether it takes untagged jobs.
    pub run_untagged: bool,
    /// Docker executor: privileged containers (docker-in-docker).
    pub privileged: bool,
    /// Docker executor: host devices.
    pub devices: &'static [&'static str],
    /// Docker executor: security options.
    pub security_opt: &'static [&'static str],
}

/// The original's runners.
pub const RUNNERS: [RunnerDef; 4] = [
    RunnerDef {
        description: "bidsflux-dind",
        config: names::GITLAB_RUNNER_DATA_CONFIG,
        tags: &["dind"],
        run_untagged: false,
        privileged: true,
        devices: &[],
        security_opt: &[],
    },
    RunnerDef {
        description: "bidsflux-untagged",
        config: names::GITLAB_RUNNER_PROC_CONFIG,
        tags: &[],
        run_untagged: true,
        privileged: false,
        devices: &[],
        security_opt: &[],
    },
    RunnerDef {
        description: "bidsflux-bids",
        config: names::GITLAB_RUNNER_PROC_CONFIG,
        tags: &["bids"],
        run_untagged: false,
        privileged: false,
        devices: &[],
        security_opt: &[],
    },
    RunnerDef {
        description: "bidsflux-preproc",
        config: names::GITLAB_RUNNER_PROC_CONFIG,
        tags: &["preproc"],
        run_untagged: false,
        privileged: false,
        devices: &["/dev/fuse"],
        security_opt: &["apparmor:unconfined", "seccomp:unconfined"],
    },
];

/// The config secrets, in order.
pub const CONFIGS: [&str; 2] = [names::GITLAB_RUNNER_DATA_CONFIG, names::GITLAB_RUNNER_PROC_CONFIG];

/// The `config.toml` of `runners` with their tokens.
pub fn config_toml(
    url: &str,
    concurrent: u32,
    proc_volumes: &[String],
    runners: &[(RunnerDef, String)],
) -> anyhow::Result<String> {
    use toml::{Table, Value as T};
    let strings = |v: &[&str]| T::Array(v.iter().map(|s| T::String((*s).to_owned())).collect());
    let mut list = Vec::new();
    for (def, token) in runners {
        let mut docker = Table::new();
        docker.insert("image".into(), T::String("docker:27".into()));
        docker.insert("privileged".into(), T::Boolean(def.privileged));
        docker.insert("tls_verify".into(), T::Boolean(false));
        let mut volumes = vec!["/certs/client", "/cache"];
        if def.config == names::GITLAB_RUNNER_PROC_CONFIG {
            volumes.extend(proc_volumes.iter().map(String::as_str));
        }
        docker.insert("volumes".into(), strings(&volumes));
        docker.insert("pull_policy".into(), strings(&["if-not-present", "always"]));
        if !def.devices.is_empty() {
            docker.insert("devices".into(), strings(def.devices));
        }
        if !def.security_opt.is_empty() {
            docker.insert("security_opt".into(), strings(def.security_opt));
        }
        let mut r = Table::new();
        r.insert("name".into(), T::String(def.description.into()));
        r.insert("url".into(), T::String(url.into()));
        r.insert("token".into(), T::String(token.clone()));
        r.insert("executor".into(), T::String("docker".into()));
        r.insert("docker".into(), T::Table(docker));
        list.push(T::Table(r));
    }
    let mut top = Table::new();
    top.insert("concurrent".into(), T::Integer(concurrent.into()));
    top.insert("check_interval".into(), T::Integer(0));
    top.insert("shutdown_timeout".into(), T::Integer(0));
    // The stack's healthcheck reads the runner's /metrics here.
    top.insert("listen_address".into(), T::String("127.0.0.1:9252".into()));
    top.insert("runners".into(), T::Array(list));
    let body = toml::to_string(&top)?;
    Ok(format!("# Written by bidsflux-provisioner runners; made again (a new secret version) by `--rotate`.\n{body}"))
}

fn ids_label(ids: &[(&str, u64)]) -> String {
    ids.iter().map(|(d, i)| format!("{d}={i}")).collect::<Vec<_>>().join(",")
}

fn parse_ids(label: &str) -> BTreeMap<String, u64> {
    label
        .split(',')
        .filter_map(|p| p.split_once('='))
        .filter_map(|(d, i)| Some((d.to_owned(), i.parse().ok()?)))
        .collect()
}

/// Runs the `runners` command.
pub async fn run(site: &Site<'_>, plan: &mut Plan) -> anyhow::Result<()> {
    let existing = site.list("the instance runners", Rest::get("runners/all").query("type", "instance_type")).await?;
    for config in CONFIGS {
        let defs: Vec<RunnerDef> = RUNNERS.iter().copied().filter(|r| r.config == config).collect();
        let stored = site.latest(config).await?;
        let held =
            stored.as_ref().and_then(|s| s.labels.get(RUNNER_IDS_LABEL)).map(|l| parse_ids(l)).unwrap_or_default();
        let in_gitlab = |def: &RunnerDef| -> Vec<u64> {
            existing
                .iter()
                .filter(|r| text(r, "description") == def.description)
                .filter_map(|r| r.get("id").and_then(Value::as_u64))
                .collect()
        };
        let all_held = defs.iter().all(|d| held.get(d.description).is_some_and(|i| in_gitlab(d) == [*i]));
        let why = match (&stored, all_held, site.rotating(config)) {
            (_, _, true) => "rotation asked for",
            (None, _, _) => "new",
            (Some(_), _, _) if crate::gitlab::placeholder(stored.as_ref()) => "replaces the placeholder",
            (Some(_), false, _) => "its runners are not the ones in GitLab",
            (Some(s), true, false) => {
                for d in &defs {
                    plan.record(Change::Keep, "gitlab runner", d.description, Some(format!("in {}", s.name)));
                }
                plan.record(Change::Keep, "secret", &s.name, None);
                continue;
            }
        };
        let mut made = Vec::new();
        for def in &defs {
            let object = format!("runner {}", def.description);
            let stale = in_gitlab(def);
            if !plan.dry_run {
                for old in &stale {
                    site.write_ignored(&object, Rest::delete(format!("runners/{old}"))).await?;
                }
                let create = Rest::post("user/runners")
                    .form("runner_type", "instance_type")
                    .form("description", def.description)
                    .form("tag_list", def.tags.join(","))
                    .form("run_untagged", def.run_untagged)
                    .form("locked", false)
                    .form("access_level", "not_protected");
                let r = site.write(create).await.map_err(|f| fail(&object, f))?;
                let token = text(&r, "token").to_owned();
                if token.is_empty() {
                    anyhow::bail!("{object}: GitLab's answer holds no token");
                }
                made.push((*def, token, id(&r)?));
            }
            let tags = if def.tags.is_empty() { "untagged".to_owned() } else { format!("tags {}", def.tags.join(",")) };
            let note = if stale.is_empty() {
                tags
            } else {
                format!("{tags}; replaces {} without a stored token", stale.len())
            };
            plan.record(Change::Create, "gitlab runner", def.description, Some(note));
        }
        let pairs: Vec<(RunnerDef, String)> = made.iter().map(|(d, t, _)| (*d, t.clone())).collect();
        let ids: Vec<(&str, u64)> = made.iter().map(|(d, _, i)| (d.description, *i)).collect();
        let s = site.settings;
        let toml = config_toml(&s.url, s.runner_concurrent, &s.runner_proc_volumes, &pairs)?;
        let labels = Labels::from([(RUNNER_IDS_LABEL.to_owned(), ids_label(&ids))]);
        let name = Stored::next_name(stored.as_ref(), config);
        let mut note =
            format!("{why}: config.toml of {}", defs.iter().map(|d| d.description).collect::<Vec<_>>().join(", "));
        if stored.is_some() {
            note = format!("{note}; {}", site.store.rotation_hint(config, &name));
        }
        if !plan.dry_run && !site.store.create_labeled(&name, config, &toml, &labels).await? {
            anyhow::bail!("the secret {name} was created by someone else meanwhile: run again");
        }
        plan.record(Change::Create, "secret", &name, Some(note));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_toml_is_what_gitlab_runner_reads() {
        let defs: Vec<(RunnerDef, String)> = RUNNERS
            .iter()
            .filter(|r| r.config == names::GITLAB_RUNNER_PROC_CONFIG)
            .map(|r| (*r, format!("glrt-{}", r.description)))
            .collect();
        let text = config_toml("https://gitlab.example.org", 4, &["/mnt/data/mri:/data".to_owned()], &defs).unwrap();
        let parsed: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(parsed["listen_address"].as_str(), Some("127.0.0.1:9252"));
        let runners = parsed["runners"].as_array().unwrap();
        assert_eq!(runners.len(), 3);
        let preproc = runners.iter().find(|r| r["name"].as_str() == Some("bidsflux-preproc")).unwrap();
        assert_eq!(preproc["token"].as_str(), Some("glrt-bidsflux-preproc"));
        assert_eq!(preproc["executor"].as_str(), Some("docker"));
        assert_eq!(preproc["docker"]["devices"].as_array().unwrap()[0].as_str(), Some("/dev/fuse"));
        assert_eq!(preproc["docker"]["security_opt"].as_array().unwrap().len(), 2);
        let volumes = preproc["docker"]["volumes"].as_array().unwrap();
        assert_eq!(volumes.last().unwrap().as_str(), Some("/mnt/data/mri:/data"));
        assert_eq!(parse_ids(&ids_label(&[("a", 1), ("b", 22)])), BTreeMap::from([("a".into(), 1), ("b".into(), 22)]));
    }
}
