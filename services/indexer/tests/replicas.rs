//! Three indexer replicas on one work queue, one of them killed with SIGKILL in the middle of a
//! job, on the local forge and on the fake GitLab: every session is still indexed, exactly once
//! (one project, one indexing commit, one superdataset entry).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bidsflux_fake_gitlab::FakeGitlab;
use bidsflux_messaging::subjects;
use bidsflux_proto::v1 as pb;
use bidsflux_testsupport::dicom::StudySpec;
use futures::StreamExt as _;
use prost::Message as _;
use support::{Harness, archive_study, git, publish, spawn_replica};

/// Whether the replica working in `work` holds a job: a job directory in its claimed scratch
/// directory (`indexer.<pid>.<n>/`, which otherwise holds only its `.lock`).
fn has_job(work: &Path) -> bool {
    let Ok(claims) = std::fs::read_dir(work) else { return false };
    claims.filter_map(Result::ok).any(|claim| {
        std::fs::read_dir(claim.path())
            .map(|mut d| d.any(|e| e.is_ok_and(|e| e.file_name() != ".lock")))
            .unwrap_or(false)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_and_a_kill_index_every_session_exactly_once() {
    // Replica 1 runs in this process; replicas 2 and 3 are processes.
    let h = Harness::start_with(&[("BIDSFLUX_INDEXER_CONCURRENCY", "1")]).await;
    let forge = h.forge_dir.clone();
    kill_one_of_three(h, &[], |p| forge.join(format!("{p}.git"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_gitlab_three_replicas_and_a_kill_index_every_session_exactly_once() {
    let fake = FakeGitlab::start().await.unwrap();
    let (_, token) = fake.add_user("dicom_bot", false);
    let url = fake.url();
    let gitlab = [("BIDSFLUX_FORGE", "gitlab"), ("GITLAB_URL", url.as_str()), ("GITLAB_TOKEN", token.as_str())];
    let h = Harness::start_gitlab(&fake, &token, &[("BIDSFLUX_INDEXER_CONCURRENCY", "1")]).await;
    kill_one_of_three(h, &gitlab, |p| fake.repo_dir(p).unwrap()).await;
    // One project per session and the study superdataset, nothing else under dicoms/.
    let under: Vec<String> = fake
        .projects()
        .into_iter()
        .map(|p| p.path_with_namespace)
        .filter(|p| p.starts_with("Investigator/Study1/sourcedata/dicoms/"))
        .collect();
    assert_eq!(under.len(), 10, "{under:?}");
}

/// Indexes 9 sessions with three replicas (the harness's and two processes
/// with the `forge` settings), kills one mid-job, and checks every session is
/// indexed exactly once in the forge whose bare repositories `repo` finds.
async fn kill_one_of_three(h: Harness, forge: &[(&str, &str)], repo: impl Fn(&str) -> PathBuf) {
    // The killed replica's message comes back after ack_wait: 5 s here instead of 120 s.
    let stream = h.bus.js.get_stream(subjects::STREAM_ARCHIVES).await.unwrap();
    let mut config = stream.clone().consumer_info(subjects::CONSUMER_INDEXER).await.unwrap().config.clone();
    config.ack_wait = Duration::from_secs(5);
    h.bus.js.update_consumer_on_stream(config, subjects::STREAM_ARCHIVES).await.unwrap();

    let (victim_work, other_work): (PathBuf, PathBuf) = (h.tmp.path().join("work-victim"), h.tmp.path().join("work-3"));
    let mut victim = spawn_replica(&h, &victim_work, forge);
    let mut other = spawn_replica(&h, &other_work, forge);
    // Both processes pull before anything is published.
    let consumer_waiting = || async {
        let s = h.bus.js.get_stream(subjects::STREAM_ARCHIVES).await.unwrap();
        s.consumer_info(subjects::CONSUMER_INDEXER).await.unwrap().num_waiting
    };
    bidsflux_testsupport::wait_until("three replicas pulling", Duration::from_secs(30), || async {
        (consumer_waiting().await >= 3).then_some(())
    })
    .await
    .unwrap();

    let sessions = 9;
    let mut studies = BTreeSet::new();
    let mut messages = Vec::new();
    for i in 0..sessions {
        // One participant per session: each is a subdataset of the study at its PatientName.
        let patient_name = format!("sub-{i:02}^ses-1");
        let spec = StudySpec { series: 2, instances_per_series: 60, patient_name, ..StudySpec::default() };
        let m = archive_study(&h, spec).await.message;
        studies.insert(m.study_instance_uid.clone());
        messages.push(m);
    }
    let mut indexed_sub = h.bus.client.subscribe(subjects::STUDY_INDEXED).await.unwrap();
    for m in &messages {
        publish(&h, m).await;
    }

    // Kill the victim as soon as it holds a job.
    bidsflux_testsupport::wait_until("the victim to start a job", Duration::from_secs(60), || {
        let work = victim_work.clone();
        async move { has_job(&work).then_some(()) }
    })
    .await
    .unwrap();
    victim.start_kill().unwrap();
    let status = victim.wait().await.unwrap();
    assert!(!status.success(), "the victim was not killed: {status}");
    assert!(has_job(&victim_work), "the victim's job directory is gone: it was not mid-job");

    let mut seen = BTreeSet::new();
    while seen.len() < studies.len() {
        let msg = tokio::time::timeout(Duration::from_secs(90), indexed_sub.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {} sessions indexed", seen.len(), studies.len()))
            .unwrap();
        seen.insert(pb::StudyIndexed::decode(msg.payload.as_ref()).unwrap().study_instance_uid);
    }
    assert_eq!(seen, studies);

    // Exactly once: one project per session, holding the dataset commit and one indexing commit.
    let dicoms = "Investigator/Study1/sourcedata/dicoms";
    for study in &studies {
        let bare = repo(&format!("{dicoms}/{study}"));
        let subjects = git(&bare, &["log", "--format=%s", "main"]).await;
        let lines: Vec<&str> = subjects.lines().collect();
        assert_eq!(lines.len(), 2, "{study}: {lines:?}");
        assert_eq!(lines.iter().filter(|l| l.starts_with("[bidsflux] index study")).count(), 1, "{study}: {lines:?}");
    }
    // One superdataset entry per session, at its indexing commit, whatever replica added it.
    let superdataset = repo(&format!("{dicoms}/study"));
    let modules = git(&superdataset, &["config", "--blob", "main:.gitmodules", "--get-regexp", "url"]).await;
    let urls: Vec<&str> = modules.lines().map(|l| l.rsplit(' ').next().unwrap()).collect();
    let expected: Vec<String> = studies.iter().map(|s| format!("../{s}.git")).collect();
    let mut sorted = urls.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, expected, "{modules}");
    for (i, m) in messages.iter().enumerate() {
        let gitlink = git(&superdataset, &["rev-parse", &format!("main:sub-{i:02}/ses-1")]).await;
        let session = repo(&format!("{dicoms}/{}", m.study_instance_uid));
        assert_eq!(gitlink, git(&session, &["rev-parse", "main"]).await);
    }
    let bids = repo("Investigator/Study1/bids");
    assert_eq!(git(&bids, &["rev-list", "--count", "main"]).await, "2", "one BIDS dataset, made once");
    assert_eq!(
        h.bus.js.get_stream(subjects::STREAM_DEADLETTER).await.unwrap().info().await.unwrap().state.messages,
        0,
        "dead letters"
    );

    other.start_kill().unwrap();
    let _ = other.wait().await;
    h.shutdown().await;
}
