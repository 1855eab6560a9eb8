//! `bidsflux-provisioner up`, `gitlab` and `runners` against the fake GitLab (a fake: GitLab
//! cannot run here; `crates/fake-gitlab` follows GitLab's REST docs), a real `sshd` for GitLab's
//! SSH host keys, a real nats-server, and a directory of secrets. The binary runs as a process,
//! as an operator runs it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use bidsflux_fake_gitlab::{FakeGitlab, FakeGitlabSsh};
use bidsflux_testsupport::NatsServer;

/// A fake GitLab with its SSH endpoint, a NATS server, a secrets directory and the admin token.
struct Fixture {
    fake: FakeGitlab,
    ssh: FakeGitlabSsh,
    nats: NatsServer,
    tmp: tempfile::TempDir,
}

impl Fixture {
    async fn start() -> Self {
        let fake = FakeGitlab::start().await.unwrap();
        let ssh = fake.start_ssh().await.unwrap();
        let nats = NatsServer::start().await.unwrap();
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("admin-token"), format!("{}\n", fake.admin_token())).unwrap();
        Self { fake, ssh, nats, tmp }
    }

    fn secrets(&self) -> PathBuf {
        self.tmp.path().join("secrets")
    }

    /// Runs the provisioner: `command` with the fixture's settings, then `extra`.
    fn run(&self, command: &str, extra: &[&str]) -> Output {
        self.run_with(command, extra, &self.tmp.path().join("admin-token"))
    }

    fn run_with(&self, command: &str, extra: &[&str], token_file: &Path) -> Output {
        self.command(command, extra, token_file).output().unwrap()
    }

    fn command(&self, command: &str, extra: &[&str], token_file: &Path) -> std::process::Command {
        let mut args = vec![command.to_owned()];
        args.push("--secrets-dir".into());
        args.push(self.secrets().display().to_string());
        if command == "up" || command == "secrets" {
            // GitLab's root password, which an operator is shown once, goes to a file.
            args.push("--reveal-to".into());
            args.push(self.tmp.path().join("keep").display().to_string());
        }
        if command != "secrets" {
            args.push("--gitlab-token-file".into());
            args.push(token_file.display().to_string());
        }
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_bidsflux-provisioner"));
        cmd.args(&args)
            .env("GITLAB_URL", self.fake.url())
            .env("BOT_EMAIL_DOMAIN", "bids.example.org")
            .env("BIDSFLUX_GITLAB_SSH_HOST", "127.0.0.1")
            .env("GIT_SSH_PORT", self.ssh.port.to_string())
            .env("BIDSFLUX_GITLAB_TIMEOUT", "5s")
            .env("NATS_URL", &self.nats.url)
            .env("OTEL_SDK_DISABLED", "true")
            .env_remove("GITLAB_ADMIN_TOKEN_FILE");
        cmd
    }

    fn secret(&self, name: &str) -> String {
        std::fs::read_to_string(self.secrets().join(name)).unwrap_or_else(|e| panic!("secret {name}: {e}"))
    }

    /// The latest version of `base` in the directory, by name.
    fn latest(&self, base: &str) -> Option<String> {
        let mut best: Option<(u32, String)> = None;
        for e in std::fs::read_dir(self.secrets()).ok()?.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if let Some(v) = bidsflux_config::secrets::version_of(base, &n)
                && best.as_ref().is_none_or(|(b, _)| v > *b)
            {
                best = Some((v, n));
            }
        }
        best.map(|(_, n)| n)
    }

    /// Every value the provisioner made or read.
    fn values(&self) -> Vec<String> {
        let Ok(dir) = std::fs::read_dir(self.secrets()) else { return Vec::new() };
        dir.flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .flat_map(|e| {
                let v = std::fs::read_to_string(e.path()).unwrap();
                // Each line of a key or config that is long enough to be a secret on its own.
                let mut parts: Vec<String> =
                    v.lines().map(str::trim).filter(|l| l.len() >= 16).map(str::to_owned).collect();
                parts.extend(v.split('"').filter(|t| t.starts_with("glrt-")).map(str::to_owned));
                parts.push(v.trim().to_owned());
                parts
            })
            .filter(|v| !v.starts_with("-----") && !v.starts_with('#') && !v.contains("127.0.0.1") && !v.contains('='))
            .collect()
    }
}

fn out(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn assert_no_values(f: &Fixture, o: &Output) {
    let text = out(o);
    for v in f.values() {
        assert!(!text.contains(&v), "a secret value was printed:\n{text}");
    }
    for t in f.fake.tokens() {
        if t.user_id != f.fake.admin_id() {
            assert!(!text.contains(&t.token), "a GitLab token was printed:\n{text}");
        }
    }
}

/// The end state every successful `up` must reach, whatever happened before.
fn check_end_state(f: &Fixture) {
    let fake = &f.fake;
    assert!(fake.group("ni-dataops").is_some(), "the root group");
    for p in ["ni-dataops/ci-pipelines", "ni-dataops/containers"] {
        assert!(fake.project(p).is_some(), "{p}");
    }
    let repo = fake.repo_dir("ni-dataops/ci-pipelines").unwrap();
    let tree = std::process::Command::new("git")
        .args(["--git-dir", repo.to_str().unwrap(), "ls-tree", "--name-only", "main"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&tree.stdout), "README.md\nbids.yml\nstudy.yml\n");
    let commits = std::process::Command::new("git")
        .args(["--git-dir", repo.to_str().unwrap(), "rev-list", "--count", "main"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&commits.stdout).trim(), "1", "seeded once");

    let users = fake.users();
    for (bot, admin) in [("dicom_bot", false), ("bids_bot", true)] {
        let matching: Vec<_> = users.iter().filter(|u| u.username == bot).collect();
        assert_eq!(matching.len(), 1, "one user {bot}");
        let u = matching[0];
        assert_eq!(u.email, format!("{bot}@bids.example.org"));
        assert_eq!(u.admin, admin, "{bot} admin");
        let active: Vec<_> =
            fake.tokens().into_iter().filter(|t| t.user_id == u.id && !t.revoked && t.name == "bidsflux").collect();
        assert_eq!(active.len(), 1, "{bot}: exactly one active token");
        let secret = f.latest(&format!("{bot}_gitlab_token")).unwrap();
        assert_eq!(f.secret(&secret), active[0].token, "{bot}: the stored token is the active one");
        assert!(active[0].expires_at.is_some(), "{bot}: an explicit expiry");
        assert!(active[0].scopes.contains(&"api".to_owned()));
        let key_secret = f.latest(&format!("{bot}_ssh_key")).unwrap();
        let private = f.secret(&key_secret);
        assert!(private.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"));
        let keys: Vec<_> = fake.ssh_keys().into_iter().filter(|k| k.user_id == u.id).collect();
        let labels: BTreeMap<String, String> =
            serde_json::from_slice(&std::fs::read(f.secrets().join(format!(".{key_secret}.labels"))).unwrap()).unwrap();
        let public = &labels["org.bidsflux.public-key"];
        assert!(
            keys.iter().any(|k| k.key.split_whitespace().nth(1) == public.split_whitespace().nth(1)),
            "{bot}: the stored key's public half is registered"
        );
    }
    let vars: BTreeMap<String, _> = fake.variables(None).into_iter().map(|v| (v.key.clone(), v)).collect();
    let keys: Vec<&str> = vars.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        ["BIDS_API_TOKEN", "BOT_SSH_KEY", "GIT_BOT_EMAIL", "GIT_BOT_USERNAME", "S3_SECRET", "SSH_KNOWN_HOSTS"]
    );
    assert_eq!(vars["BIDS_API_TOKEN"].value, f.secret(&f.latest("bids_bot_gitlab_token").unwrap()));
    assert!(vars["BIDS_API_TOKEN"].masked && vars["S3_SECRET"].masked);
    assert_eq!(vars["S3_SECRET"].value, f.secret("s3_secret"));
    assert_eq!(vars["BOT_SSH_KEY"].value, f.secret(&f.latest("bids_bot_ssh_key").unwrap()));
    assert_eq!(vars["BOT_SSH_KEY"].variable_type, "file");
    assert_eq!(vars["GIT_BOT_USERNAME"].value, "bids_bot");
    assert_eq!(vars["GIT_BOT_EMAIL"].value, "bids_bot@bids.example.org");
    // The host keys the scan stored are the fake sshd's.
    let known = f.secret(&f.latest("ssh_known_hosts").unwrap());
    let expected = std::fs::read_to_string(&f.ssh.known_hosts).unwrap();
    let blob = |s: &str| s.split_whitespace().nth(2).map(str::to_owned);
    assert!(expected.lines().filter_map(blob).all(|b| known.lines().filter_map(blob).any(|k| k == b)), "{known}");
    assert_eq!(vars["SSH_KNOWN_HOSTS"].value, known);

    let runners = fake.runners();
    let mut descriptions: Vec<&str> = runners.iter().map(|r| r.description.as_str()).collect();
    descriptions.sort_unstable();
    assert_eq!(
        descriptions,
        ["bidsflux-bids", "bidsflux-dind", "bidsflux-preproc", "bidsflux-untagged"],
        "never twice"
    );
    for (config, names) in [
        ("gitlab_runner_data_config", &["bidsflux-dind"][..]),
        ("gitlab_runner_proc_config", &["bidsflux-untagged", "bidsflux-bids", "bidsflux-preproc"][..]),
    ] {
        let toml: toml::Table = toml::from_str(&f.secret(&f.latest(config).unwrap())).unwrap();
        let listed = toml["runners"].as_array().unwrap();
        assert_eq!(listed.len(), names.len(), "{config}");
        for r in listed {
            let name = r["name"].as_str().unwrap();
            let runner = runners.iter().find(|x| x.description == name).unwrap();
            assert_eq!(r["token"].as_str(), Some(runner.token.as_str()), "{config}: {name}'s token is GitLab's");
            assert_eq!(r["url"].as_str(), Some(fake.url().as_str()));
        }
    }
    let dind = runners.iter().find(|r| r.description == "bidsflux-dind").unwrap();
    assert_eq!((dind.tag_list.clone(), dind.run_untagged), (vec!["dind".to_owned()], false));
    let untagged = runners.iter().find(|r| r.description == "bidsflux-untagged").unwrap();
    assert!(untagged.run_untagged && untagged.tag_list.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn up_creates_everything_then_changes_nothing() {
    let f = Fixture::start().await;

    // A dry run on a fresh GitLab lists every object and writes nothing.
    let dry = f.run("up", &["--dry-run"]);
    assert_eq!(dry.status.code(), Some(2), "{}", out(&dry));
    let plan = String::from_utf8_lossy(&dry.stdout).into_owned();
    for line in [
        "create secret s3_secret",
        "create gitlab group ni-dataops",
        "create gitlab project ni-dataops/ci-pipelines",
        "create gitlab project ni-dataops/containers",
        "create gitlab file ni-dataops/ci-pipelines:bids.yml",
        "create gitlab user dicom_bot",
        "create gitlab user bids_bot",
        "create gitlab token dicom_bot bidsflux",
        "create secret dicom_bot_gitlab_token (new)",
        "create secret bids_bot_ssh_key",
        "create gitlab ssh-key bids_bot",
        "create secret ssh_known_hosts",
        "create ci variable BIDS_API_TOKEN",
        "create ci variable SSH_KNOWN_HOSTS",
        "create gitlab runner bidsflux-preproc",
        "create secret gitlab_runner_proc_config",
        "create stream",
    ] {
        assert!(plan.contains(line), "the dry run lists {line:?}:\n{plan}");
    }
    assert!(f.fake.write_requests().is_empty(), "a dry run wrote: {:?}", f.fake.write_requests());
    assert!(!f.secrets().exists(), "a dry run made the secrets directory");

    let first = f.run("up", &[]);
    assert_eq!(first.status.code(), Some(0), "{}", out(&first));
    check_end_state(&f);
    assert_no_values(&f, &first);

    // Again, and dry: nothing to do, no write request.
    f.fake.clear_requests();
    for extra in [&[][..], &["--dry-run"][..]] {
        let again = f.run("up", extra);
        assert_eq!(again.status.code(), Some(0), "{extra:?}: {}", out(&again));
        let stdout = String::from_utf8_lossy(&again.stdout);
        assert!(stdout.lines().all(|l| l.starts_with("keep")), "{extra:?}: all kept:\n{stdout}");
        assert!(f.fake.write_requests().is_empty(), "{extra:?} wrote: {:?}", f.fake.write_requests());
        assert_no_values(&f, &again);
    }
    check_end_state(&f);

    // A file the site edited is kept; a deleted one is committed again.
    // Lost secrets: a token's and a runner config's. The token is rotated (not a second one),
    // the runners of that config are made again (not a second set).
    for base in ["dicom_bot_gitlab_token", "gitlab_runner_data_config"] {
        std::fs::remove_file(f.secrets().join(f.latest(base).unwrap())).unwrap();
    }
    let dicom_bot = f.fake.user("dicom_bot").unwrap().id;
    let old_token = f.fake.tokens().into_iter().find(|t| !t.revoked && t.user_id == dicom_bot).unwrap();
    let healed = f.run("up", &[]);
    assert_eq!(healed.status.code(), Some(0), "{}", out(&healed));
    let stdout = String::from_utf8_lossy(&healed.stdout);
    assert!(
        stdout.contains("create gitlab token dicom_bot bidsflux (rotated: its value is not stored (lost)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("create gitlab runner bidsflux-dind (tags dind; replaces 1 without a stored token)"),
        "{stdout}"
    );
    check_end_state(&f);
    assert!(f.fake.tokens().iter().any(|t| t.id == old_token.id && t.revoked), "the lost token is revoked");

    // Rotation on request: the next version of each secret, the old token revoked, the
    // variable updated, the operator told how to switch.
    let before = f.secret(&f.latest("bids_bot_gitlab_token").unwrap());
    let rotated = f.run("up", &["--rotate", "bids_bot_gitlab_token", "--rotate", "gitlab_runner_proc_config"]);
    assert_eq!(rotated.status.code(), Some(0), "{}", out(&rotated));
    let stdout = String::from_utf8_lossy(&rotated.stdout);
    assert!(stdout.contains("create secret bids_bot_gitlab_token_v2"), "{stdout}");
    assert!(stdout.contains("create secret gitlab_runner_proc_config_v2"), "{stdout}");
    assert!(stdout.contains("update ci variable BIDS_API_TOKEN"), "{stdout}");
    assert!(f.fake.tokens().iter().any(|t| t.token == before && t.revoked), "the old token is revoked");
    check_end_state(&f);
    assert_no_values(&f, &rotated);
}

/// A GitLab failure at each write step, then `up` again: the same end state as a clean run.
#[tokio::test(flavor = "multi_thread")]
async fn a_failure_at_each_step_then_up_again_converges() {
    // In the order `up` reaches them; `/users/` fails dicom_bot's token (after both users exist),
    // `/projects/` the seed commit, `/personal_access_tokens/` a rotation.
    let steps: [(&str, &str); 10] = [
        ("POST", "/api/v4/groups"),
        ("POST", "/api/v4/projects"),
        ("POST", "/api/v4/projects/"),
        ("POST", "/api/v4/users"),
        ("POST", "/api/v4/users/"),
        ("POST", "/api/v4/personal_access_tokens/"),
        ("POST", "/api/v4/admin/ci/variables"),
        ("POST", "/api/v4/user/runners"),
        ("GET", "/api/v4/runners/all"),
        ("GET", "/api/v4/user"),
    ];
    for (i, (method, path)) in steps.into_iter().enumerate() {
        let f = Fixture::start().await;
        if i == 5 {
            // Rotation needs a token to exist: a first clean run, a lost secret, then the fault.
            assert_eq!(f.run("up", &[]).status.code(), Some(0));
            std::fs::remove_file(f.secrets().join(f.latest("bids_bot_gitlab_token").unwrap())).unwrap();
        }
        f.fake.fail_next(Some(method), path, 502, 1);
        let failed = f.run("up", &[]);
        assert_eq!(failed.status.code(), Some(1), "{method} {path}: {}", out(&failed));
        assert!(out(&failed).contains("502"), "{method} {path}: GitLab's answer is in the error: {}", out(&failed));
        assert_no_values(&f, &failed);
        let again = f.run("up", &[]);
        assert_eq!(again.status.code(), Some(0), "{method} {path}, run again: {}", out(&again));
        check_end_state(&f);
        f.fake.clear_requests();
        let third = f.run("up", &[]);
        assert_eq!(third.status.code(), Some(0));
        assert!(f.fake.write_requests().is_empty(), "{method} {path}: converged, then nothing to write");
    }
}

/// `kill -9` of `up` after its n-th write request to GitLab (GitLab 20 ms away, so the kill
/// lands while a request is in flight or its answer not yet stored), then `up` again: the same
/// end state as a clean run, with no duplicate user, token, key or runner.
#[tokio::test(flavor = "multi_thread")]
async fn up_killed_at_any_point_then_up_again_converges() {
    for n in [1, 3, 5, 7, 9, 11, 13, 16, 19, 21] {
        let f = Fixture::start().await;
        f.fake.set_latency(bidsflux_fake_gitlab::Latency { api: Duration::from_millis(20), git: Duration::ZERO });
        let mut child = f.command("up", &[], &f.tmp.path().join("admin-token")).stdout(Stdio::null()).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while f.fake.write_requests().len() < n && Instant::now() < deadline && child.try_wait().unwrap().is_none() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), None, "killed after write {n}, before the end of the run");
        f.fake.set_latency(bidsflux_fake_gitlab::Latency::default());
        let again = f.run("up", &[]);
        assert_eq!(again.status.code(), Some(0), "killed after write {n}, run again: {}", out(&again));
        check_end_state(&f);
        f.fake.clear_requests();
        assert_eq!(f.run("up", &[]).status.code(), Some(0));
        assert!(f.fake.write_requests().is_empty(), "killed after write {n}: converged, then nothing to write");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_are_clear_and_write_nothing() {
    let f = Fixture::start().await;
    assert_eq!(f.run("secrets", &[]).status.code(), Some(0));

    // A token that is not an administrator's.
    let (_, user_token) = f.fake.add_user("alice", false);
    let not_admin = f.tmp.path().join("alice-token");
    std::fs::write(&not_admin, &user_token).unwrap();
    let o = f.run_with("gitlab", &[], &not_admin);
    assert_eq!(o.status.code(), Some(1));
    assert!(out(&o).contains("\"alice\", who is not an administrator"), "{}", out(&o));
    assert!(!out(&o).contains(&user_token));

    // An S3 secret GitLab could not mask: named, before any write.
    let s3 = f.secrets().join("s3_secret");
    let good = std::fs::read_to_string(&s3).unwrap();
    std::fs::write(&s3, "has spaces in it").unwrap();
    let o = f.run("gitlab", &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(out(&o).contains("CI variable S3_SECRET: GitLab cannot mask"), "{}", out(&o));
    assert!(!out(&o).contains("has spaces in it"));
    assert!(f.fake.write_requests().is_empty(), "{:?}", f.fake.write_requests());
    std::fs::write(&s3, good).unwrap();

    // GitLab unreachable; a wrong token; GitLab's SSH not answering.
    f.fake.stop();
    let o = f.run("gitlab", &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(out(&o).contains(&f.fake.url().replace("http://", "")) || out(&o).contains("connect"), "{}", out(&o));
    f.fake.restart().await.unwrap();
    let wrong = f.tmp.path().join("wrong-token");
    std::fs::write(&wrong, "glpat-not-a-token").unwrap();
    let o = f.run_with("gitlab", &[], &wrong);
    assert_eq!(o.status.code(), Some(1));
    assert!(out(&o).contains("401"), "{}", out(&o));
    assert!(f.fake.write_requests().is_empty(), "{:?}", f.fake.write_requests());

    // A missing S3 secret is named, before any write.
    std::fs::remove_file(&s3).unwrap();
    let o = f.run("gitlab", &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(out(&o).contains("CI variable S3_SECRET needs the value of the secret s3_secret"), "{}", out(&o));
    assert!(f.fake.write_requests().is_empty(), "{:?}", f.fake.write_requests());
}
