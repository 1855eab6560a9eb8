//! The study superdataset under concurrent writers: every session added at
//! once ends up in it (refused pushes are fetched and applied again), the
//! superdataset is created once, and an entry is never moved backwards.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bidsflux_indexer::forge::{Forge, LocalForge, ProjectPath};
use bidsflux_indexer::git::{Git, Identity};
use bidsflux_indexer::superdataset::{self, Subdataset};
use bidsflux_indexer::templates::{Templates, Values};
use tokio::process::Command;

fn git() -> Git {
    Git::new("git", Identity { name: "dicom_bot".into(), email: "dicom_bot@localhost".into() }, Duration::from_secs(60))
}

fn values() -> Values {
    Values {
        study_path: "PI/S/sourcedata/dicoms/study".into(),
        bids_path: "PI/S/bids".into(),
        root: "ni-dataops".into(),
        dev_branch: "dev".into(),
        base_branch: "base".into(),
    }
}

async fn run(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git").args(args).current_dir(dir).output().await.unwrap();
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn session(i: usize) -> Subdataset {
    Subdataset {
        path: format!("sub-{i:02}/ses-1"),
        url: format!("../1.2.3.{i}.git"),
        id: format!("00000000-0000-4000-8000-{i:012}"),
        commit: format!("{:040x}", i + 1),
    }
}

#[tokio::test]
async fn sessions_added_at_once_all_land_in_one_superdataset() {
    let tmp = tempfile::tempdir().unwrap();
    let forge = LocalForge::new(tmp.path().join("forge"), git());
    let project = forge.ensure_project(&ProjectPath::new("PI/S/sourcedata/dicoms/study").unwrap()).await.unwrap();
    let templates = Arc::new(Templates::default());
    let writers = 8;
    let mut tasks = Vec::new();
    for i in 0..writers {
        let (project, templates) = (project.clone(), Arc::clone(&templates));
        let work = tmp.path().join(format!("work-{i}"));
        tasks.push(tokio::spawn(async move {
            std::fs::create_dir_all(&work).unwrap();
            let contains = |_: String, _: String| async { Ok(false) };
            superdataset::add_session(&git(), &work, &project, &templates.study, &values(), &session(i), contains)
                .await
                .unwrap()
        }));
    }
    let mut created = 0;
    for t in tasks {
        let update = t.await.unwrap();
        assert!(update.pushed);
        created += usize::from(update.created);
    }
    assert_eq!(created, 1, "the superdataset was created more than once");

    let bare = Path::new(&project.push_url);
    let modules = run(bare, &["config", "--blob", "main:.gitmodules", "--get-regexp", "path"]).await;
    assert_eq!(modules.lines().count(), writers, "{modules}");
    for i in 0..writers {
        let s = session(i);
        assert_eq!(run(bare, &["rev-parse", &format!("main:{}", s.path)]).await, s.commit);
    }
    // One creation commit, then one commit per session.
    assert_eq!(run(bare, &["rev-list", "--count", "main"]).await, (writers + 1).to_string());
    assert_eq!(run(bare, &["rev-list", "--max-parents=0", "main"]).await.lines().count(), 1);
}

#[tokio::test]
async fn an_entry_only_moves_to_a_commit_that_contains_it() {
    let tmp = tempfile::tempdir().unwrap();
    let forge = LocalForge::new(tmp.path().join("forge"), git());
    let project = forge.ensure_project(&ProjectPath::new("PI/S/sourcedata/dicoms/study").unwrap()).await.unwrap();
    let templates = Templates::default();
    let add = |s: Subdataset, newer: bool, n: usize| {
        let (project, templates) = (project.clone(), templates.clone());
        let work = tmp.path().join(format!("work-{n}"));
        async move {
            std::fs::create_dir_all(&work).unwrap();
            // `newer`: the recorded commit contains the one being added.
            let contains = move |_: String, _: String| async move { Ok(newer) };
            superdataset::add_session(&git(), &work, &project, &templates.study, &values(), &s, contains).await
        }
    };
    let first = session(1);
    assert!(add(first.clone(), false, 0).await.unwrap().pushed);
    // The same commit again (a redelivery): nothing to push.
    assert!(!add(first.clone(), false, 1).await.unwrap().pushed);
    // An older commit of the session, indexed late: the entry stays.
    let older = Subdataset { commit: format!("{:040x}", 99), ..first.clone() };
    assert!(!add(older, true, 2).await.unwrap().pushed);
    // A newer one (an amendment), even under a changed session name: the entry moves, at its path.
    let newer = Subdataset { commit: format!("{:040x}", 100), path: "renamed/ses-1".into(), ..first.clone() };
    assert!(add(newer.clone(), false, 3).await.unwrap().pushed);
    let bare = Path::new(&project.push_url);
    assert_eq!(run(bare, &["rev-parse", &format!("main:{}", first.path)]).await, newer.commit);
    assert_eq!(run(bare, &["config", "--blob", "main:.gitmodules", "--get-regexp", "path"]).await.lines().count(), 1);
}
