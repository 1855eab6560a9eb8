//! The whole BIDS-flux layout of a study group: session projects, the study
//! superdataset with one subdataset per session, the BIDS project with its
//! branches, the derivatives and qc groups, in the local forge and in the fake
//! GitLab; `datalad clone` of the superdataset + `datalad get -r` returns
//! every DICOM.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use bidsflux_fake_gitlab::FakeGitlab;
use bidsflux_messaging::subjects;
use bidsflux_proto::v1 as pb;
use bidsflux_testsupport::dicom::StudySpec;
use support::{Archived, Harness, archive_study, git, next_dead_letter, next_indexed, publish, run_datalad};

/// Two studies of two PIs, and a second session of the first study.
struct Sessions {
    a1: Archived,
    a2: Archived,
    b1: Archived,
}

fn spec(pi: &str, description: &str, patient: &str) -> StudySpec {
    StudySpec {
        series: 2,
        instances_per_series: 2,
        referring_physician_name: pi.into(),
        study_description: description.into(),
        patient_name: patient.into(),
        ..StudySpec::default()
    }
}

async fn three_sessions(h: &Harness) -> Sessions {
    Sessions {
        a1: archive_study(h, spec("Smith", "Brain^StudyA", "sub-01^ses-1")).await,
        a2: archive_study(h, spec("Smith", "Brain^StudyA", "sub-02^ses-1")).await,
        b1: archive_study(h, spec("Jones", "Heart^StudyB", "sub-01^ses-1")).await,
    }
}

fn uid(a: &Archived) -> &str {
    &a.message.study_instance_uid
}

/// Publishes the three at once and returns their `StudyIndexed` by StudyInstanceUID.
async fn index_concurrently(h: &Harness, s: &Sessions) -> BTreeMap<String, pb::StudyIndexed> {
    let mut sub = h.bus.client.subscribe(subjects::STUDY_INDEXED).await.unwrap();
    for a in [&s.a1, &s.a2, &s.b1] {
        publish(h, &a.message).await;
    }
    let mut out = BTreeMap::new();
    while out.len() < 3 {
        let ev = next_indexed(&mut sub).await;
        out.insert(ev.study_instance_uid.clone(), ev);
    }
    out
}

/// Every `*.git` repository and every other leaf directory under `dir`, relative.
fn forge_tree(dir: &Path) -> BTreeSet<String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        let mut leaf = true;
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if !p.is_dir() {
                continue;
            }
            leaf = false;
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if rel.ends_with(".git") {
                out.insert(rel);
            } else {
                walk(root, &p, out);
            }
        }
        if leaf && dir != root {
            out.insert(dir.strip_prefix(root).unwrap().to_string_lossy().into_owned());
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

fn expected_projects(s: &Sessions) -> BTreeSet<String> {
    [
        format!("Smith/StudyA/sourcedata/dicoms/{}", uid(&s.a1)),
        format!("Smith/StudyA/sourcedata/dicoms/{}", uid(&s.a2)),
        "Smith/StudyA/sourcedata/dicoms/study".into(),
        "Smith/StudyA/bids".into(),
        format!("Jones/StudyB/sourcedata/dicoms/{}", uid(&s.b1)),
        "Jones/StudyB/sourcedata/dicoms/study".into(),
        "Jones/StudyB/bids".into(),
    ]
    .into()
}

/// `(path, url, datalad-id)` of the subdatasets `.gitmodules` lists at `rev` of `repo`.
async fn submodules(repo: &Path, rev: &str) -> BTreeMap<String, (String, String)> {
    let blob = format!("{rev}:.gitmodules");
    let list = git(repo, &["config", "--blob", &blob, "--list"]).await;
    let mut by_name: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for line in list.lines() {
        let (key, value) = line.split_once('=').unwrap();
        let rest = key.strip_prefix("submodule.").unwrap();
        let (name, var) = rest.rsplit_once('.').unwrap();
        by_name.entry(name.to_owned()).or_default().insert(var.to_owned(), value.to_owned());
    }
    by_name.into_values().map(|v| (v["path"].clone(), (v["url"].clone(), v["datalad-id"].clone()))).collect()
}

/// Checks the study superdataset and the BIDS dataset of `Smith/StudyA` in
/// the bare repositories `repo(project path)`.
async fn check_group_a(s: &Sessions, indexed: &BTreeMap<String, pb::StudyIndexed>, repo: impl Fn(&str) -> PathBuf) {
    let study = repo("Smith/StudyA/sourcedata/dicoms/study");
    let (i1, i2) = (&indexed[uid(&s.a1)], &indexed[uid(&s.a2)]);
    let subs = submodules(&study, "main").await;
    assert_eq!(
        subs,
        BTreeMap::from([
            ("sub-01/ses-1".to_owned(), (format!("../{}.git", uid(&s.a1)), i1.dataset_id.clone())),
            ("sub-02/ses-1".to_owned(), (format!("../{}.git", uid(&s.a2)), i2.dataset_id.clone())),
        ])
    );
    assert_eq!(git(&study, &["rev-parse", "main:sub-01/ses-1"]).await, i1.commit);
    assert_eq!(git(&study, &["rev-parse", "main:sub-02/ses-1"]).await, i2.commit);
    assert_eq!(i1.study_project_path, "Smith/StudyA/sourcedata/dicoms/study");
    // The superdataset is a DataLad dataset from the template, created once.
    let roots = git(&study, &["rev-list", "--max-parents=0", "main"]).await;
    assert_eq!(roots.lines().count(), 1);
    let env = git(&study, &["show", "main:.ci-env.yml"]).await;
    assert!(env.contains("STUDY_PATH: \"Smith/StudyA/sourcedata/dicoms/study\""), "{env}");
    assert!(env.contains("BIDS_PATH: \"Smith/StudyA/bids\""), "{env}");
    let ci = git(&study, &["show", "main:.gitlab-ci.yml"]).await;
    assert!(ci.contains("ni-dataops/ci-pipelines"), "{ci}");
    let study_id = git(&study, &["config", "--blob", "main:.datalad/config", "datalad.dataset.id"]).await;
    assert!(git(&study, &["rev-parse", "--verify", "git-annex"]).await.len() == 40);

    let bids = repo("Smith/StudyA/bids");
    let main = git(&bids, &["rev-parse", "main"]).await;
    assert_eq!(git(&bids, &["rev-parse", "dev"]).await, main);
    assert_eq!(git(&bids, &["rev-parse", "base"]).await, main);
    let files = git(&bids, &["ls-tree", "--name-only", "main"]).await;
    for f in [".bids_init", ".bidsignore", ".datalad", ".derivatives", ".gitattributes", ".gitignore", ".gitlab-ci.yml"]
    {
        assert!(files.lines().any(|l| l == f), "{f} missing from the BIDS dataset: {files}");
    }
    assert_eq!(git(&bids, &["show", "main:.derivatives"]).await, "qc/mriqc");
    assert_eq!(
        submodules(&bids, "main").await,
        BTreeMap::from([(
            "sourcedata/dicoms".to_owned(),
            ("../sourcedata/dicoms/study.git".to_owned(), study_id.clone())
        )])
    );
    let recorded = git(&bids, &["rev-parse", "main:sourcedata/dicoms"]).await;
    let history = git(&study, &["rev-list", "main"]).await;
    assert!(history.lines().any(|c| c == recorded), "the BIDS dataset records a commit of the study superdataset");
}

/// Clones the superdataset at `url` as a user would and gets every session:
/// each DICOM is byte-identical, the archive is in S3.
async fn datalad_gets_every_dicom(h: &Harness, url: &str, s: &Sessions) {
    let clone = h.tmp.path().join(format!("clone-{}", uid(&s.a1)));
    run_datalad(h, h.tmp.path(), &["clone", url, clone.to_str().unwrap()]).await;
    run_datalad(h, &clone, &["get", "-r", "."]).await;
    for (session, a) in [("sub-01/ses-1", &s.a1), ("sub-02/ses-1", &s.a2)] {
        for (path, original) in &a.originals {
            let got = std::fs::read(clone.join(session).join(path)).unwrap();
            assert!(got == *original, "{session}/{path} differs from what the scanner sent");
        }
        let whereis = git(&clone.join(session), &["annex", "whereis", &a.message.archive_name]).await;
        assert!(whereis.contains("[s3-dicoms]"), "{whereis}");
    }
}

#[tokio::test]
async fn the_local_forge_holds_the_whole_layout_and_datalad_gets_every_session() {
    let h = Harness::start().await;
    let s = three_sessions(&h).await;
    let indexed = index_concurrently(&h, &s).await;

    let mut expected: BTreeSet<String> = expected_projects(&s).into_iter().map(|p| format!("{p}.git")).collect();
    expected.extend(
        ["Smith/StudyA/derivatives", "Smith/StudyA/qc", "Jones/StudyB/derivatives", "Jones/StudyB/qc"]
            .map(String::from),
    );
    assert_eq!(forge_tree(&h.forge_dir), expected);
    check_group_a(&s, &indexed, |p| h.forge_dir.join(format!("{p}.git"))).await;
    let study_b = h.forge_dir.join("Jones/StudyB/sourcedata/dicoms/study.git");
    assert_eq!(submodules(&study_b, "main").await.keys().collect::<Vec<_>>(), ["sub-01/ses-1"]);

    let study = h.forge_dir.join("Smith/StudyA/sourcedata/dicoms/study.git");
    datalad_gets_every_dicom(&h, study.to_str().unwrap(), &s).await;

    // The BIDS dataset installs the superdataset, and through it the sessions.
    let bids = h.tmp.path().join("bids");
    let bids_url = h.forge_dir.join("Smith/StudyA/bids.git");
    run_datalad(&h, h.tmp.path(), &["clone", bids_url.to_str().unwrap(), bids.to_str().unwrap()]).await;
    run_datalad(&h, &bids, &["get", "-n", "-r", "sourcedata/dicoms"]).await;
    // It records the superdataset as it was when the BIDS dataset was made
    // (CI updates it later): with the first session indexed, maybe both.
    assert!(bids.join("sourcedata/dicoms/.ci-env.yml").is_file());
    let installed = ["sub-01/ses-1", "sub-02/ses-1"]
        .iter()
        .filter(|s| bids.join("sourcedata/dicoms").join(s).join(".datalad/config").is_file())
        .count();
    assert!(installed >= 1, "no session installed through the BIDS dataset");

    // Redelivery changes nothing: one entry per session, no new commit.
    let before = git(&study, &["rev-parse", "main"]).await;
    let bids_before = git(&bids_url, &["rev-parse", "main"]).await;
    let mut sub = h.bus.client.subscribe(subjects::STUDY_INDEXED).await.unwrap();
    publish(&h, &s.a2.message).await;
    let again = next_indexed(&mut sub).await;
    assert_eq!(again.study_commit, before);
    assert_eq!(git(&study, &["rev-parse", "main"]).await, before);
    assert_eq!(git(&bids_url, &["rev-parse", "main"]).await, bids_before);
    h.shutdown().await;
}

#[tokio::test]
async fn gitlab_gets_the_whole_layout_and_datalad_gets_every_session() {
    let fake = FakeGitlab::start().await.unwrap();
    let (bot, token) = fake.add_user("dicom_bot", false);
    let url = fake.url();
    let h = Harness::start_gitlab(&fake, &token, &[]).await;
    let s = three_sessions(&h).await;
    let indexed = index_concurrently(&h, &s).await;

    let projects: BTreeSet<String> = fake.projects().into_iter().map(|p| p.path_with_namespace).collect();
    assert_eq!(projects, expected_projects(&s));
    for group in ["Smith/StudyA/derivatives", "Smith/StudyA/qc", "Jones/StudyB/derivatives", "Jones/StudyB/qc"] {
        assert!(fake.group(group).is_some(), "group {group} missing");
    }
    assert!(fake.access_level("Smith/StudyA", bot) >= 40);
    for bids in ["Smith/StudyA/bids", "Jones/StudyB/bids"] {
        let protected: BTreeSet<String> = fake.protected_branches(bids).into_iter().map(|b| b.name).collect();
        assert_eq!(protected, ["base", "convert/*", "dev"].map(String::from).into(), "{bids}");
    }
    check_group_a(&s, &indexed, |p| fake.repo_dir(p).unwrap()).await;
    assert_eq!(indexed[uid(&s.a1)].clone_url, format!("{url}/Smith/StudyA/sourcedata/dicoms/{}.git", uid(&s.a1)));

    // A user clones the superdataset over HTTPS with a token: the relative
    // subdataset URLs resolve on GitLab, the DICOMs come from S3.
    let study_url = fake.git_url("Smith/StudyA/sourcedata/dicoms/study", &token);
    datalad_gets_every_dicom(&h, &study_url, &s).await;
    h.shutdown().await;
}

#[tokio::test]
async fn session_paths_taken_or_unusable_are_handled_without_patient_values() {
    let h = Harness::start().await;
    let mut dead = h.bus.client.subscribe(subjects::deadletter("indexer")).await.unwrap();
    let mut sub = h.bus.client.subscribe(subjects::STUDY_INDEXED).await.unwrap();
    let first = archive_study(&h, spec("Smith", "Brain^StudyA", "Rescan^Patient")).await;
    publish(&h, &first.message).await;
    next_indexed(&mut sub).await;

    // Another study with the same PatientName in the same group.
    let second = archive_study(&h, spec("Smith", "Brain^StudyA", "Rescan^Patient")).await;
    publish(&h, &second.message).await;
    let letter = next_dead_letter(&mut dead).await;
    assert_eq!(letter.kind(), pb::FailureKind::InvalidInput, "{}", letter.reason);
    assert!(letter.reason.contains(uid(&first)), "names the study holding the path: {}", letter.reason);
    assert!(letter.reason.contains("BIDSFLUX_SESSION_NAME_TEMPLATE"), "{}", letter.reason);
    assert!(!letter.reason.contains("Rescan") && !letter.reason.contains("Patient/"), "{}", letter.reason);
    // The session itself is safe in its project; the superdataset is unchanged.
    let study = h.forge_dir.join("Smith/StudyA/sourcedata/dicoms/study.git");
    assert!(h.forge_dir.join(format!("Smith/StudyA/sourcedata/dicoms/{}.git", uid(&second))).is_dir());
    assert_eq!(submodules(&study, "main").await.len(), 1);

    // A PatientName that cannot be a path (".x" would hide the session) or has
    // empty components: the session is indexed all the same, at its
    // StudyInstanceUID or with the empty components dropped.
    let hidden = archive_study(&h, spec("Smith", "Brain^StudyA", ".x^y")).await;
    publish(&h, &hidden.message).await;
    next_indexed(&mut sub).await;
    let named = archive_study(&h, spec("Smith", "Brain^StudyA", "DOE^JOHN^^MR")).await;
    publish(&h, &named.message).await;
    next_indexed(&mut sub).await;
    let paths: BTreeSet<String> = submodules(&study, "main").await.into_keys().collect();
    assert_eq!(paths, ["DOE/JOHN/MR".to_owned(), "Rescan/Patient".to_owned(), uid(&hidden).to_owned()].into());
    h.shutdown().await;
}

#[tokio::test]
async fn gitlab_over_ssh_gets_the_layout_with_no_git_over_https() {
    let fake = FakeGitlab::start().await.unwrap();
    let (bot, token) = fake.add_user("dicom_bot", false);
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("id_ed25519");
    let out = tokio::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "dicom_bot", "-f", key.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    fake.add_ssh_key(bot, &std::fs::read_to_string(key.with_extension("pub")).unwrap());
    let ssh = fake.start_ssh().await.unwrap();
    let port = ssh.port.to_string();
    let h = Harness::start_gitlab(
        &fake,
        &token,
        &[
            ("BIDSFLUX_GITLAB_GIT_TRANSPORT", "ssh"),
            ("GIT_SSH_PORT", port.as_str()),
            ("BIDSFLUX_GITLAB_SSH_USER", ssh.user.as_str()),
            ("GITLAB_SSH_KEY_FILE", key.to_str().unwrap()),
            ("GITLAB_SSH_KNOWN_HOSTS", ssh.known_hosts.to_str().unwrap()),
        ],
    )
    .await;
    let mut sub = h.bus.client.subscribe(subjects::STUDY_INDEXED).await.unwrap();
    let a = archive_study(&h, spec("Smith", "Brain^StudyA", "sub-01^ses-1")).await;
    publish(&h, &a.message).await;
    let ev = next_indexed(&mut sub).await;
    let session = format!("Smith/StudyA/sourcedata/dicoms/{}", uid(&a));
    let bare = fake.repo_dir(&session).unwrap();
    assert_eq!(git(&bare, &["rev-parse", "main"]).await, ev.commit);
    let study = fake.repo_dir("Smith/StudyA/sourcedata/dicoms/study").unwrap();
    assert_eq!(git(&study, &["rev-parse", "main:sub-01/ses-1"]).await, ev.commit);
    let branches = git(&fake.repo_dir("Smith/StudyA/bids").unwrap(), &["branch", "--format=%(refname:short)"]).await;
    assert_eq!(branches.lines().collect::<BTreeSet<_>>(), ["base", "dev", "git-annex", "main"].into());
    // Every fetch and push went over SSH; the API still used HTTPS with the token.
    let git_http: Vec<String> = fake.requests().into_iter().map(|(_, p)| p).filter(|p| p.contains(".git/")).collect();
    assert!(git_http.is_empty(), "git over HTTP: {git_http:?}");
    // The key was written for ssh, readable by the indexer only.
    let written: Vec<PathBuf> =
        std::fs::read_dir(h.tmp.path().join("work/.ssh")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(written.len(), 1, "{written:?}");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(std::fs::metadata(&written[0]).unwrap().permissions().mode() & 0o777, 0o600);

    // A host key that is not GitLab's is refused: the message is retried, not pushed.
    std::fs::write(
        &ssh.known_hosts,
        format!(
            "[127.0.0.1]:{port} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHqB6C5o2HaoUH2lv0GRjcJ5hYfEfk6b3oA7yR0kGVQY\n"
        ),
    )
    .unwrap();
    let b = archive_study(&h, spec("Smith", "Brain^StudyA", "sub-02^ses-1")).await;
    publish(&h, &b.message).await;
    // Wait until the job has failed once (it is redelivered), then check nothing was pushed.
    bidsflux_testsupport::wait_until(
        "the push to an unknown host to fail",
        std::time::Duration::from_secs(30),
        || async {
            let stream = h.bus.js.get_stream(subjects::STREAM_ARCHIVES).await.ok()?;
            let info = stream.consumer_info(subjects::CONSUMER_INDEXER).await.ok()?;
            (info.num_redelivered >= 1).then_some(())
        },
    )
    .await
    .unwrap();
    let b_repo = fake.repo_dir(&format!("Smith/StudyA/sourcedata/dicoms/{}", uid(&b))).unwrap();
    let heads = git(&b_repo, &["for-each-ref", "refs/heads"]).await;
    assert!(heads.is_empty(), "pushed to a host that is not in known_hosts: {heads}");
    h.stop.cancel();
    bidsflux_testsupport::wait_until("the key removed at exit", std::time::Duration::from_secs(20), || {
        let gone = !written[0].exists();
        async move { gone.then_some(()) }
    })
    .await
    .unwrap();
    h.shutdown().await;
}

#[tokio::test]
async fn datasets_without_main_are_never_replaced() {
    let h = Harness::start().await;
    let mut dead = h.bus.client.subscribe(subjects::deadletter("indexer")).await.unwrap();
    // A superdataset made before bidsflux, on master.
    let study = h.forge_dir.join("Smith/StudyA/sourcedata/dicoms/study.git");
    std::fs::create_dir_all(&study).unwrap();
    git(&study, &["init", "-q", "--bare", "-b", "master", "."]).await;
    let seed = h.tmp.path().join("seed");
    std::fs::create_dir_all(&seed).unwrap();
    git(&seed, &["init", "-q", "-b", "master", "."]).await;
    git(&seed, &["-c", "user.name=x", "-c", "user.email=x@y", "commit", "-q", "--allow-empty", "-m", "old"]).await;
    git(&seed, &["push", "-q", study.to_str().unwrap(), "master"]).await;

    let a = archive_study(&h, spec("Smith", "Brain^StudyA", "sub-01^ses-1")).await;
    publish(&h, &a.message).await;
    let letter = next_dead_letter(&mut dead).await;
    assert_eq!(letter.kind(), pb::FailureKind::InvalidInput, "{}", letter.reason);
    assert!(letter.reason.contains("no main branch but has master"), "{}", letter.reason);
    assert_eq!(git(&study, &["for-each-ref", "--format=%(refname)"]).await, "refs/heads/master");

    // A BIDS project on master: the session is indexed all the same, the project left alone.
    let bids = h.forge_dir.join("Jones/StudyB/bids.git");
    std::fs::create_dir_all(&bids).unwrap();
    git(&bids, &["init", "-q", "--bare", "-b", "master", "."]).await;
    git(&seed, &["push", "-q", bids.to_str().unwrap(), "master"]).await;
    let mut sub = h.bus.client.subscribe(subjects::STUDY_INDEXED).await.unwrap();
    let b = archive_study(&h, spec("Jones", "Heart^StudyB", "sub-01^ses-1")).await;
    publish(&h, &b.message).await;
    let ev = next_indexed(&mut sub).await;
    assert_eq!(ev.study_instance_uid, uid(&b));
    assert_eq!(git(&bids, &["for-each-ref", "--format=%(refname)"]).await, "refs/heads/master");
    h.shutdown().await;
}

/// A PI named in the normal PersonName form `Family^Given` gets
/// nested groups, as the original made them: `Smith/John/<StudyDescriptionPath[1]>`.
#[tokio::test]
async fn a_family_given_name_makes_nested_groups_as_the_original_did() {
    let h = Harness::start().await;
    let mut dead = h.bus.client.subscribe(subjects::deadletter("indexer")).await.unwrap();
    let mut sub = h.bus.client.subscribe(subjects::STUDY_INDEXED).await.unwrap();
    let a = archive_study(&h, spec("Smith^John", "Brain^StudyA", "sub-01^ses-1")).await;
    publish(&h, &a.message).await;
    let indexed = tokio::select! {
        ev = next_indexed(&mut sub) => ev,
        letter = next_dead_letter(&mut dead) => panic!("dead-lettered: {}", letter.reason),
    };
    let project = format!("Smith/John/StudyA/sourcedata/dicoms/{}", uid(&a));
    assert_eq!(indexed.project_path, project);
    let expected: BTreeSet<String> = [
        format!("{project}.git"),
        "Smith/John/StudyA/sourcedata/dicoms/study.git".into(),
        "Smith/John/StudyA/bids.git".into(),
        "Smith/John/StudyA/derivatives".into(),
        "Smith/John/StudyA/qc".into(),
    ]
    .into();
    assert_eq!(forge_tree(&h.forge_dir), expected);
    let study = h.forge_dir.join("Smith/John/StudyA/sourcedata/dicoms/study.git");
    assert_eq!(submodules(&study, "main").await.keys().collect::<Vec<_>>(), ["sub-01/ses-1"]);
    let ci_env = git(&study, &["show", "main:.ci-env.yml"]).await;
    assert!(ci_env.contains("Smith/John/StudyA/sourcedata/dicoms/study"), "{ci_env}");
    h.shutdown().await;
}
