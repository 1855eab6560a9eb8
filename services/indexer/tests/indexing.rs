//! The indexer end to end: ArchiveStored in, a DataLad dataset in the forge
//! that `datalad clone` + `datalad get` turn back into the original DICOMs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::Path;

use bidsflux_fake_gitlab::FakeGitlab;
use bidsflux_messaging::subjects;
use bidsflux_testsupport::dicom::StudySpec;
use support::{Harness, StudyFiles, archive, archive_study, git, next_indexed, publish, run_datalad};

/// Every file under `dir` except `.git`, relative, sorted.
fn files_under(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if e.file_name() == ".git" {
                continue;
            }
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[tokio::test]
async fn indexed_study_is_a_dataset_datalad_can_get_and_redelivery_converges() {
    let h = Harness::start().await;
    let spec = StudySpec { series: 2, instances_per_series: 5, ..StudySpec::default() };
    let archived = archive_study(&h, spec).await;
    let msg = &archived.message;
    let study = msg.study_instance_uid.clone();
    let mut indexed_sub = h.bus.client.subscribe(subjects::STUDY_INDEXED).await.unwrap();

    publish(&h, msg).await;
    let first = next_indexed(&mut indexed_sub).await;

    // The event describes the dataset in the forge.
    let project_path = format!("Investigator/Study1/sourcedata/dicoms/{study}");
    let bare = h.forge_dir.join(format!("{project_path}.git"));
    assert_eq!(first.study_instance_uid, study);
    assert_eq!(first.project_path, project_path);
    assert_eq!(first.clone_url, bare.to_str().unwrap());
    assert_eq!(first.archive_annex_key, msg.annex_key);
    assert_eq!(first.commit, git(&bare, &["rev-parse", "refs/heads/main"]).await);
    let trailer = git(&bare, &["log", "-1", "--format=%(trailers:key=Bidsflux-Archive-Key,valueonly)", "main"]).await;
    assert_eq!(trailer, msg.annex_key);
    let trust = git(&bare, &["cat-file", "-p", "git-annex:trust.log"]).await;
    assert!(trust.lines().all(|l| l.split(' ').nth(1) == Some("X")), "work repository not marked dead: {trust}");
    let commits = git(&bare, &["rev-list", "--count", "main"]).await;
    assert_eq!(commits, "2", "a new-dataset commit and the indexing commit");

    // The compatibility oracle: DataLad clones the dataset and gets every file.
    let clone = h.tmp.path().join("clone");
    run_datalad(&h, h.tmp.path(), &["clone", first.clone_url.as_str(), clone.to_str().unwrap()]).await;
    let id = git(&clone, &["config", "-f", ".datalad/config", "datalad.dataset.id"]).await;
    assert_eq!(id, first.dataset_id);
    let mut expected: Vec<String> = archived.originals.keys().cloned().collect();
    expected.extend([".datalad/.gitattributes".into(), ".datalad/config".into(), ".gitattributes".into()]);
    expected.push(msg.archive_name.clone());
    expected.sort();
    assert_eq!(files_under(&clone), expected);
    // Every DICOM is an annexed symlink with the key git-annex would compute.
    let lookup = git(&clone, &["annex", "find", "--include=*", "--format=${key} ${file}\\n"]).await;
    assert_eq!(lookup.lines().count(), archived.originals.len() + 1, "{lookup}");
    // One DICOM alone first: DataLad's archives remote must fetch the archive from S3 itself.
    let (one, original) = archived.originals.iter().next().unwrap();
    run_datalad(&h, &clone, &["get", one.as_str()]).await;
    assert!(std::fs::read(clone.join(one)).unwrap() == *original, "{one} differs from the original");
    run_datalad(&h, &clone, &["get", "."]).await;
    for (path, original) in &archived.originals {
        let got = std::fs::read(clone.join(path)).unwrap();
        assert!(got == *original, "{path} differs from the original after datalad get");
    }
    assert_eq!(std::fs::read(clone.join(&msg.archive_name)).unwrap().len() as u64, msg.size);

    // Redelivery: the same StudyIndexed again, no second commit.
    publish(&h, msg).await;
    let again = next_indexed(&mut indexed_sub).await;
    assert_eq!(again.commit, first.commit);
    assert_eq!(again.dataset_id, first.dataset_id);
    assert_eq!(git(&bare, &["rev-list", "--count", "main"]).await, "2");
    assert_eq!(git(&bare, &["rev-parse", "refs/heads/main"]).await, first.commit);

    h.shutdown().await;
}

#[tokio::test]
async fn with_gitlab_the_dataset_lands_in_a_project_datalad_can_get() {
    let fake = FakeGitlab::start().await.unwrap();
    let (bot, token) = fake.add_user("dicom_bot", false);
    let url = fake.url();
    let h = Harness::start_gitlab(&fake, &token, &[]).await;
    let spec = StudySpec { series: 1, instances_per_series: 3, ..StudySpec::default() };
    let archived = archive_study(&h, spec).await;
    let msg = &archived.message;
    let study = msg.study_instance_uid.clone();
    let mut indexed_sub = h.bus.client.subscribe(subjects::STUDY_INDEXED).await.unwrap();

    publish(&h, msg).await;
    let first = next_indexed(&mut indexed_sub).await;
    let project_path = format!("Investigator/Study1/sourcedata/dicoms/{study}");
    assert_eq!(first.project_path, project_path);
    assert_eq!(first.clone_url, format!("{url}/{project_path}.git"));
    assert!(fake.project(&project_path).is_some());
    assert_eq!(fake.access_level("Investigator/Study1", bot), 50, "the bot's token created the groups");
    let bare = fake.repo_dir(&project_path).unwrap();
    assert_eq!(git(&bare, &["rev-parse", "refs/heads/main"]).await, first.commit);
    assert!(git(&bare, &["rev-parse", "--verify", "refs/heads/git-annex"]).await.len() == 40);

    // A user clones it from GitLab with a token and gets every DICOM from S3.
    let clone = h.tmp.path().join("clone");
    let with_token = fake.git_url(&project_path, &token);
    run_datalad(&h, h.tmp.path(), &["clone", with_token.as_str(), clone.to_str().unwrap()]).await;
    assert_eq!(git(&clone, &["config", "-f", ".datalad/config", "datalad.dataset.id"]).await, first.dataset_id);
    run_datalad(&h, &clone, &["get", "."]).await;
    for (path, original) in &archived.originals {
        assert!(std::fs::read(clone.join(path)).unwrap() == *original, "{path} differs from the original");
    }

    // Redelivery reads the project back from GitLab: no second commit.
    publish(&h, msg).await;
    let again = next_indexed(&mut indexed_sub).await;
    assert_eq!(again.commit, first.commit);
    assert_eq!(git(&bare, &["rev-list", "--count", "main"]).await, "2");
    h.shutdown().await;
}

#[tokio::test]
async fn an_amendment_builds_on_the_existing_dataset() {
    let h = Harness::start().await;
    let mut indexed_sub = h.bus.client.subscribe(subjects::STUDY_INDEXED).await.unwrap();
    let spec = StudySpec { series: 1, instances_per_series: 3, ..StudySpec::default() };
    let first_files = StudyFiles::generate(&h, spec.clone());
    let mut first = archive(&h, &first_files, 0).await;
    // The public S3 endpoint has moved since the study was first indexed.
    first.message.location.as_mut().unwrap().public_url = "http://127.0.0.1:1".into();
    publish(&h, &first.message).await;
    let gen0 = next_indexed(&mut indexed_sub).await;

    // Late arrivals: the uploader archives the whole study again, same name, new key.
    let late = StudyFiles::generate(
        &h,
        StudySpec { study_instance_uid: Some(first_files.study.clone()), instances_per_series: 2, ..spec },
    );
    let mut all = first_files.clone();
    all.files.extend(late.files);
    let second = archive(&h, &all, 1).await;
    assert_ne!(second.message.annex_key, first.message.annex_key);
    publish(&h, &second.message).await;
    let gen1 = next_indexed(&mut indexed_sub).await;

    assert_eq!(gen1.generation, 1);
    assert_eq!(gen1.project_path, gen0.project_path);
    assert_eq!(gen1.dataset_id, gen0.dataset_id, "the dataset keeps its id");
    let bare = Path::new(&gen1.clone_url);
    assert_eq!(git(bare, &["rev-parse", "main^"]).await, gen0.commit, "the amendment commit follows the first");
    assert_eq!(git(bare, &["rev-list", "--count", "main"]).await, "3");
    // Still one S3 remote, now at the new endpoint.
    let remotes = git(bare, &["cat-file", "-p", "git-annex:remote.log"]).await;
    let s3: Vec<&str> = remotes.lines().filter(|l| l.contains(" name=s3-dicoms ")).collect();
    assert_eq!(s3.len(), 1, "{remotes}");
    assert!(s3[0].contains(&format!(" port={} ", h.s3.addr.port())), "{remotes}");

    let clone = h.tmp.path().join("clone");
    run_datalad(&h, h.tmp.path(), &["clone", gen1.clone_url.as_str(), clone.to_str().unwrap()]).await;
    run_datalad(&h, &clone, &["get", "."]).await;
    assert_eq!(second.originals.len(), 5);
    for (path, original) in &second.originals {
        assert!(std::fs::read(clone.join(path)).unwrap() == *original, "{path} differs after datalad get");
    }
    let archive_bytes = std::fs::read(clone.join(&second.message.archive_name)).unwrap();
    assert_eq!(archive_bytes.len() as u64, second.message.size, "the archive file points at the new archive");
    // The study superdataset moved its entry (one, at the PatientName) to the amendment.
    let study = h.forge_dir.join("Investigator/Study1/sourcedata/dicoms/study.git");
    assert_eq!(git(&study, &["rev-parse", "main:Doe/Jane"]).await, gen1.commit);
    assert_eq!(gen1.study_commit, git(&study, &["rev-parse", "main"]).await);
    assert_eq!(git(&study, &["config", "--blob", "main:.gitmodules", "--get-regexp", "path"]).await.lines().count(), 1);
    h.shutdown().await;
}

#[tokio::test]
async fn an_older_generation_indexed_late_keeps_the_newer_archive() {
    let h = Harness::start().await;
    let mut indexed_sub = h.bus.client.subscribe(subjects::STUDY_INDEXED).await.unwrap();
    let spec = StudySpec { series: 1, instances_per_series: 2, ..StudySpec::default() };
    let first_files = StudyFiles::generate(&h, spec.clone());
    let late = StudyFiles::generate(
        &h,
        StudySpec { study_instance_uid: Some(first_files.study.clone()), instances_per_series: 1, ..spec },
    );
    let mut all = first_files.clone();
    all.files.extend(late.files);
    let gen0 = archive(&h, &first_files, 0).await;
    let gen1 = archive(&h, &all, 1).await;

    publish(&h, &gen1.message).await;
    let indexed1 = next_indexed(&mut indexed_sub).await;
    publish(&h, &gen0.message).await;
    let indexed0 = next_indexed(&mut indexed_sub).await;

    assert_eq!(indexed0.generation, 0);
    assert_ne!(indexed0.commit, indexed1.commit);
    let bare = Path::new(&indexed0.clone_url);
    assert_eq!(git(bare, &["rev-list", "--count", "main"]).await, "3");
    let target = git(bare, &["cat-file", "-p", &format!("main:{}", gen1.message.archive_name)]).await;
    assert!(target.ends_with(&gen1.message.annex_key), "archive file points at {target}");
    // The superdataset follows the session's newest commit, whatever the order.
    let study = h.forge_dir.join("Investigator/Study1/sourcedata/dicoms/study.git");
    assert_eq!(git(&study, &["rev-parse", "main:Doe/Jane"]).await, git(bare, &["rev-parse", "main"]).await);
    h.shutdown().await;
}

/// Each replica serves `/healthz` and `/metrics` like the other services: sessions by result,
/// failures by kind, the time of each step.
#[tokio::test]
async fn healthz_and_metrics_count_sessions_failures_and_steps() {
    let port = bidsflux_testsupport::free_port().unwrap();
    let bind = format!("127.0.0.1:{port}");
    let h = Harness::start_with(&[("BIDSFLUX_INDEXER_HTTP_BIND", bind.as_str())]).await;
    let addr: std::net::SocketAddr = bind.parse().unwrap();
    let get = |path: &'static str| bidsflux_testsupport::scrape::http_get(addr, path);
    let metrics = || async move {
        let (status, body) = get("/metrics").await.unwrap();
        assert_eq!(status, 200);
        body
    };
    let value = |body: &str, sample: &str| {
        bidsflux_testsupport::scrape::sample(body, sample).unwrap_or_else(|| panic!("no {sample} in\n{body}"))
    };
    // Listening as soon as `run` binds: polled, as an orchestrator's probe would.
    let healthz =
        bidsflux_testsupport::wait_until("the indexer's /healthz", std::time::Duration::from_secs(10), || async move {
            get("/healthz").await.ok()
        })
        .await
        .unwrap();
    assert_eq!(healthz, (200, "ok\n".to_owned()));

    let archived = archive_study(&h, StudySpec { series: 1, instances_per_series: 2, ..StudySpec::default() }).await;
    let mut indexed_sub = h.bus.client.subscribe(subjects::STUDY_INDEXED).await.unwrap();
    publish(&h, &archived.message).await;
    next_indexed(&mut indexed_sub).await;
    publish(&h, &archived.message).await;
    next_indexed(&mut indexed_sub).await;
    // A message that does not decode is dead-lettered as malformed.
    let mut dead = h.bus.client.subscribe(format!("{}.>", subjects::DEADLETTER_PREFIX)).await.unwrap();
    h.bus.js.publish(subjects::ARCHIVE_STORED, vec![0xff, 0xff, 0xff].into()).await.unwrap().await.unwrap();
    support::next_dead_letter(&mut dead).await;

    let body = bidsflux_testsupport::wait_until(
        "the malformed message counted",
        std::time::Duration::from_secs(10),
        || async move {
            let body = metrics().await;
            (bidsflux_testsupport::scrape::sample(&body, "bidsflux_indexer_failures_total{kind=\"malformed\"}")
                == Some(1.0))
            .then_some(body)
        },
    )
    .await
    .unwrap();
    assert_eq!(value(&body, "bidsflux_indexer_sessions_total{result=\"indexed\"}"), 1.0);
    assert_eq!(value(&body, "bidsflux_indexer_sessions_total{result=\"already_indexed\"}"), 1.0);
    assert_eq!(value(&body, "bidsflux_indexer_failures_total{kind=\"transient\"}"), 0.0);
    assert_eq!(value(&body, "bidsflux_indexer_push_retries_total"), 0.0);
    assert_eq!(value(&body, "bidsflux_indexer_session_seconds_count"), 2.0);
    for step in ["project", "publish"] {
        assert_eq!(value(&body, &format!("bidsflux_indexer_step_seconds_count{{step=\"{step}\"}}")), 2.0, "{step}");
    }
    // Session, superdataset and BIDS steps ran for both deliveries (the second converged at once).
    assert_eq!(value(&body, "bidsflux_indexer_step_seconds_count{step=\"session\"}"), 2.0);
    assert!(!body.contains("1.2.826"), "no UID in a label:\n{body}");
    h.shutdown().await;
}
