//! `bidsflux-provisioner secrets --secrets-dir DIR`, the binary as an operator runs it on a host
//! without swarm: files of mode 0600 in a 0700 directory, created once, never overwritten,
//! rotated to `NAME_v2`, GitLab's root password shown once on standard error and no value on
//! standard output. (The swarm store is tested against a real Docker Engine in
//! `tests/provision_secrets.rs`.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt as _;
use std::process::{Command, Output};

fn provisioner(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bidsflux-provisioner"))
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("DOCKER_HOST")
        .output()
        .unwrap()
}

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn secrets_as_files_are_created_once_and_rotated() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("secrets");
    let d = dir.to_str().unwrap();

    let dry = provisioner(&["secrets", "--secrets-dir", d, "--dry-run"]);
    assert_eq!(dry.status.code(), Some(2), "{dry:?}");
    assert!(!dir.exists(), "a dry run wrote");

    let first = provisioner(&["secrets", "--secrets-dir", d]);
    assert_eq!(first.status.code(), Some(0), "{first:?}");
    assert_eq!(mode(&dir), 0o700);
    let mut values = Vec::new();
    for (name, len) in [("s3_id", 20), ("s3_secret", 40), ("gitlab_root_password", 24)] {
        let path = dir.join(name);
        assert_eq!(mode(&path), 0o600, "{name}");
        let value = std::fs::read_to_string(&path).unwrap();
        assert_eq!(value.len(), len, "{name}");
        values.push((name, value));
    }
    let stdout = String::from_utf8_lossy(&first.stdout);
    let stderr = String::from_utf8_lossy(&first.stderr);
    for (name, value) in &values {
        assert!(stdout.contains(&format!("create secret {name} (random, ")), "{stdout}");
        assert!(!stdout.contains(value.as_str()), "a value on standard output");
        let shown = stderr.matches(value.as_str()).count();
        assert_eq!(shown, usize::from(*name == "gitlab_root_password"), "{name} shown {shown} times");
    }

    let again = provisioner(&["secrets", "--secrets-dir", d]);
    assert_eq!(again.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&again.stdout).lines().filter(|l| l.starts_with("keep   secret ")).count(), 3);
    for (name, value) in &values {
        assert_eq!(&std::fs::read_to_string(dir.join(name)).unwrap(), value, "{name} was overwritten");
        assert!(!String::from_utf8_lossy(&again.stderr).contains(value.as_str()));
    }

    let rotate = provisioner(&["secrets", "--secrets-dir", d, "--rotate", "s3_secret"]);
    assert_eq!(rotate.status.code(), Some(0), "{rotate:?}");
    let hint = String::from_utf8_lossy(&rotate.stdout);
    assert!(
        hint.contains(&format!(
            "create secret s3_secret_v2 (rotation of s3_secret: point the services at {d}/s3_secret_v2"
        )),
        "{hint}"
    );
    let v2 = std::fs::read_to_string(dir.join("s3_secret_v2")).unwrap();
    assert_eq!(v2.len(), 40);
    assert_ne!(v2, values[1].1);
    // Each secret has its labels beside it (`.<name>.labels`, no value in them).
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !(n.starts_with('.') && n.ends_with(".labels")))
        .collect();
    // 3 random, s3_secret_v2, and the placeholders of the 3 secrets GitLab makes.
    assert_eq!(names.len(), 7, "no temporary file left: {names:?}");
}
