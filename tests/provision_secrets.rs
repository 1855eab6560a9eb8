//! `bidsflux-provisioner secrets` against a real Docker Engine: its own `dockerd` (Debian's
//! `docker.io`, own data root and socket) and a one-node swarm on 127.0.0.1, the provisioner run
//! as the operator runs it (its binary, `--docker-host`).
//!
//! A dry run lists every random secret as `create` and creates nothing (exit 2); a real run
//! creates them, writes GitLab's root password to a 0600 file; a service container sees each
//! under `/run/secrets`; a second run and a dry run keep everything (exit 0, the same secret
//! ids); `--rotate` makes `NAME_v2`, which a stack mounts under the old name through its
//! `SECRET_<NAME>` variable; wrong requests fail with a clear message; no value is ever printed.
//! Pass or fail, everything is removed, daemon included, and the host put back.
//!
//! Needs root (dockerd), as the deploy test does.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use bidsflux_config::secrets::{self as names, ALPHABET};
use bidsflux_testsupport::wait_until;
use common::engine::Engine;
use common::run_ok;

/// Runs the provisioner's binary with `args` against `engine`.
fn provisioner(engine: &Engine, args: &[&str]) -> Output {
    let bin = bidsflux_testsupport::site::bin_dir().unwrap().join("bidsflux-provisioner");
    Command::new(bin)
        .args(args)
        .env("DOCKER_HOST", engine.host())
        .env("RUST_LOG", "info")
        .env("BIDSFLUX_LOG_FORMAT", "text")
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The swarm's secrets: name → id.
fn secrets(engine: &Engine) -> BTreeMap<String, String> {
    engine
        .docker_ok(&["secret", "ls", "--format", "{{.Name}}\t{{.ID}}"])
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(n, id)| (n.to_owned(), id.to_owned()))
        .collect()
}

/// A one-file image: Debian's static busybox as `sh`, `cat` and `sleep`.
fn busybox_image(engine: &Engine) -> &'static str {
    let root = engine.dir.path().join("busybox-root");
    if root.exists() {
        return "bidsflux-test-busybox:1";
    }
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("/bin/busybox (scripts/install-deps.sh installs busybox-static)");
    for tool in ["sh", "cat", "sleep"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(tool)).unwrap();
    }
    let tar = engine.dir.path().join("busybox.tar");
    run_ok(Command::new("tar").arg("-C").arg(&root).arg("-cf").arg(&tar).arg("."));
    engine.docker_ok(&["import", tar.to_str().unwrap(), "bidsflux-test-busybox:1"]);
    "bidsflux-test-busybox:1"
}

/// The id of the running container of `service`.
async fn container_of(engine: &Engine, service: &str) -> String {
    let filter = format!("label=com.docker.swarm.service.name={service}");
    wait_until(&format!("{service} running"), Duration::from_secs(60), || {
        let out = engine.docker_ok(&["ps", "-q", "--filter", &filter]);
        async move { out.lines().next().map(str::to_owned) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", engine.docker_ok(&["service", "ps", "--no-trunc", service])))
}

fn read_in(engine: &Engine, container: &str, path: &str) -> String {
    engine.docker_ok(&["exec", container, "cat", path])
}

fn assert_random(value: &str, len: usize, what: &str) {
    assert_eq!(value.len(), len, "{what}: {len} characters");
    assert!(value.bytes().all(|b| ALPHABET.contains(&b)), "{what}: letters and digits only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_created_once_seen_by_services_and_rotated() {
    let engine = Engine::start();
    engine.init_swarm();
    let mut outputs = Vec::new();

    // A dry run: every random secret would be created; nothing is.
    let dry = provisioner(&engine, &["secrets", "--dry-run"]);
    assert_eq!(dry.status.code(), Some(2), "{}", text(&dry));
    let plan = String::from_utf8_lossy(&dry.stdout).into_owned();
    for name in [names::S3_ID, names::S3_SECRET, names::GITLAB_ROOT_PASSWORD] {
        assert!(plan.contains(&format!("create secret {name} (random, ")), "{plan}");
    }
    assert!(secrets(&engine).is_empty(), "a dry run created secrets");
    outputs.push(text(&dry));

    // The real run: created, the root password written to a 0600 file, not shown.
    let keep = engine.dir.path().join("keep");
    let first = provisioner(&engine, &["secrets", "--reveal-to", keep.to_str().unwrap()]);
    assert_eq!(first.status.code(), Some(0), "{}", text(&first));
    let first_plan = String::from_utf8_lossy(&first.stdout).into_owned();
    // Three random secrets, and a placeholder of each secret the stack mounts that only GitLab
    // can make (the first deploy needs them; `gitlab` and `runners` make their next version).
    assert_eq!(first_plan.lines().filter(|l| l.starts_with("create secret ")).count(), 6, "{first_plan}");
    assert!(
        first_plan.contains("create secret dicom_bot_gitlab_token (placeholder until `bidsflux-provisioner gitlab`)"),
        "{first_plan}"
    );
    outputs.push(text(&first));
    let created = secrets(&engine);
    assert_eq!(
        created.keys().map(String::as_str).collect::<Vec<_>>(),
        vec![
            names::DICOM_BOT_GITLAB_TOKEN,
            names::GITLAB_ROOT_PASSWORD,
            names::GITLAB_RUNNER_DATA_CONFIG,
            names::GITLAB_RUNNER_PROC_CONFIG,
            names::S3_ID,
            names::S3_SECRET
        ]
    );
    assert_eq!(std::fs::metadata(&keep).unwrap().permissions().mode() & 0o777, 0o600);
    let kept = std::fs::read_to_string(&keep).unwrap();
    let root_password = kept.trim().strip_prefix("gitlab_root_password=").expect("the root password in the file");

    // A service sees each secret under /run/secrets, with the value that was generated.
    let image = busybox_image(&engine);
    engine.docker_ok(&[
        "service",
        "create",
        "--detach",
        "--name",
        "probe",
        "--secret",
        names::S3_ID,
        "--secret",
        names::S3_SECRET,
        "--secret",
        names::GITLAB_ROOT_PASSWORD,
        image,
        "sleep",
        "3600",
    ]);
    let probe = container_of(&engine, "probe").await;
    let s3_id = read_in(&engine, &probe, "/run/secrets/s3_id");
    let s3_secret = read_in(&engine, &probe, "/run/secrets/s3_secret");
    assert_random(&s3_id, 20, "s3_id");
    assert_random(&s3_secret, 40, "s3_secret");
    assert_random(root_password, 24, "gitlab_root_password");
    assert_eq!(read_in(&engine, &probe, "/run/secrets/gitlab_root_password"), root_password);

    // Again, and dry: everything kept, nothing written (the same secrets, the same ids).
    for args in [&["secrets"][..], &["secrets", "--dry-run"][..]] {
        let again = provisioner(&engine, args);
        assert_eq!(again.status.code(), Some(0), "{args:?}: {}", text(&again));
        let lines: Vec<String> = String::from_utf8_lossy(&again.stdout).lines().map(str::to_owned).collect();
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(lines.iter().all(|l| l.starts_with("keep   secret ")), "{lines:?}");
        outputs.push(text(&again));
    }
    assert_eq!(secrets(&engine), created, "a second run changed the secrets");

    // Rotation: s3_secret_v2, mounted under the old name by a stack through SECRET_S3_SECRET.
    let rotate_dry = provisioner(&engine, &["secrets", "--rotate", "s3_secret", "--dry-run"]);
    assert_eq!(rotate_dry.status.code(), Some(2), "{}", text(&rotate_dry));
    assert!(String::from_utf8_lossy(&rotate_dry.stdout).contains(
        "create secret s3_secret_v2 (rotation of s3_secret: set SECRET_S3_SECRET=s3_secret_v2 in stack/.env"
    ));
    assert!(!secrets(&engine).contains_key("s3_secret_v2"));
    let rotate = provisioner(&engine, &["secrets", "--rotate", "s3_secret"]);
    assert_eq!(rotate.status.code(), Some(0), "{}", text(&rotate));
    outputs.push(text(&rotate_dry));
    outputs.push(text(&rotate));
    let stack = engine.dir.path().join("rotation.yml");
    std::fs::write(
        &stack,
        format!(
            "version: \"3.8\"\nservices:\n  reader:\n    image: {image}\n    command: [\"sleep\", \"3600\"]\n    secrets: [s3_secret]\n\
             secrets:\n  s3_secret:\n    external: true\n    name: ${{SECRET_S3_SECRET:-s3_secret}}\n"
        ),
    )
    .unwrap();
    let deploy = engine
        .cli()
        .env("SECRET_S3_SECRET", "s3_secret_v2")
        .args(["stack", "deploy", "--resolve-image", "never", "-c", stack.to_str().unwrap(), "rot"])
        .output()
        .unwrap();
    assert!(deploy.status.success(), "{}", text(&deploy));
    let reader = container_of(&engine, "rot_reader").await;
    let v2 = read_in(&engine, &reader, "/run/secrets/s3_secret");
    assert_random(&v2, 40, "s3_secret_v2");
    assert_ne!(v2, s3_secret, "the rotated secret has a new value");

    // Wrong requests: one clear line, nothing written.
    let before = secrets(&engine);
    for (args, says) in [
        (&["secrets", "--rotate", "dicom_bot_gitlab_token"][..], "not a random secret"),
        (&["secrets", "--rotate", "nope"][..], "not a secret of the site"),
        (&["secrets", "--docker-host", "unix:///nonexistent/docker.sock"][..], "/nonexistent/docker.sock"),
        (&["bus", "--rotate", "s3_id"][..], "is an option of `secrets`"),
    ] {
        let out = provisioner(&engine, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", text(&out));
        assert!(text(&out).contains(says), "{args:?} should say {says:?}: {}", text(&out));
        outputs.push(text(&out));
    }
    assert_eq!(secrets(&engine), before);

    // Stage two: GitLab runs (the fake; a real sshd as its SSH endpoint). `gitlab` and `runners`
    // write into the swarm, whose values they cannot read back.
    let fake = bidsflux_fake_gitlab::FakeGitlab::start().await.unwrap();
    let ssh = fake.start_ssh().await.unwrap();
    let admin = engine.dir.path().join("admin-token");
    std::fs::write(&admin, fake.admin_token()).unwrap();
    let mounted = engine.dir.path().join("mounted");
    std::fs::create_dir_all(&mounted).unwrap();
    let gitlab = |args: &[&str]| {
        let bin = bidsflux_testsupport::site::bin_dir().unwrap().join("bidsflux-provisioner");
        Command::new(bin)
            .args(args)
            .args(["--gitlab-token-file", admin.to_str().unwrap()])
            .env("DOCKER_HOST", engine.host())
            .env("GITLAB_URL", fake.url())
            .env("BOT_EMAIL_DOMAIN", "example.org")
            .env("BIDSFLUX_GITLAB_SSH_HOST", "127.0.0.1")
            .env("GIT_SSH_PORT", ssh.port.to_string())
            .output()
            .unwrap()
    };
    // The version 1 of s3_secret mounted while v2 is the latest: not trusted, nothing written.
    std::fs::write(mounted.join("s3_secret"), &s3_secret).unwrap();
    let stale = gitlab(&["gitlab", "--secrets-from", mounted.to_str().unwrap()]);
    assert_eq!(stale.status.code(), Some(1), "{}", text(&stale));
    assert!(text(&stale).contains("CI variable S3_SECRET needs the value of the secret s3_secret"), "{}", text(&stale));
    assert!(fake.write_requests().is_empty(), "{:?}", fake.write_requests());
    outputs.push(text(&stale));
    // The latest, mounted as the swarm job of docs/provisioning.md mounts it.
    std::fs::write(mounted.join("s3_secret"), &v2).unwrap();
    let made = gitlab(&["gitlab", "--secrets-from", mounted.to_str().unwrap()]);
    assert_eq!(made.status.code(), Some(0), "{}", text(&made));
    let plan = String::from_utf8_lossy(&made.stdout).into_owned();
    assert!(
        plan.contains(
            "create secret dicom_bot_gitlab_token_v2 (replaces the placeholder; rotation of dicom_bot_gitlab_token: set SECRET_DICOM_BOT_GITLAB_TOKEN=dicom_bot_gitlab_token_v2"
        ),
        "{plan}"
    );
    outputs.push(text(&made));
    let runners = gitlab(&["runners"]);
    assert_eq!(runners.status.code(), Some(0), "{}", text(&runners));
    assert!(
        String::from_utf8_lossy(&runners.stdout)
            .contains("create secret gitlab_runner_proc_config_v2 (replaces the placeholder")
    );
    outputs.push(text(&runners));
    let vars: BTreeMap<String, String> = fake.variables(None).into_iter().map(|v| (v.key, v.value)).collect();
    assert_eq!(vars["S3_SECRET"], v2, "the CI variable holds the latest S3 secret");
    // A service mounting the stored token reads the active token of dicom_bot.
    engine.docker_ok(&[
        "service",
        "create",
        "--detach",
        "--name",
        "token-probe",
        "--secret",
        "source=dicom_bot_gitlab_token_v2,target=dicom_bot_gitlab_token",
        busybox_image(&engine),
        "sleep",
        "3600",
    ]);
    let probe = container_of(&engine, "token-probe").await;
    let token = read_in(&engine, &probe, "/run/secrets/dicom_bot_gitlab_token");
    let bot = fake.user("dicom_bot").unwrap();
    assert!(fake.tokens().iter().any(|t| t.user_id == bot.id && !t.revoked && t.token == token));
    // Again, nothing mounted: nothing is readable, everything is known to be as wanted by its
    // labels and the variables' descriptions. No write, to GitLab or to the swarm.
    let swarm_before = secrets(&engine);
    fake.clear_requests();
    for args in [&["gitlab"][..], &["runners"][..], &["gitlab", "--dry-run"][..]] {
        let again = gitlab(args);
        assert_eq!(again.status.code(), Some(0), "{args:?}: {}", text(&again));
        let stdout = String::from_utf8_lossy(&again.stdout).into_owned();
        assert!(stdout.lines().all(|l| l.starts_with("keep")), "{args:?}:\n{stdout}");
        outputs.push(text(&again));
    }
    assert!(fake.write_requests().is_empty(), "{:?}", fake.write_requests());
    assert_eq!(secrets(&engine), swarm_before);
    let gitlab_tokens: Vec<String> =
        fake.tokens().into_iter().filter(|t| t.user_id != fake.admin_id()).map(|t| t.token).collect();

    // No value was ever printed or logged.
    for value in [s3_id.as_str(), s3_secret.as_str(), root_password, v2.as_str()]
        .into_iter()
        .chain(gitlab_tokens.iter().map(String::as_str))
        .chain([token.as_str()])
    {
        for out in &outputs {
            assert!(!out.contains(value), "a secret value was printed:\n{out}");
        }
    }
    assert!(Path::new(&keep).exists());
}
