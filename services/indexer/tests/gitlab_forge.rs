#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The GitLab forge against the fake GitLab (REST API v4 subset + git smart
//! HTTP): nested groups, bot membership, project, races, failures, and a
//! real push authenticated without the token in any URL or argument.

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use bidsflux_config::Secret;
use bidsflux_fake_gitlab::{FakeGitlab, access};
use bidsflux_indexer::config::{GitTransport, GitlabConfig, Visibility};
use bidsflux_indexer::forge::{Forge, ForgeError, ProjectPath};
use bidsflux_indexer::git::{Git, Identity};
use bidsflux_indexer::gitlab_forge::GitlabForge;

const SESSION: &str = "PI/Study1/sourcedata/dicoms/1.2.3";

fn config(fake: &FakeGitlab, token: &str) -> GitlabConfig {
    GitlabConfig {
        url: fake.url(),
        token: Secret::new(token),
        bot_username: "dicom_bot".into(),
        visibility: Visibility::Private,
        request_timeout: Duration::from_secs(5),
        transport: GitTransport::Https,
    }
}

fn posts(fake: &FakeGitlab) -> Vec<String> {
    fake.requests().into_iter().filter(|(m, _)| m == "POST").map(|(_, p)| p).collect()
}

fn git(program: &Path) -> Git {
    Git::new(
        program,
        Identity { name: "dicom_bot".into(), email: "dicom_bot@localhost".into() },
        Duration::from_secs(60),
    )
}

#[tokio::test]
async fn creates_nested_groups_bot_membership_and_project_once() {
    let fake = FakeGitlab::start().await.unwrap();
    let (bot, _) = fake.add_user("dicom_bot", false);
    let forge = GitlabForge::new(config(&fake, &fake.admin_token()));
    let path = ProjectPath::new(SESSION).unwrap();

    let project = forge.ensure_project(&path).await.unwrap();
    for group in ["PI", "PI/Study1", "PI/Study1/sourcedata", "PI/Study1/sourcedata/dicoms"] {
        let g = fake.group(group).unwrap_or_else(|| panic!("group {group} missing"));
        assert_eq!((g.full_path.as_str(), g.visibility.as_str()), (group, "private"));
    }
    let p = fake.project(SESSION).unwrap();
    assert_eq!(p.visibility, "private");
    assert_eq!(project.push_url, format!("{}/{SESSION}.git", fake.url()));
    assert_eq!(project.clone_url, project.push_url);
    assert!(!project.push_url.contains(&fake.admin_token()) && !project.push_url.contains('@'));
    // The bot is a direct Maintainer of the study group (and so of everything below).
    let members = fake.members("PI/Study1");
    assert!(members.iter().any(|m| m.user_id == bot && m.access_level == access::MAINTAINER), "{members:?}");
    assert_eq!(fake.access_level(SESSION, bot), access::MAINTAINER);
    assert!(fake.members("PI").iter().all(|m| m.user_id != bot));
    let created = posts(&fake);
    assert_eq!(created.iter().filter(|p| p.as_str() == "/api/v4/groups").count(), 4, "{created:?}");
    assert_eq!(created.iter().filter(|p| p.ends_with("/members")).count(), 1, "{created:?}");
    assert_eq!(created.iter().filter(|p| p.as_str() == "/api/v4/projects").count(), 1, "{created:?}");

    // Again, and from another replica: nothing new.
    assert_eq!(forge.ensure_project(&path).await.unwrap(), project);
    let replica = GitlabForge::new(config(&fake, &fake.admin_token()));
    assert_eq!(replica.ensure_project(&path).await.unwrap(), project);
    assert_eq!(posts(&fake), created);
    assert_eq!(fake.groups().len(), 4);
    assert_eq!(fake.projects().len(), 1);

    // A second session of the study only adds its project.
    let other = ProjectPath::new("PI/Study1/sourcedata/dicoms/1.2.4").unwrap();
    replica.ensure_project(&other).await.unwrap();
    let new: Vec<String> = posts(&fake).into_iter().skip(created.len()).collect();
    assert_eq!(new, vec!["/api/v4/projects".to_owned()]);
}

#[tokio::test]
async fn a_bot_that_already_maintains_the_group_is_left_alone() {
    let fake = FakeGitlab::start().await.unwrap();
    // The token is the bot's own: it creates the groups and owns them.
    let (bot, token) = fake.add_user("dicom_bot", false);
    let forge = GitlabForge::new(config(&fake, &token));
    forge.ensure_project(&ProjectPath::new(SESSION).unwrap()).await.unwrap();
    assert_eq!(fake.access_level("PI/Study1", bot), access::OWNER);
    assert!(posts(&fake).iter().all(|p| !p.ends_with("/members")), "{:?}", posts(&fake));

    // Inherited Maintainer access is enough as well.
    let fake = FakeGitlab::start().await.unwrap();
    let (bot, _) = fake.add_user("dicom_bot", false);
    fake.add_group("PI").unwrap();
    fake.set_member("PI", bot, access::MAINTAINER).unwrap();
    let forge = GitlabForge::new(config(&fake, &fake.admin_token()));
    forge.ensure_project(&ProjectPath::new(SESSION).unwrap()).await.unwrap();
    assert!(posts(&fake).iter().all(|p| !p.ends_with("/members")), "{:?}", posts(&fake));
    assert!(fake.members("PI/Study1").iter().all(|m| m.user_id != bot));

    // A Developer is raised to Maintainer.
    let fake = FakeGitlab::start().await.unwrap();
    let (bot, _) = fake.add_user("dicom_bot", false);
    fake.add_group("PI/Study1").unwrap();
    fake.set_member("PI/Study1", bot, access::DEVELOPER).unwrap();
    let forge = GitlabForge::new(config(&fake, &fake.admin_token()));
    forge.ensure_project(&ProjectPath::new(SESSION).unwrap()).await.unwrap();
    assert_eq!(fake.access_level("PI/Study1", bot), access::MAINTAINER);
}

#[tokio::test]
async fn git_pushes_with_the_token_in_no_url_or_argument() {
    let fake = FakeGitlab::start().await.unwrap();
    let (_, token) = fake.add_user("dicom_bot", false);
    let forge = GitlabForge::new(config(&fake, &token));
    let project = forge.ensure_project(&ProjectPath::new(SESSION).unwrap()).await.unwrap();

    // git behind a wrapper that records every argument it is given.
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("args.log");
    let wrapper = tmp.path().join("git-wrapper");
    std::fs::write(&wrapper, format!("#!/bin/sh\nprintf '%s\\n' \"$@\" >> '{}'\nexec git \"$@\"\n", log.display()))
        .unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let git = git(&wrapper);
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    git.run(&work, &["init", "-q", "-b", "main", "."]).await.unwrap();
    std::fs::write(work.join("README"), "hello\n").unwrap();
    git.run(&work, &["add", "README"]).await.unwrap();
    git.run(&work, &["commit", "-q", "-m", "first"]).await.unwrap();
    let commit = git.run(&work, &["rev-parse", "HEAD"]).await.unwrap().trim().to_owned();

    // Without the forge's configuration GitLab refuses, and the error shows no secret.
    let e = git.run(&work, &["push", "-q", &project.push_url, "main:refs/heads/main"]).await.unwrap_err().to_string();
    assert!(!e.contains(&token), "{e}");

    let remote = git.with_config(&project.git_config);
    let heads = remote.run(&work, &["ls-remote", &project.push_url]).await.unwrap();
    assert!(heads.trim().is_empty(), "{heads}");
    remote.run(&work, &["push", "-q", &project.push_url, "main:refs/heads/main"]).await.unwrap();
    remote.run(&work, &["fetch", "-q", &project.push_url, "main:refs/remotes/origin/main"]).await.unwrap();
    let bare = fake.repo_dir(SESSION).unwrap();
    let out = std::process::Command::new("git").args(["rev-parse", "refs/heads/main"]).current_dir(&bare).output();
    assert_eq!(String::from_utf8_lossy(&out.unwrap().stdout).trim(), commit);

    let args = std::fs::read_to_string(&log).unwrap();
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("oauth2:{token}"));
    assert!(args.contains(&project.push_url), "{args}");
    assert!(!args.contains(&token) && !args.contains(&basic), "secret in git arguments:\n{args}");
    assert!(!format!("{project:?} {remote:?}").contains(&basic));
}

#[tokio::test]
async fn gitlab_failures_are_retryable_or_refused_with_its_message() {
    let fake = FakeGitlab::start().await.unwrap();
    fake.add_user("dicom_bot", false);
    let forge = GitlabForge::new(config(&fake, &fake.admin_token()));
    let path = ProjectPath::new(SESSION).unwrap();

    // 502 on the first group look-up: retry later.
    fake.fail_next(Some("GET"), "/api/v4/groups", 502, 1);
    let e = forge.ensure_project(&path).await.unwrap_err();
    assert!(matches!(e, ForgeError::Unavailable(_)), "{e:?}");
    forge.ensure_project(&path).await.unwrap();

    // 403 on project creation: refused with GitLab's message.
    let other = ProjectPath::new("PI/Study1/sourcedata/dicoms/1.2.4").unwrap();
    fake.fail_next_with_message(Some("POST"), "/api/v4/projects", 403, "403 Forbidden - project limit reached", 1);
    let e = forge.ensure_project(&other).await.unwrap_err();
    assert!(matches!(&e, ForgeError::Refused(m) if m.contains("project limit reached")), "{e:?}");
    assert!(!e.to_string().contains(&fake.admin_token()));
    forge.ensure_project(&other).await.unwrap();

    // A group path GitLab refuses (a space is not allowed in a path).
    let bad = ProjectPath::new("PI/Study 2/sourcedata/dicoms/1.2.3").unwrap();
    let e = forge.ensure_project(&bad).await.unwrap_err();
    assert!(matches!(&e, ForgeError::Refused(m) if m.contains("create group PI/Study 2")), "{e:?}");
    assert!(fake.group("PI/Study 2").is_none());
    // Hostile session metas GitLab refuses as group paths: unicode, very long. A clear error,
    // no group made (`..`, `/` and empty values never get here: the template renderer and
    // ProjectPath refuse them).
    for segment in ["Müller".to_owned(), "a".repeat(300)] {
        let bad = ProjectPath::new(format!("PI/{segment}/sourcedata/dicoms/1.2.3")).unwrap();
        let e = forge.ensure_project(&bad).await.unwrap_err();
        assert!(matches!(&e, ForgeError::Refused(m) if m.contains("create group") && m.contains("400")), "{e:?}");
        assert!(fake.group(&format!("PI/{segment}")).is_none());
    }

    // A slow GitLab: unavailable after the request timeout.
    let mut cfg = config(&fake, &fake.admin_token());
    cfg.request_timeout = Duration::from_millis(500);
    let impatient = GitlabForge::new(cfg);
    fake.delay_next(Some("GET"), "/api/v4/projects", Duration::from_secs(3), 1);
    let e = impatient.ensure_project(&path).await.unwrap_err();
    assert!(matches!(&e, ForgeError::Unavailable(m) if m.contains("did not answer")), "{e:?}");

    // No such bot user: refused, naming it.
    let mut cfg = config(&fake, &fake.admin_token());
    cfg.bot_username = "nobody_bot".into();
    let e = GitlabForge::new(cfg)
        .ensure_project(&ProjectPath::new("PI2/Study/sourcedata/dicoms/1.2.3").unwrap())
        .await
        .unwrap_err();
    assert!(matches!(&e, ForgeError::Refused(m) if m.contains("nobody_bot")), "{e:?}");

    // A bad token: refused.
    let e = GitlabForge::new(config(&fake, "glpat-wrong")).ensure_project(&path).await.unwrap_err();
    assert!(matches!(&e, ForgeError::Refused(m) if m.contains("401")), "{e:?}");
    assert!(!e.to_string().contains("glpat-wrong"));
}

#[tokio::test]
async fn the_forge_starts_while_gitlab_is_down_and_recovers() {
    let fake = FakeGitlab::start().await.unwrap();
    fake.add_user("dicom_bot", false);
    // GitLab answers 503 while the client is built.
    fake.fail_next(None, "/api/v4/user", 503, 1);
    let forge = GitlabForge::new(config(&fake, &fake.admin_token()));
    let path = ProjectPath::new(SESSION).unwrap();
    let e = forge.ensure_project(&path).await.unwrap_err();
    assert!(matches!(e, ForgeError::Unavailable(_)), "{e:?}");
    forge.ensure_project(&path).await.unwrap();

    // Nothing listening at all.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut cfg = config(&fake, &fake.admin_token());
    cfg.url = format!("http://127.0.0.1:{port}");
    let e = GitlabForge::new(cfg).ensure_project(&path).await.unwrap_err();
    assert!(matches!(e, ForgeError::Unavailable(_)), "{e:?}");
}

#[tokio::test]
async fn concurrent_sessions_of_a_study_share_one_set_of_groups() {
    let fake = FakeGitlab::start().await.unwrap();
    let (bot, _) = fake.add_user("dicom_bot", false);
    // Two replicas, so the race happens at GitLab (not in one cache).
    let a = GitlabForge::new(config(&fake, &fake.admin_token()));
    let b = GitlabForge::new(config(&fake, &fake.admin_token()));
    let p1 = ProjectPath::new("PI/Study1/sourcedata/dicoms/1.2.3").unwrap();
    let p2 = ProjectPath::new("PI/Study1/sourcedata/dicoms/1.2.4").unwrap();
    let p3 = ProjectPath::new("PI/Study1/sourcedata/dicoms/1.2.5").unwrap();
    let (r1, r2, r3) = tokio::join!(a.ensure_project(&p1), b.ensure_project(&p2), a.ensure_project(&p3));
    r1.unwrap();
    r2.unwrap();
    r3.unwrap();
    let groups: Vec<String> = fake.groups().into_iter().map(|g| g.full_path).collect();
    assert_eq!(groups, ["PI", "PI/Study1", "PI/Study1/sourcedata", "PI/Study1/sourcedata/dicoms"]);
    assert_eq!(fake.projects().len(), 3);
    assert_eq!(fake.members("PI/Study1").iter().filter(|m| m.user_id == bot).count(), 1);
    assert_eq!(fake.access_level("PI/Study1", bot), access::MAINTAINER);

    // The same project from two replicas at once.
    let p4 = ProjectPath::new("PI/Study1/sourcedata/dicoms/1.2.6").unwrap();
    let (r1, r2) = tokio::join!(a.ensure_project(&p4), b.ensure_project(&p4));
    assert_eq!(r1.unwrap(), r2.unwrap());
    assert_eq!(fake.projects().len(), 4);
}

#[tokio::test]
async fn a_patient_data_group_never_appears_in_errors() {
    let fake = FakeGitlab::start().await.unwrap();
    fake.add_user("dicom_bot", false);
    let forge = GitlabForge::new(config(&fake, &fake.admin_token()));
    let path = ProjectPath::in_group("PI/P001", "sourcedata/dicoms/1.2.3", true).unwrap();
    let check = |e: ForgeError| {
        let shown = format!("{e} {e:?}");
        assert!(!shown.contains("P001"), "patient data in {shown}");
        e
    };

    fake.fail_next(Some("GET"), "/api/v4/groups", 502, 1);
    check(forge.ensure_project(&path).await.unwrap_err());
    // GitLab quoting the path in its message.
    fake.fail_next_with_message(Some("POST"), "/api/v4/groups", 403, "cannot create PI/P001 (PI%2FP001)", 1);
    let e = check(forge.ensure_project(&path).await.unwrap_err());
    assert!(matches!(&e, ForgeError::Refused(m) if m.contains("create group [redacted]")), "{e:?}");
    fake.fail_next(Some("POST"), "/api/v4/projects", 403, 1);
    let e = check(forge.ensure_project(&path).await.unwrap_err());
    assert!(matches!(&e, ForgeError::Refused(m) if m.contains("[redacted]/sourcedata/dicoms/1.2.3")), "{e:?}");
    fake.delay_next(Some("GET"), "/api/v4/projects", Duration::from_secs(3), 1);
    let mut cfg = config(&fake, &fake.admin_token());
    cfg.request_timeout = Duration::from_millis(500);
    check(GitlabForge::new(cfg).ensure_project(&path).await.unwrap_err());
    // A group (patient data as a single segment) GitLab refuses.
    let bad = ProjectPath::in_group("P 001/Study", "sourcedata/dicoms/1.2.3", true).unwrap();
    let e = forge.ensure_project(&bad).await.unwrap_err();
    let shown = format!("{e} {e:?}");
    assert!(!shown.contains("P 001"), "{shown}");

    // Connection errors quote the request URL (with the encoded path).
    let project = forge.ensure_project(&path).await.unwrap();
    assert!(project.push_url.contains("PI/P001"));
    let fresh = GitlabForge::new(config(&fake, &fake.admin_token()));
    fake.fail_next(Some("GET"), "/api/v4/groups/PI%2FP001", 500, 1);
    check(fresh.ensure_project(&path).await.unwrap_err());
    fake.stop();
    check(fresh.ensure_project(&path).await.unwrap_err());
}

#[tokio::test]
async fn branch_protection_and_subgroups_are_idempotent_and_fail_clearly() {
    let fake = FakeGitlab::start().await.unwrap();
    fake.add_user("dicom_bot", false);
    let forge = GitlabForge::new(config(&fake, &fake.admin_token()));
    let bids = ProjectPath::new("PI/Study1/bids").unwrap();
    forge.ensure_project(&bids).await.unwrap();
    let branches = ["convert/*".to_owned(), "dev".to_owned(), "base".to_owned()];

    // Branches that do not exist yet can be protected; twice changes nothing.
    forge.protect_branches(&bids, &branches).await.unwrap();
    forge.protect_branches(&bids, &branches).await.unwrap();
    let mut names: Vec<String> = fake.protected_branches("PI/Study1/bids").into_iter().map(|b| b.name).collect();
    names.sort();
    assert_eq!(names, ["base", "convert/*", "dev"]);

    // A site's own rule is left as it is (409: already protected).
    let other = ProjectPath::new("PI/Study2/bids").unwrap();
    forge.ensure_project(&other).await.unwrap();
    forge.protect_branches(&other, &["dev".to_owned()]).await.unwrap();
    let before = fake.protected_branches("PI/Study2/bids");
    forge.protect_branches(&other, &branches).await.unwrap();
    let after = fake.protected_branches("PI/Study2/bids");
    assert_eq!(after.iter().find(|b| b.name == "dev").map(|b| b.id), before.first().map(|b| b.id));

    // 5xx: retry later; 403: refused with GitLab's message.
    let third = ProjectPath::new("PI/Study3/bids").unwrap();
    forge.ensure_project(&third).await.unwrap();
    fake.fail_next(Some("POST"), "/api/v4/projects/", 503, 1);
    let e = forge.protect_branches(&third, &branches).await.unwrap_err();
    assert!(matches!(e, ForgeError::Unavailable(_)), "{e:?}");
    fake.fail_next_with_message(Some("POST"), "/api/v4/projects/", 403, "403 Forbidden", 1);
    let e = forge.protect_branches(&third, &branches).await.unwrap_err();
    assert!(matches!(&e, ForgeError::Refused(m) if m.contains("protect branch") && m.contains("403")), "{e:?}");
    forge.protect_branches(&third, &branches).await.unwrap();

    // Subgroups: created once, nested under the study group.
    fake.clear_requests();
    for group in ["PI/Study1/derivatives", "PI/Study1/qc"] {
        let g = ProjectPath::new(group).unwrap();
        forge.ensure_group(&g).await.unwrap();
        forge.ensure_group(&g).await.unwrap();
        assert!(fake.group(group).is_some(), "{group}");
    }
    assert_eq!(posts(&fake), ["/api/v4/groups", "/api/v4/groups"], "derivatives and qc, once each");
    assert_eq!(fake.group("PI/Study1/qc").unwrap().parent_id, fake.group("PI/Study1").map(|g| g.id));
}
