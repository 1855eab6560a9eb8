//! The secrets the stack declares and mounts are the ones `bidsflux_config::secrets` lists (the
//! names the provisioner creates and the services read), and each can be switched to a rotated
//! version through its `SECRET_<NAME>` variable.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::Path;

use bidsflux_config::secrets;
use bidsflux_provisioner::secrets::stack_variable;

fn stack() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../stack/bidsflux-stack.yml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Lines of the stack without comments.
fn lines(text: &str) -> Vec<&str> {
    text.lines().filter(|l| !l.trim_start().starts_with('#')).collect()
}

#[test]
fn the_stack_declares_the_listed_secrets() {
    let text = stack();
    let lines = lines(&text);
    let top = lines.iter().position(|l| *l == "secrets:").expect("a top-level secrets: section");
    let mut declared = BTreeSet::new();
    let mut current = String::new();
    for l in &lines[top + 1..] {
        if !l.starts_with(' ') && !l.trim().is_empty() {
            break;
        }
        if let Some(key) = l.strip_prefix("  ").filter(|k| !k.starts_with(' ')).and_then(|k| k.strip_suffix(':')) {
            declared.insert(key.to_owned());
            key.clone_into(&mut current);
            continue;
        }
        if let Some(name) = l.trim().strip_prefix("name: ") {
            let key = &current;
            assert_eq!(name, format!("${{{}:-{key}}}", stack_variable(key)), "the swarm name of secret {key}");
        }
    }
    let listed: BTreeSet<String> = secrets::ALL.iter().filter(|s| s.in_stack).map(|s| s.name.to_owned()).collect();
    assert_eq!(declared, listed, "stack/bidsflux-stack.yml secrets: vs bidsflux_config::secrets::ALL (in_stack)");
}

#[test]
fn services_mount_only_listed_secrets() {
    let text = stack();
    let lines = lines(&text);
    let end = lines.iter().position(|l| *l == "secrets:").unwrap();
    let mut mounted = BTreeSet::new();
    let mut in_list = false;
    for l in &lines[..end] {
        let t = l.trim();
        if t == "secrets:" {
            in_list = true;
        } else if in_list && let Some(name) = t.strip_prefix("- ") {
            mounted.insert(name.to_owned());
        } else if in_list && !t.is_empty() {
            in_list = false;
        }
    }
    assert!(mounted.contains(secrets::S3_SECRET), "{mounted:?}");
    for name in &mounted {
        let s = secrets::get(name)
            .unwrap_or_else(|| panic!("a service mounts {name}, which bidsflux_config::secrets does not list"));
        assert!(s.in_stack, "{name} is mounted but not marked in_stack");
    }
}
