#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The fake GitLab (`bidsflux_fake_gitlab`) driven by the real `gitlab`
//! crate, raw HTTP where headers and exact bodies matter, and Debian's `git`
//! over smart HTTP.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use bidsflux_fake_gitlab::{FakeGitlab, access};
use gitlab::api::common::{AccessLevel, ProtectedAccessLevel, VisibilityLevel};
use gitlab::api::endpoint_prelude::{Cow, Endpoint, Method};
use gitlab::api::{self, ApiError, AsyncQuery, Pagination};
use gitlab::{AsyncGitlab, GitlabBuilder, RestError};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn client(fake: &FakeGitlab, token: &str) -> AsyncGitlab {
    GitlabBuilder::new(fake.host(), token).insecure().build_async().await.expect("gitlab client")
}

/// The status of a failed query, with its message if GitLab gave a string.
fn status_of(e: &ApiError<RestError>) -> (u16, String) {
    match e {
        ApiError::GitlabWithStatus { status, msg } => (status.as_u16(), msg.clone()),
        ApiError::GitlabObjectWithStatus { status, obj } => (status.as_u16(), obj.to_string()),
        ApiError::GitlabUnrecognizedWithStatus { status, obj } => (status.as_u16(), obj.to_string()),
        ApiError::GitlabService { status, data } => (status.as_u16(), String::from_utf8_lossy(data).into_owned()),
        other => panic!("unexpected error: {other:?}"),
    }
}

/// `GET /groups/:id/members/all/:user_id` (inherited members), which the crate lacks.
struct InheritedMember<'a> {
    group: &'a str,
    user: u64,
}

impl Endpoint for InheritedMember<'_> {
    fn method(&self) -> Method {
        Method::GET
    }
    fn endpoint(&self) -> Cow<'static, str> {
        format!("groups/{}/members/all/{}", self.group.replace('/', "%2F"), self.user).into()
    }
}

/// Finds or creates every group of `full_path`, as the indexer does; returns the last id.
async fn get_or_create_groups(gl: &AsyncGitlab, full_path: &str) -> u64 {
    let mut parent: Option<u64> = None;
    let mut prefix = String::new();
    for part in full_path.split('/') {
        if !prefix.is_empty() {
            prefix.push('/');
        }
        prefix.push_str(part);
        let found: Result<Value, _> =
            api::groups::Group::builder().group(prefix.as_str()).build().unwrap().query_async(gl).await;
        let id = match found {
            Ok(g) => g["id"].as_u64().unwrap(),
            Err(e) => {
                assert_eq!(status_of(&e).0, 404, "{e:?}");
                let mut b = api::groups::CreateGroup::builder();
                b.name(part).path(part);
                if let Some(p) = parent {
                    b.parent_id(p);
                }
                let g: Value = b.build().unwrap().query_async(gl).await.unwrap();
                g["id"].as_u64().unwrap()
            }
        };
        parent = Some(id);
    }
    parent.unwrap()
}

/// Minimal HTTP/1.1 request: (status, headers, body).
async fn raw(
    fake: &FakeGitlab,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Vec<(String, String)>, String) {
    let mut s = tokio::net::TcpStream::connect(fake.addr()).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
        fake.host(),
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines.next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> &'a str {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).unwrap_or("")
}

/// Runs Debian's git with no user or system configuration.
fn git(dir: &Path, args: &[&str]) -> Output {
    std::process::Command::new("/usr/bin/git")
        .current_dir(dir)
        .args(args)
        .env("HOME", dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_AUTHOR_NAME", "Test")
        .env("GIT_AUTHOR_EMAIL", "test@example.com")
        .env("GIT_COMMITTER_NAME", "Test")
        .env("GIT_COMMITTER_EMAIL", "test@example.com")
        .output()
        .expect("run git")
}

fn git_ok(dir: &Path, args: &[&str]) -> String {
    let out = git(dir, args);
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn git_err(dir: &Path, args: &[&str]) -> String {
    let out = git(dir, args);
    assert!(!out.status.success(), "git {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn current_user_and_authentication() {
    let fake = FakeGitlab::start().await.unwrap();
    let gl = client(&fake, &fake.admin_token()).await;
    let me: Value = api::users::CurrentUser::builder().build().unwrap().query_async(&gl).await.unwrap();
    assert_eq!(me["username"], "root");
    assert_eq!(me["is_admin"], true);
    assert!(fake.requests().contains(&("GET".into(), "/api/v4/user".into())));

    // Building a client with a bad token fails on GET /user.
    assert!(GitlabBuilder::new(fake.host(), "nope").insecure().build_async().await.is_err());
    let (status, _, body) = raw(&fake, "GET", "/api/v4/user", &[], "").await;
    assert_eq!((status, body.as_str()), (401, r#"{"message":"401 Unauthorized"}"#));
    let (status, _, body) = raw(&fake, "GET", "/api/v4/user", &[("PRIVATE-TOKEN", "wrong")], "").await;
    assert_eq!((status, body.as_str()), (401, r#"{"message":"401 Unauthorized"}"#));
    let bearer = format!("Bearer {}", fake.admin_token());
    let (status, _, body) = raw(&fake, "GET", "/api/v4/user", &[("Authorization", &bearer)], "").await;
    assert_eq!(status, 200, "{body}");

    // Unknown routes and resources.
    let tok = fake.admin_token();
    let (status, _, body) = raw(&fake, "GET", "/api/v4/nothing/here", &[("PRIVATE-TOKEN", &tok)], "").await;
    assert_eq!((status, body.as_str()), (404, r#"{"error":"404 Not Found"}"#));
    let (status, _, body) = raw(&fake, "GET", "/api/v4/groups/nope%2Fnothing", &[("PRIVATE-TOKEN", &tok)], "").await;
    assert_eq!((status, body.as_str()), (404, r#"{"message":"404 Group Not Found"}"#));
    let (status, _, body) = raw(&fake, "GET", "/api/v4/projects/99", &[("PRIVATE-TOKEN", &tok)], "").await;
    assert_eq!((status, body.as_str()), (404, r#"{"message":"404 Project Not Found"}"#));

    // A read_api token may read but not write; JSON bodies are accepted too.
    let (uid, _) = fake.add_user("reader", false);
    let ro = fake.add_token(uid, &["read_api"], None);
    let (status, _, _) = raw(&fake, "GET", "/api/v4/user", &[("PRIVATE-TOKEN", &ro)], "").await;
    assert_eq!(status, 200);
    let body = r#"{"name":"X","path":"x"}"#;
    let (status, _, resp) =
        raw(&fake, "POST", "/api/v4/groups", &[("PRIVATE-TOKEN", &ro), ("Content-Type", "application/json")], body)
            .await;
    assert_eq!(status, 403, "{resp}");
    let (status, _, resp) =
        raw(&fake, "POST", "/api/v4/groups", &[("PRIVATE-TOKEN", &tok), ("Content-Type", "application/json")], body)
            .await;
    assert_eq!(status, 201, "{resp}");
    assert_eq!(fake.group("x").unwrap().name, "X");
    // An expired token is refused.
    let old = fake.add_token(uid, &["api"], Some("2000-01-01"));
    let (status, _, _) = raw(&fake, "GET", "/api/v4/user", &[("PRIVATE-TOKEN", &old)], "").await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn nested_groups_get_or_create_and_duplicates() {
    let fake = FakeGitlab::start().await.unwrap();
    let gl = client(&fake, &fake.admin_token()).await;
    let id = get_or_create_groups(&gl, "Investigator/Study1/sourcedata/dicoms").await;
    let g = fake.group("Investigator/Study1/sourcedata/dicoms").unwrap();
    assert_eq!(g.id, id);
    assert_eq!(g.full_name, "Investigator / Study1 / sourcedata / dicoms");
    assert_eq!(g.parent_id, Some(fake.group("Investigator/Study1/sourcedata").unwrap().id));
    assert_eq!(g.visibility, "private");

    // A second run finds everything: no POST.
    fake.clear_requests();
    assert_eq!(get_or_create_groups(&gl, "Investigator/Study1/sourcedata/dicoms").await, id);
    assert!(fake.requests().iter().all(|(m, _)| m == "GET"), "{:?}", fake.requests());
    assert!(fake.requests().contains(&("GET".into(), "/api/v4/groups/Investigator%2FStudy1%2Fsourcedata".into())));
    // Lookups by id and by full path agree; paths are case-insensitive like GitLab's routes.
    let by_id: Value = api::groups::Group::builder().group(id).build().unwrap().query_async(&gl).await.unwrap();
    assert_eq!(by_id["full_path"], "Investigator/Study1/sourcedata/dicoms");
    assert_eq!(by_id["web_url"], format!("{}/groups/Investigator/Study1/sourcedata/dicoms", fake.url()));

    // Duplicate path → 400 with GitLab's message.
    let parent = fake.group("Investigator/Study1").unwrap().id;
    let dup =
        api::groups::CreateGroup::builder().name("sourcedata").path("sourcedata").parent_id(parent).build().unwrap();
    let e = api::ignore(dup).query_async(&gl).await.unwrap_err();
    assert_eq!(status_of(&e), (400, r#"Failed to save group {:path=>["has already been taken"]}"#.into()));
    // Invalid path → 400; missing parameters → 400 with Grape's error.
    let bad = api::groups::CreateGroup::builder().name("bad").path("-bad.git").build().unwrap();
    let e = api::ignore(bad).query_async(&gl).await.unwrap_err();
    let (status, msg) = status_of(&e);
    assert_eq!(status, 400);
    assert!(msg.starts_with("Failed to save group {:path=>"), "{msg}");
    let tok = fake.admin_token();
    let (status, _, body) = raw(&fake, "POST", "/api/v4/groups", &[("PRIVATE-TOKEN", &tok)], "name=x").await;
    assert_eq!((status, body.as_str()), (400, r#"{"error":"path is missing"}"#));

    // Subgroups and search.
    let subs: Vec<Value> = api::groups::subgroups::GroupSubgroups::builder()
        .group("Investigator/Study1")
        .build()
        .unwrap()
        .query_async(&gl)
        .await
        .unwrap();
    assert_eq!(subs.len(), 1);
    assert_eq!(subs[0]["full_path"], "Investigator/Study1/sourcedata");
    let found: Vec<Value> =
        api::groups::Groups::builder().search("dicom").build().unwrap().query_async(&gl).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0]["id"], id);
}

#[tokio::test]
async fn projects_create_lookup_and_duplicates() {
    let fake = FakeGitlab::start().await.unwrap();
    let gl = client(&fake, &fake.admin_token()).await;
    let ns = get_or_create_groups(&gl, "pi/study1/sourcedata/dicoms").await;
    let uid = "1.2.840.113619.2.55.3.12345";
    let create = api::projects::CreateProject::builder().name(uid).path(uid).namespace_id(ns).build().unwrap();
    let p: Value = create.query_async(&gl).await.unwrap();
    let pwn = format!("pi/study1/sourcedata/dicoms/{uid}");
    assert_eq!(p["path_with_namespace"], pwn.as_str());
    assert_eq!(p["http_url_to_repo"], format!("{}/{pwn}.git", fake.url()));
    assert!(p["ssh_url_to_repo"].as_str().unwrap().ends_with(&format!(":{pwn}.git")));
    assert_eq!(p["default_branch"], "main");
    assert_eq!(p["namespace"]["id"], ns);
    assert_eq!(p["namespace"]["full_path"], "pi/study1/sourcedata/dicoms");
    assert_eq!(p["empty_repo"], true);
    assert!(fake.repo_dir(&pwn).unwrap().join("HEAD").is_file());

    // Lookup by URL-encoded path and by id.
    let by_path: Value =
        api::projects::Project::builder().project(pwn.as_str()).build().unwrap().query_async(&gl).await.unwrap();
    assert_eq!(by_path["id"], p["id"]);
    assert!(fake.requests().iter().any(|(_, path)| path.contains("pi%2Fstudy1%2Fsourcedata%2Fdicoms%2F1.2.840")));
    let by_id: Value = api::projects::Project::builder()
        .project(p["id"].as_u64().unwrap())
        .build()
        .unwrap()
        .query_async(&gl)
        .await
        .unwrap();
    assert_eq!(by_id["path_with_namespace"], pwn.as_str());

    // Duplicate → 400 "has already been taken".
    let dup = api::projects::CreateProject::builder().name(uid).path(uid).namespace_id(ns).build().unwrap();
    let e = api::ignore(dup).query_async(&gl).await.unwrap_err();
    let (status, msg) = status_of(&e);
    assert_eq!(status, 400);
    assert!(msg.contains("has already been taken"), "{msg}");

    // initialize_with_readme gives a real first commit on the default branch.
    let create = api::projects::CreateProject::builder()
        .name("bids")
        .namespace_id(fake.group("pi/study1").unwrap().id)
        .initialize_with_readme(true)
        .visibility(VisibilityLevel::Internal)
        .build()
        .unwrap();
    let bids: Value = create.query_async(&gl).await.unwrap();
    assert_eq!(bids["path_with_namespace"], "pi/study1/bids");
    assert_eq!(bids["visibility"], "internal");
    let branch: Value = api::projects::repository::branches::Branch::builder()
        .project("pi/study1/bids")
        .branch("main")
        .build()
        .unwrap()
        .query_async(&gl)
        .await
        .unwrap();
    assert_eq!(branch["name"], "main");
    assert_eq!(branch["default"], true);
    assert_eq!(branch["commit"]["title"], "Initial commit");
    let missing =
        api::projects::repository::branches::Branch::builder().project("pi/study1/bids").branch("dev").build().unwrap();
    let e = api::ignore(missing).query_async(&gl).await.unwrap_err();
    assert_eq!(status_of(&e), (404, "404 Branch Not Found".into()));

    // Group projects list.
    let listed: Vec<Value> = api::groups::projects::GroupProjects::builder()
        .group("pi/study1")
        .build()
        .unwrap()
        .query_async(&gl)
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["path"], "bids");
}

#[tokio::test]
async fn members_add_duplicate_inherited_and_edit() {
    let fake = FakeGitlab::start().await.unwrap();
    let gl = client(&fake, &fake.admin_token()).await;
    get_or_create_groups(&gl, "pi/study1/sourcedata/dicoms").await;
    let bot: Value = api::users::CreateUser::builder()
        .name("DICOM bot")
        .username("dicom_bot")
        .email("dicom_bot@example.com")
        .password(api::users::NewUserPassword::Random)
        .build()
        .unwrap()
        .query_async(&gl)
        .await
        .unwrap();
    let bot_id = bot["id"].as_u64().unwrap();

    let add = || {
        api::groups::members::AddGroupMember::builder()
            .group("pi/study1")
            .user(bot_id)
            .access_level(AccessLevel::Maintainer)
            .build()
            .unwrap()
    };
    let m: Value = add().query_async(&gl).await.unwrap();
    assert_eq!(m["access_level"], 40);
    assert_eq!(m["username"], "dicom_bot");
    let e = api::ignore(add()).query_async(&gl).await.unwrap_err();
    assert_eq!(status_of(&e), (409, "Member already exists".into()));

    // Direct membership only on pi/study1; inherited below it.
    let direct =
        api::groups::members::GroupMember::builder().group("pi/study1/sourcedata").user(bot_id).build().unwrap();
    let e = api::ignore(direct).query_async(&gl).await.unwrap_err();
    assert_eq!(status_of(&e), (404, "404 Member Not Found".into()));
    let inherited: Value =
        InheritedMember { group: "pi/study1/sourcedata/dicoms", user: bot_id }.query_async(&gl).await.unwrap();
    assert_eq!(inherited["access_level"], 40);
    let all: Vec<Value> = api::paged(
        api::groups::members::AllGroupMembers::builder().group("pi/study1/sourcedata").build().unwrap(),
        Pagination::All,
    )
    .query_async(&gl)
    .await
    .unwrap();
    let names: Vec<&str> = all.iter().map(|m| m["username"].as_str().unwrap()).collect();
    assert_eq!(names, ["root", "dicom_bot"]);
    assert!(all.iter().all(|m| m["access_level"].as_u64().unwrap() >= 40));

    // A lower direct level than the inherited one is refused, a higher one is fine.
    let lower = api::groups::members::AddGroupMember::builder()
        .group("pi/study1/sourcedata")
        .user(bot_id)
        .access_level(AccessLevel::Developer)
        .build()
        .unwrap();
    let e = api::ignore(lower).query_async(&gl).await.unwrap_err();
    assert_eq!(status_of(&e).0, 400);
    let edit = api::groups::members::EditGroupMember::builder()
        .group("pi/study1")
        .user(bot_id)
        .access_level(AccessLevel::Owner)
        .build()
        .unwrap();
    let m: Value = edit.query_async(&gl).await.unwrap();
    assert_eq!(m["access_level"], 50);
    assert_eq!(fake.access_level("pi/study1/sourcedata/dicoms", bot_id), access::OWNER);
    let members = fake.members("pi/study1");
    assert!(members.iter().any(|m| m.user_id == bot_id && m.access_level == access::OWNER));
}

#[tokio::test]
async fn protected_branches_with_wildcards() {
    let fake = FakeGitlab::start().await.unwrap();
    let gl = client(&fake, &fake.admin_token()).await;
    get_or_create_groups(&gl, "pi/study1").await;
    fake.add_project("pi/study1/bids").unwrap();
    let protect = |name: &'static str| {
        api::projects::protected_branches::ProtectBranch::builder()
            .project("pi/study1/bids")
            .name(name)
            .push_access_level(ProtectedAccessLevel::Maintainer)
            .merge_access_level(ProtectedAccessLevel::Developer)
            .build()
            .unwrap()
    };
    let b: Value = protect("convert/*").query_async(&gl).await.unwrap();
    assert_eq!(b["name"], "convert/*");
    assert_eq!(b["push_access_levels"][0]["access_level"], 40);
    assert_eq!(b["merge_access_levels"][0]["access_level"], 30);
    let e = api::ignore(protect("convert/*")).query_async(&gl).await.unwrap_err();
    assert_eq!(status_of(&e), (409, "Protected branch 'convert/*' already exists".into()));
    api::ignore(protect("dev")).query_async(&gl).await.unwrap();

    let rules = fake.protected_branches("pi/study1/bids");
    assert_eq!(rules.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["convert/*", "dev"]);
    let listed: Vec<Value> = api::projects::protected_branches::ProtectedBranches::builder()
        .project("pi/study1/bids")
        .build()
        .unwrap()
        .query_async(&gl)
        .await
        .unwrap();
    assert_eq!(listed.len(), 2);

    // Unprotect (the name travels URL-encoded: convert%2F%2A).
    let un = api::projects::protected_branches::UnprotectBranch::builder()
        .project("pi/study1/bids")
        .name("dev")
        .build()
        .unwrap();
    api::ignore(un).query_async(&gl).await.unwrap();
    assert_eq!(fake.protected_branches("pi/study1/bids").len(), 1);
    let un = api::projects::protected_branches::UnprotectBranch::builder()
        .project("pi/study1/bids")
        .name("dev")
        .build()
        .unwrap();
    assert_eq!(status_of(&api::ignore(un).query_async(&gl).await.unwrap_err()).0, 404);
}

#[tokio::test]
async fn pagination_offset_keyset_and_headers() {
    let fake = FakeGitlab::start().await.unwrap();
    let gl = client(&fake, &fake.admin_token()).await;
    let parent = get_or_create_groups(&gl, "many").await;
    for i in 0..25 {
        let name = format!("sub-{i:02}");
        let g = api::groups::CreateGroup::builder()
            .name(name.as_str())
            .path(name.as_str())
            .parent_id(parent)
            .build()
            .unwrap();
        api::ignore(g).query_async(&gl).await.unwrap();
    }

    // Offset pagination (subgroups): the crate walks pages of 10.
    fake.clear_requests();
    let subs: Vec<Value> = api::paged(
        api::groups::subgroups::GroupSubgroups::builder().group("many").build().unwrap(),
        Pagination::AllPerPageLimit(10),
    )
    .query_async(&gl)
    .await
    .unwrap();
    assert_eq!(subs.len(), 25);
    let names: Vec<&str> = subs.iter().map(|g| g["path"].as_str().unwrap()).collect();
    assert_eq!(names.first(), Some(&"sub-00"));
    assert_eq!(names.last(), Some(&"sub-24"));
    let log = fake.request_log();
    assert_eq!(log.iter().filter(|r| r.path == "/api/v4/groups/many/subgroups").count(), 3, "{log:?}");

    // Keyset pagination (/groups orders by name): the crate follows Link rel="next".
    fake.clear_requests();
    let groups: Vec<Value> =
        api::paged(api::groups::Groups::builder().search("sub-").build().unwrap(), Pagination::AllPerPageLimit(10))
            .query_async(&gl)
            .await
            .unwrap();
    assert_eq!(groups.len(), 25);
    let log = fake.request_log();
    let pages: Vec<&str> =
        log.iter().filter(|r| r.path == "/api/v4/groups").filter_map(|r| r.query.as_deref()).collect();
    assert_eq!(pages.len(), 3, "{pages:?}");
    assert!(pages[0].contains("pagination=keyset"));
    assert!(pages[1].contains("cursor="), "{pages:?}");
    // Everything at once with the default Pagination::All (per_page=100).
    let all: Vec<Value> =
        api::paged(api::groups::Groups::builder().build().unwrap(), Pagination::All).query_async(&gl).await.unwrap();
    assert_eq!(all.len(), 26);

    // GitLab's headers, on the server's own URL, default per_page 20.
    let tok = fake.admin_token();
    let (status, h, body) =
        raw(&fake, "GET", "/api/v4/groups/many/subgroups?search=sub", &[("PRIVATE-TOKEN", &tok)], "").await;
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Vec<Value>>(&body).unwrap().len(), 20);
    assert_eq!(header(&h, "x-total"), "25");
    assert_eq!(header(&h, "x-total-pages"), "2");
    assert_eq!(header(&h, "x-page"), "1");
    assert_eq!(header(&h, "x-per-page"), "20");
    assert_eq!(header(&h, "x-next-page"), "2");
    assert_eq!(header(&h, "x-prev-page"), "");
    let link = header(&h, "link");
    let base = format!("{}/api/v4/groups/many/subgroups?search=sub", fake.url());
    assert!(link.contains(&format!("<{base}&page=2&per_page=20>; rel=\"next\"")), "{link}");
    assert!(link.contains(&format!("<{base}&page=1&per_page=20>; rel=\"first\"")), "{link}");
    assert!(link.contains(&format!("<{base}&page=2&per_page=20>; rel=\"last\"")), "{link}");
    let (_, h, body) =
        raw(&fake, "GET", "/api/v4/groups/many/subgroups?page=2&per_page=20", &[("PRIVATE-TOKEN", &tok)], "").await;
    assert_eq!(serde_json::from_str::<Vec<Value>>(&body).unwrap().len(), 5);
    assert_eq!((header(&h, "x-next-page"), header(&h, "x-prev-page")), ("", "1"));
    assert!(header(&h, "link").contains("rel=\"prev\""));
    let (_, h, _) =
        raw(&fake, "GET", "/api/v4/groups/many/subgroups?per_page=500", &[("PRIVATE-TOKEN", &tok)], "").await;
    assert_eq!(header(&h, "x-per-page"), "100");
}

#[tokio::test]
async fn non_members_get_404_and_too_low_roles_403() {
    let fake = FakeGitlab::start().await.unwrap();
    let admin = client(&fake, &fake.admin_token()).await;
    get_or_create_groups(&admin, "pi/study1").await;
    fake.add_project("pi/study1/bids").unwrap();
    let (alice, alice_token) = fake.add_user("alice", false);
    let gl = client(&fake, &alice_token).await;

    // Not a member: the private group and project do not exist for her.
    let get = api::groups::Group::builder().group("pi/study1").build().unwrap();
    assert_eq!(status_of(&api::ignore(get).query_async(&gl).await.unwrap_err()), (404, "404 Group Not Found".into()));
    let get = api::projects::Project::builder().project("pi/study1/bids").build().unwrap();
    assert_eq!(status_of(&api::ignore(get).query_async(&gl).await.unwrap_err()), (404, "404 Project Not Found".into()));
    let listed: Vec<Value> = api::groups::Groups::builder().build().unwrap().query_async(&gl).await.unwrap();
    assert!(listed.is_empty());
    // Non-admins cannot create users.
    let u = api::users::CreateUser::builder()
        .name("x")
        .username("x")
        .email("x@example.com")
        .password(api::users::NewUserPassword::Random)
        .build()
        .unwrap();
    assert_eq!(status_of(&api::ignore(u).query_async(&gl).await.unwrap_err()).0, 403);

    // As a Developer of pi/study1 she sees it but may not change it.
    fake.set_member("pi/study1", alice, access::DEVELOPER).unwrap();
    let g: Value = api::groups::Group::builder().group("pi/study1").build().unwrap().query_async(&gl).await.unwrap();
    let gid = g["id"].as_u64().unwrap();
    // Ancestors of a group she belongs to are visible too.
    let _: Value = api::groups::Group::builder().group("pi").build().unwrap().query_async(&gl).await.unwrap();
    let sub = api::groups::CreateGroup::builder().name("qc").path("qc").parent_id(gid).build().unwrap();
    assert_eq!(status_of(&api::ignore(sub).query_async(&gl).await.unwrap_err()), (403, "403 Forbidden".into()));
    let add = api::groups::members::AddGroupMember::builder()
        .group(gid)
        .user(fake.admin_id())
        .access_level(AccessLevel::Reporter)
        .build()
        .unwrap();
    assert_eq!(status_of(&api::ignore(add).query_async(&gl).await.unwrap_err()).0, 403);
    let protect = api::projects::protected_branches::ProtectBranch::builder()
        .project("pi/study1/bids")
        .name("main")
        .build()
        .unwrap();
    assert_eq!(status_of(&api::ignore(protect).query_async(&gl).await.unwrap_err()).0, 403);
    let var = api::groups::variables::CreateGroupVariable::builder().group(gid).key("K").value("v").build().unwrap();
    assert_eq!(status_of(&api::ignore(var).query_async(&gl).await.unwrap_err()).0, 403);
    let project = api::projects::CreateProject::builder().name("p").namespace_id(gid).build().unwrap();
    let (status, msg) = status_of(&api::ignore(project).query_async(&gl).await.unwrap_err());
    assert_eq!(status, 400);
    assert!(msg.contains("namespace"), "{msg}");
    // A Maintainer may, but may not grant Owner.
    fake.set_member("pi/study1", alice, access::MAINTAINER).unwrap();
    let sub = api::groups::CreateGroup::builder().name("qc").path("qc").parent_id(gid).build().unwrap();
    api::ignore(sub).query_async(&gl).await.unwrap();
    assert_eq!(fake.access_level("pi/study1/qc", alice), access::OWNER, "creators own their groups");
    let (bob, _) = fake.add_user("bob", false);
    let owner = api::groups::members::AddGroupMember::builder()
        .group(gid)
        .user(bob)
        .access_level(AccessLevel::Owner)
        .build()
        .unwrap();
    assert_eq!(status_of(&api::ignore(owner).query_async(&gl).await.unwrap_err()).0, 403);
    let dev = api::groups::members::AddGroupMember::builder()
        .group(gid)
        .user(bob)
        .access_level(AccessLevel::Developer)
        .build()
        .unwrap();
    api::ignore(dev).query_async(&gl).await.unwrap();
}

#[tokio::test]
async fn failure_injection_and_delays() {
    let fake = FakeGitlab::start().await.unwrap();
    let gl = client(&fake, &fake.admin_token()).await;
    get_or_create_groups(&gl, "pi").await;
    fake.clear_requests();
    fake.fail_next(Some("GET"), "/api/v4/groups/pi", 502, 1);
    let get = || api::groups::Group::builder().group("pi").build().unwrap();
    let e = api::ignore(get()).query_async(&gl).await.unwrap_err();
    assert_eq!(status_of(&e), (502, "502 Bad Gateway".into()));
    api::ignore(get()).query_async(&gl).await.unwrap();
    let statuses: Vec<u16> =
        fake.request_log().iter().filter(|r| r.path == "/api/v4/groups/pi").map(|r| r.status).collect();
    assert_eq!(statuses, [502, 200]);

    // Other methods are not affected; a custom message; several times.
    fake.fail_next_with_message(Some("POST"), "/api/v4/groups", 403, "403 Forbidden - admin mode", 2);
    let _: Value = get().query_async(&gl).await.unwrap();
    let create = || api::groups::CreateGroup::builder().name("other").path("other").build().unwrap();
    for _ in 0..2 {
        let e = api::ignore(create()).query_async(&gl).await.unwrap_err();
        assert_eq!(status_of(&e), (403, "403 Forbidden - admin mode".into()));
    }
    api::ignore(create()).query_async(&gl).await.unwrap();

    // A delay, long enough for a client timeout.
    fake.delay_next(None, "/api/v4/groups", Duration::from_millis(600), 1);
    let tok = fake.admin_token();
    let slow = tokio::time::timeout(
        Duration::from_millis(200),
        raw(&fake, "GET", "/api/v4/groups/pi", &[("PRIVATE-TOKEN", &tok)], ""),
    )
    .await;
    assert!(slow.is_err(), "the delayed request should time out");
    let (status, _, _) = raw(&fake, "GET", "/api/v4/groups/pi", &[("PRIVATE-TOKEN", &tok)], "").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn users_tokens_runners_and_variables() {
    let fake = FakeGitlab::start().await.unwrap();
    let gl = client(&fake, &fake.admin_token()).await;
    let bot: Value = api::users::CreateUser::builder()
        .name("BIDS bot")
        .username("bids_bot")
        .email("bids_bot@example.com")
        .password(api::users::NewUserPassword::Password("a-long-password".into()))
        .build()
        .unwrap()
        .query_async(&gl)
        .await
        .unwrap();
    let bot_id = bot["id"].as_u64().unwrap();
    let dup = api::users::CreateUser::builder()
        .name("again")
        .username("bids_bot")
        .email("other@example.com")
        .password(api::users::NewUserPassword::Random)
        .build()
        .unwrap();
    assert_eq!(
        status_of(&api::ignore(dup).query_async(&gl).await.unwrap_err()),
        (409, "Username has already been taken".into())
    );
    let found: Vec<Value> =
        api::users::Users::builder().username("bids_bot").build().unwrap().query_async(&gl).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0]["id"], bot_id);

    use api::users::personal_access_tokens::{CreatePersonalAccessTokenForUser, PersonalAccessTokenScope};
    let t: Value = CreatePersonalAccessTokenForUser::builder()
        .user(bot_id)
        .name("indexer")
        .scope(PersonalAccessTokenScope::Api)
        .scope(PersonalAccessTokenScope::WriteRepository)
        .build()
        .unwrap()
        .query_async(&gl)
        .await
        .unwrap();
    let token = t["token"].as_str().unwrap();
    assert!(token.starts_with("glpat-"));
    assert_eq!(t["scopes"], serde_json::json!(["api", "write_repository"]));
    let as_bot = client(&fake, token).await;
    let me: Value = api::users::CurrentUser::builder().build().unwrap().query_async(&as_bot).await.unwrap();
    assert_eq!(me["username"], "bids_bot");
    assert!(fake.tokens().iter().any(|x| x.user_id == bot_id && x.name == "indexer"));

    // Runners.
    let gid = get_or_create_groups(&gl, "ni-dataops").await;
    let r: Value = api::users::CreateRunner::builder()
        .group(gid)
        .description("bids")
        .tag("bids")
        .tag("preproc")
        .build()
        .unwrap()
        .query_async(&gl)
        .await
        .unwrap();
    assert!(r["token"].as_str().unwrap().starts_with("glrt-"));
    let runners = fake.runners();
    assert_eq!(runners.len(), 1);
    assert_eq!(runners[0].runner_type, "group_type");
    assert_eq!(runners[0].tag_list, ["bids", "preproc"]);
    let inst: Value = api::users::CreateRunner::builder().instance().build().unwrap().query_async(&gl).await.unwrap();
    assert_eq!(inst["id"], 2);
    let denied = api::users::CreateRunner::builder().instance().build().unwrap();
    assert_eq!(status_of(&api::ignore(denied).query_async(&as_bot).await.unwrap_err()).0, 403);

    // Group variables: create, duplicate, masked too short, update, read back.
    use api::groups::variables::{CreateGroupVariable, GroupVariable, UpdateGroupVariable};
    let create = || {
        CreateGroupVariable::builder().group(gid).key("S3_SECRET").value("s3cr3t-value").masked(true).build().unwrap()
    };
    let v: Value = create().query_async(&gl).await.unwrap();
    assert_eq!(v["masked"], true);
    assert_eq!(status_of(&api::ignore(create()).query_async(&gl).await.unwrap_err()).0, 400);
    let short = CreateGroupVariable::builder().group(gid).key("SHORT").value("abc").masked(true).build().unwrap();
    assert_eq!(status_of(&api::ignore(short).query_async(&gl).await.unwrap_err()).0, 400);
    let upd = UpdateGroupVariable::builder()
        .group(gid)
        .key("S3_SECRET")
        .value("another-value")
        .protected(true)
        .build()
        .unwrap();
    api::ignore(upd).query_async(&gl).await.unwrap();
    let v: Value =
        GroupVariable::builder().group(gid).key("S3_SECRET").build().unwrap().query_async(&gl).await.unwrap();
    assert_eq!((v["value"].as_str(), v["protected"].as_bool()), (Some("another-value"), Some(true)));
    let vars = fake.variables(Some("ni-dataops"));
    assert_eq!(vars.len(), 1);
    let missing = GroupVariable::builder().group(gid).key("NOPE").build().unwrap();
    assert_eq!(
        status_of(&api::ignore(missing).query_async(&gl).await.unwrap_err()),
        (404, "404 Variable Not Found".into())
    );
    // Project variables, form-encoded through raw HTTP too.
    fake.add_project("ni-dataops/ci-pipelines").unwrap();
    let tok = fake.admin_token();
    let (status, _, body) = raw(
        &fake,
        "POST",
        "/api/v4/projects/ni-dataops%2Fci-pipelines/variables",
        &[("PRIVATE-TOKEN", &tok), ("Content-Type", "application/x-www-form-urlencoded")],
        "key=GIT_BOT_USERNAME&value=bids_bot&variable_type=env_var",
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(fake.variables(Some("ni-dataops/ci-pipelines"))[0].value, "bids_bot");
    let (status, _, _) = raw(
        &fake,
        "DELETE",
        "/api/v4/projects/ni-dataops%2Fci-pipelines/variables/GIT_BOT_USERNAME",
        &[("PRIVATE-TOKEN", &tok)],
        "",
    )
    .await;
    assert_eq!(status, 204);
    assert!(fake.variables(Some("ni-dataops/ci-pipelines")).is_empty());
}

#[tokio::test]
async fn git_clone_push_and_protected_branches_over_http() {
    let fake = FakeGitlab::start().await.unwrap();
    let gl = client(&fake, &fake.admin_token()).await;
    get_or_create_groups(&gl, "pi/study1").await;
    fake.add_project("pi/study1/bids").unwrap();
    let (dev, dev_token) = fake.add_user("dev", false);
    let (maint, maint_token) = fake.add_user("maint", false);
    let (rep, rep_token) = fake.add_user("rep", false);
    let (_, stranger_token) = fake.add_user("stranger", false);
    fake.set_member("pi/study1", dev, access::DEVELOPER).unwrap();
    fake.set_member("pi/study1", maint, access::MAINTAINER).unwrap();
    fake.set_member("pi/study1/bids", rep, access::REPORTER).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();

    // Maintainer: clone the empty repository, commit, push main and dev.
    let url = fake.git_url("pi/study1/bids", &maint_token);
    git_ok(work, &["clone", "--quiet", &url, "m"]);
    let m = work.join("m");
    std::fs::write(m.join("README"), "hello\n").unwrap();
    git_ok(&m, &["add", "README"]);
    git_ok(&m, &["commit", "--quiet", "-m", "first"]);
    git_ok(&m, &["push", "--quiet", "origin", "HEAD:main", "HEAD:dev", "HEAD:convert/sub-01"]);
    let head = git_ok(&m, &["rev-parse", "HEAD"]);
    let branch: Value = api::projects::repository::branches::Branch::builder()
        .project("pi/study1/bids")
        .branch("main")
        .build()
        .unwrap()
        .query_async(&gl)
        .await
        .unwrap();
    assert_eq!(branch["commit"]["id"], head.as_str());
    assert_eq!(branch["commit"]["title"], "first");
    // git first asked without credentials and was told to authenticate.
    let log = fake.request_log();
    assert!(log.iter().any(|r| r.path == "/pi/study1/bids.git/info/refs" && r.status == 401), "{log:?}");
    assert!(log.iter().any(|r| r.path == "/pi/study1/bids.git/git-receive-pack" && r.status == 200), "{log:?}");

    // A bigger push (several MB of incompressible data) streams through.
    let big: Vec<u8> = (0..6_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(m.join("big.bin"), &big).unwrap();
    git_ok(&m, &["add", "big.bin"]);
    git_ok(&m, &["commit", "--quiet", "-m", "big"]);
    git_ok(&m, &["push", "--quiet", "origin", "HEAD:main"]);

    // Reporter: may clone, may not push; stranger: 404; bad token: 401.
    git_ok(work, &["clone", "--quiet", &fake.git_url("pi/study1/bids", &rep_token), "r"]);
    assert_eq!(std::fs::read(work.join("r/big.bin")).unwrap(), big);
    let r = work.join("r");
    std::fs::write(r.join("x"), "x").unwrap();
    git_ok(&r, &["add", "x"]);
    git_ok(&r, &["commit", "--quiet", "-m", "x"]);
    let err = git_err(&r, &["push", "origin", "HEAD:feature"]);
    assert!(err.contains("403") || err.contains("not allowed to push"), "{err}");
    let err = git_err(work, &["clone", &fake.git_url("pi/study1/bids", &stranger_token), "s"]);
    assert!(err.contains("not found") || err.contains("404"), "{err}");
    let err = git_err(work, &["clone", &fake.git_url("pi/study1/bids", "glpat-wrong"), "b"]);
    assert!(err.contains("Authentication failed") || err.contains("401"), "{err}");
    let err = git_err(work, &["clone", &format!("{}/pi/study1/bids.git", fake.url()), "anon"]);
    assert!(err.contains("401") || err.contains("could not read Username"), "{err}");

    // Protect main (Maintainers push), dev (no one pushes) and convert/* (force push allowed).
    let protect = |name: &'static str, push: ProtectedAccessLevel, force: bool| {
        api::projects::protected_branches::ProtectBranch::builder()
            .project("pi/study1/bids")
            .name(name)
            .push_access_level(push)
            .allow_force_push(force)
            .build()
            .unwrap()
    };
    api::ignore(protect("main", ProtectedAccessLevel::Maintainer, false)).query_async(&gl).await.unwrap();
    api::ignore(protect("dev", ProtectedAccessLevel::NoAccess, false)).query_async(&gl).await.unwrap();
    api::ignore(protect("convert/*", ProtectedAccessLevel::Developer, true)).query_async(&gl).await.unwrap();

    // Developer: clone, unprotected branch OK, main refused, convert/* force push OK.
    git_ok(work, &["clone", "--quiet", &fake.git_url("pi/study1/bids", &dev_token), "d"]);
    let d = work.join("d");
    std::fs::write(d.join("dev.txt"), "dev\n").unwrap();
    git_ok(&d, &["add", "dev.txt"]);
    git_ok(&d, &["commit", "--quiet", "-m", "dev work"]);
    git_ok(&d, &["push", "--quiet", "origin", "HEAD:feature/x"]);
    let err = git_err(&d, &["push", "origin", "HEAD:main"]);
    assert!(err.contains("not allowed to push code to protected branches"), "{err}");
    git_ok(&d, &["commit", "--quiet", "--amend", "-m", "rewritten"]);
    git_ok(&d, &["push", "--quiet", "--force", "origin", "HEAD:convert/sub-01"]);

    // Maintainer: fast-forward main OK; force push, deletion and pushing to dev refused.
    git_ok(&m, &["pull", "--quiet", "--ff-only", "origin", "main"]);
    std::fs::write(m.join("more"), "more\n").unwrap();
    git_ok(&m, &["add", "more"]);
    git_ok(&m, &["commit", "--quiet", "-m", "more"]);
    git_ok(&m, &["push", "--quiet", "origin", "HEAD:main"]);
    git_ok(&m, &["commit", "--quiet", "--amend", "-m", "more, rewritten"]);
    let err = git_err(&m, &["push", "--force", "origin", "HEAD:main"]);
    assert!(err.contains("not allowed to force push"), "{err}");
    let err = git_err(&m, &["push", "origin", ":convert/sub-01"]);
    assert!(err.contains("only delete protected branches using the web interface"), "{err}");
    let err = git_err(&m, &["push", "origin", "HEAD:dev"]);
    assert!(err.contains("not allowed to push code to protected branches"), "{err}");
    // Unprotected branches can be deleted.
    git_ok(&m, &["push", "--quiet", "origin", ":feature/x"]);
    let branches: Vec<Value> = api::projects::repository::branches::Branches::builder()
        .project("pi/study1/bids")
        .build()
        .unwrap()
        .query_async(&gl)
        .await
        .unwrap();
    let mut names: Vec<&str> = branches.iter().map(|b| b["name"].as_str().unwrap()).collect();
    names.sort_unstable();
    assert_eq!(names, ["convert/sub-01", "dev", "main"]);
    assert!(branches.iter().all(|b| b["protected"] == true));

    // Failure injection on git paths: one 503, then it works.
    fake.fail_next(None, "/pi/study1/bids.git/", 503, 1);
    let err = git_err(work, &["clone", &fake.git_url("pi/study1/bids", &maint_token), "f1"]);
    assert!(err.contains("503"), "{err}");
    git_ok(work, &["clone", "--quiet", &fake.git_url("pi/study1/bids", &maint_token), "f2"]);
}

/// `raw` with a PRIVATE-TOKEN and a JSON body; the body parsed.
async fn post_json(fake: &FakeGitlab, token: &str, path: &str, body: &Value) -> (u16, Value) {
    let headers = [("PRIVATE-TOKEN", token), ("Content-Type", "application/json")];
    let (status, _, resp) = raw(fake, "POST", path, &headers, &body.to_string()).await;
    (status, serde_json::from_str(&resp).unwrap_or(Value::String(resp)))
}

/// `raw` GET with a PRIVATE-TOKEN; the body parsed.
async fn get_json(fake: &FakeGitlab, token: &str, path: &str) -> (u16, Value) {
    let (status, _, resp) = raw(fake, "GET", path, &[("PRIVATE-TOKEN", token)], "").await;
    (status, serde_json::from_str(&resp).unwrap_or(Value::String(resp)))
}

#[tokio::test]
async fn personal_access_token_rotation() {
    use api::personal_access_tokens::RotatePersonalAccessToken;
    let fake = FakeGitlab::start().await.unwrap();
    let admin = fake.admin_token();
    let (bot, bot_token) = fake.add_user("bids_bot", false);
    let old = fake.tokens().into_iter().find(|t| t.token == bot_token).unwrap();

    // A user rotates their own token (through the gitlab crate): same name and
    // scopes, a new secret, the old one revoked, a week's expiry by default.
    let as_bot = client(&fake, &bot_token).await;
    let new: Value =
        RotatePersonalAccessToken::builder().id(old.id).build().unwrap().query_async(&as_bot).await.unwrap();
    let new_token = new["token"].as_str().unwrap().to_owned();
    assert!(new_token.starts_with("glpat-") && new_token != bot_token, "{new}");
    assert_eq!((new["name"].as_str(), new["user_id"].as_u64()), (Some(old.name.as_str()), Some(bot)));
    assert_eq!(new["scopes"], serde_json::json!(old.scopes));
    assert_eq!((new["revoked"].as_bool(), new["active"].as_bool()), (Some(false), Some(true)));
    let expires = new["expires_at"].as_str().unwrap();
    assert!(expires.len() == 10 && expires > &old.created_at[..10], "{expires}");
    assert!(fake.tokens().iter().any(|t| t.id == old.id && t.revoked));
    let (status, _) = get_json(&fake, &bot_token, "/api/v4/user").await;
    assert_eq!(status, 401, "the old token is revoked");
    let (status, me) = get_json(&fake, &new_token, "/api/v4/user").await;
    assert_eq!((status, me["id"].as_u64()), (200, Some(bot)));

    // Rotating a revoked token; an admin rotates anyone's (status 200, with expires_at).
    let path = format!("/api/v4/personal_access_tokens/{}/rotate", old.id);
    let (status, body) = post_json(&fake, &admin, &path, &serde_json::json!({})).await;
    assert_eq!((status, body), (400, serde_json::json!({"message": "400 Bad request - Token already revoked"})));
    let path = format!("/api/v4/personal_access_tokens/{}/rotate", new["id"]);
    let (status, _, body) = raw(&fake, "POST", &path, &[("PRIVATE-TOKEN", &admin)], "expires_at=2031-01-31").await;
    assert_eq!(status, 200, "{body}");
    let rotated: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(rotated["expires_at"], "2031-01-31");
    // Only admins learn that a token does not exist; a user may not rotate others' tokens.
    let (status, body) =
        post_json(&fake, &admin, "/api/v4/personal_access_tokens/999/rotate", &serde_json::json!({})).await;
    assert_eq!((status, body), (404, serde_json::json!({"message": "404 Not Found"})));
    let bot_now = rotated["token"].as_str().unwrap();
    let path = format!("/api/v4/personal_access_tokens/{}/rotate", fake.tokens()[0].id);
    let (status, body) = post_json(&fake, bot_now, &path, &serde_json::json!({})).await;
    assert_eq!((status, body), (401, serde_json::json!({"message": "401 Unauthorized"})));
    let (status, body) =
        post_json(&fake, bot_now, "/api/v4/personal_access_tokens/999/rotate", &serde_json::json!({})).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = post_json(
        &fake,
        &admin,
        &format!("/api/v4/personal_access_tokens/{}/rotate", rotated["id"]),
        &serde_json::json!({"expires_at": "next week"}),
    )
    .await;
    assert_eq!((status, body), (400, serde_json::json!({"error": "expires_at is invalid"})));
    // `self` is the token used.
    let (status, body) =
        post_json(&fake, bot_now, "/api/v4/personal_access_tokens/self/rotate", &serde_json::json!({})).await;
    assert_eq!((status, body["name"].as_str()), (200, Some(old.name.as_str())));
}

const KEY_ALICE: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILV1DDQ3lYsqSZko3PKYo568Cp7CNN9CI1DY8fT2Cgeh alice@laptop";
const KEY_OTHER: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIH+yHgdkAYSBOIEMoWcivBVgvDTRZsgUD1tePnVCvtN2 other@host";
const KEY_ECDSA: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBPwxf9QDxTA8ppupk7rtvH+aZhaiLQHPOG6MkbE0iD76iuuPviqOGjxy9yRlE2zpKWgtQyLE7CeXdnR+Esd9tr8= ec@host";

#[tokio::test]
async fn user_ssh_keys_add_list_and_errors() {
    let fake = FakeGitlab::start().await.unwrap();
    let admin = fake.admin_token();
    let (alice, alice_token) = fake.add_user("alice", false);
    let (bob, _) = fake.add_user("bob", false);
    let keys_of = |u: u64| format!("/api/v4/users/{u}/keys");

    // Form-encoded, defaults: usage_type auth_and_signing, no expiry.
    let form = form_urlencoded::Serializer::new(String::new())
        .append_pair("title", "laptop")
        .append_pair("key", KEY_ALICE)
        .finish();
    let (status, _, body) = raw(
        &fake,
        "POST",
        &keys_of(alice),
        &[("PRIVATE-TOKEN", &admin), ("Content-Type", "application/x-www-form-urlencoded")],
        &form,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let k: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((k["title"].as_str(), k["key"].as_str()), (Some("laptop"), Some(KEY_ALICE)));
    assert_eq!((k["usage_type"].as_str(), k["expires_at"].clone()), (Some("auth_and_signing"), Value::Null));
    assert!(k["id"].as_u64().is_some() && k["created_at"].as_str().is_some());
    // JSON, with an expiry and a usage type.
    let body = serde_json::json!({"title": "ci", "key": KEY_ECDSA, "expires_at": "2099-01-31", "usage_type": "auth"});
    let (status, k2) = post_json(&fake, &admin, &keys_of(alice), &body).await;
    assert_eq!(status, 201, "{k2}");
    assert_eq!(
        (k2["expires_at"].as_str(), k2["usage_type"].as_str()),
        (Some("2099-01-31T00:00:00.000Z"), Some("auth"))
    );
    // Listed by id or username, by anyone signed in.
    let (status, list) = get_json(&fake, &alice_token, &keys_of(alice)).await;
    assert_eq!(status, 200);
    let titles: Vec<&str> = list.as_array().unwrap().iter().map(|k| k["title"].as_str().unwrap()).collect();
    assert_eq!(titles, ["laptop", "ci"]);
    let (_, by_name) = get_json(&fake, &alice_token, "/api/v4/users/alice/keys").await;
    assert_eq!(by_name, list);
    let (_, none) = get_json(&fake, &admin, &keys_of(bob)).await;
    assert_eq!(none, serde_json::json!([]));
    assert_eq!(fake.ssh_keys().iter().filter(|k| k.user_id == alice).count(), 2);

    // The same key (another comment) on any user: GitLab's fingerprint error.
    let same = KEY_ALICE.replace("alice@laptop", "copied");
    let (status, body) = post_json(&fake, &admin, &keys_of(bob), &serde_json::json!({"title": "x", "key": same})).await;
    assert_eq!(
        (status, body),
        (400, serde_json::json!({"message": {"fingerprint_sha256": ["has already been taken"]}}))
    );
    // Not an OpenSSH public key.
    for bad in
        ["ssh-ed25519 nope", "hello", "ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIH+yHgdkAYSBOIEMoWcivBVgvDTRZsgUD1tePnVCvtN2"]
    {
        let (status, body) =
            post_json(&fake, &admin, &keys_of(bob), &serde_json::json!({"title": "x", "key": bad})).await;
        assert_eq!(
            (status, body),
            (
                400,
                serde_json::json!({"message": {"key": ["is invalid"], "fingerprint_sha256": ["cannot be generated"]}})
            ),
            "{bad}"
        );
    }
    // Parameters, expiry, permissions, unknown user.
    let (status, body) = post_json(&fake, &admin, &keys_of(bob), &serde_json::json!({"title": "x"})).await;
    assert_eq!((status, body), (400, serde_json::json!({"error": "key is missing"})));
    let body = serde_json::json!({"title": "x", "key": KEY_OTHER, "usage_type": "push"});
    let (status, body) = post_json(&fake, &admin, &keys_of(bob), &body).await;
    assert_eq!((status, body), (400, serde_json::json!({"error": "usage_type does not have a valid value"})));
    let body = serde_json::json!({"title": "x", "key": KEY_OTHER, "expires_at": "2001-01-01"});
    let (status, body) = post_json(&fake, &admin, &keys_of(bob), &body).await;
    assert_eq!((status, body), (400, serde_json::json!({"message": {"key": ["has expired"]}})));
    let body = serde_json::json!({"title": "x", "key": KEY_OTHER});
    let (status, resp) = post_json(&fake, &alice_token, &keys_of(bob), &body).await;
    assert_eq!((status, resp), (403, serde_json::json!({"message": "403 Forbidden"})));
    let (status, resp) = post_json(&fake, &admin, "/api/v4/users/999/keys", &body).await;
    assert_eq!((status, resp), (404, serde_json::json!({"message": "404 User Not Found"})));
    let (status, resp) = get_json(&fake, &admin, "/api/v4/users/nobody/keys").await;
    assert_eq!((status, resp), (404, serde_json::json!({"message": "404 User Not Found"})));
    let (status, _) = post_json(&fake, &admin, &keys_of(bob), &body).await;
    assert_eq!(status, 201);
    assert_eq!(fake.ssh_keys().len(), 3);
}

#[tokio::test]
async fn runner_verify_with_the_runner_token() {
    let fake = FakeGitlab::start().await.unwrap();
    let gl = client(&fake, &fake.admin_token()).await;
    let r: Value = api::users::CreateRunner::builder().instance().build().unwrap().query_async(&gl).await.unwrap();
    let token = r["token"].as_str().unwrap();

    // As gitlab-runner does it: the runner's token only, no user.
    let (status, _, body) = raw(
        &fake,
        "POST",
        "/api/v4/runners/verify",
        &[("Content-Type", "application/json")],
        &serde_json::json!({"token": token, "system_id": "s_0123456789ab"}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v, serde_json::json!({"id": r["id"], "token": token, "token_expires_at": null}));
    // Through the gitlab crate (form-encoded).
    let v: Value = api::runners::VerifyRunner::builder()
        .token(token)
        .system_id("s_0123456789ab")
        .build()
        .unwrap()
        .query_async(&gl)
        .await
        .unwrap();
    assert_eq!(v["id"], r["id"]);
    // Unknown or deleted runner tokens are 403; the token is required.
    let (status, _, body) = raw(&fake, "POST", "/api/v4/runners/verify", &[], "token=glrt-nope").await;
    assert_eq!((status, body.as_str()), (403, r#"{"message":"403 Forbidden"}"#));
    let (status, _, body) = raw(&fake, "POST", "/api/v4/runners/verify", &[], "").await;
    assert_eq!((status, body.as_str()), (400, r#"{"error":"token is missing"}"#));
    let tok = fake.admin_token();
    let (status, _, _) =
        raw(&fake, "DELETE", &format!("/api/v4/runners/{}", r["id"]), &[("PRIVATE-TOKEN", &tok)], "").await;
    assert_eq!(status, 204);
    let (status, _, _) = raw(&fake, "POST", "/api/v4/runners/verify", &[], &format!("token={token}")).await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn commits_and_files_on_the_real_repository() {
    use api::projects::repository::commits::{CommitAction, CommitActionType, CreateCommit};
    use api::projects::repository::files::{File, FileRaw};
    use base64::Engine as _;
    let fake = FakeGitlab::start().await.unwrap();
    let admin = client(&fake, &fake.admin_token()).await;
    get_or_create_groups(&admin, "pi/study1").await;
    fake.add_project("pi/study1/bids").unwrap();
    let (dev, dev_token) = fake.add_user("dev", false);
    let (rep, rep_token) = fake.add_user("rep", false);
    fake.set_member("pi/study1", dev, access::DEVELOPER).unwrap();
    fake.set_member("pi/study1", rep, access::REPORTER).unwrap();
    let gl = client(&fake, &dev_token).await;
    let commits = "/api/v4/projects/pi%2Fstudy1%2Fbids/repository/commits";

    // The first commit of an empty repository, through the gitlab crate
    // (form-encoded `actions[][…]`; non-UTF-8 content goes as base64).
    let create = |path: &'static str, content: &'static [u8]| {
        CommitAction::builder().action(CommitActionType::Create).file_path(path).content(content).build().unwrap()
    };
    let first: Value = CreateCommit::builder()
        .project("pi/study1/bids")
        .branch("main")
        .commit_message("Seed the dataset\n\nby the provisioner")
        .action(create("dataset_description.json", b"{\"Name\": \"study1\"}\n"))
        .action(create("bin/blob.dat", &[0, 159, 146, 150]))
        .action(
            CommitAction::builder()
                .action(CommitActionType::Create)
                .file_path("code/run.sh")
                .content(&b"#!/bin/sh\n"[..])
                .execute_filemode(true)
                .build()
                .unwrap(),
        )
        .build()
        .unwrap()
        .query_async(&gl)
        .await
        .unwrap();
    let first_id = first["id"].as_str().unwrap().to_owned();
    assert_eq!(first_id.len(), 40);
    assert!(first_id.starts_with(first["short_id"].as_str().unwrap()));
    assert_eq!(
        (first["title"].as_str(), first["message"].as_str()),
        (Some("Seed the dataset"), Some("Seed the dataset\n\nby the provisioner"))
    );
    assert_eq!(first["parent_ids"], serde_json::json!([]));
    assert_eq!(
        (first["author_name"].as_str(), first["committer_email"].as_str()),
        (Some("dev"), Some("dev@example.com"))
    );
    assert_eq!(first["stats"]["additions"], 2);

    // It is a real commit on the real repository.
    let tmp = tempfile::tempdir().unwrap();
    let url = fake.git_url("pi/study1/bids", &dev_token);
    git_ok(tmp.path(), &["clone", "--quiet", &url, "c"]);
    let c = tmp.path().join("c");
    assert_eq!(git_ok(&c, &["rev-parse", "HEAD"]), first_id);
    assert_eq!(std::fs::read(c.join("bin/blob.dat")).unwrap(), [0, 159, 146, 150]);
    assert!(git_ok(&c, &["ls-tree", "HEAD", "code/run.sh"]).starts_with("100755 blob"));

    // A JSON body: update (base64), delete, create in new directories.
    let body = serde_json::json!({
        "branch": "main",
        "commit_message": "Update",
        "author_name": "Provisioner",
        "author_email": "provisioner@example.com",
        "actions": [
            {"action": "update", "file_path": "dataset_description.json", "content": "e30K", "encoding": "base64"},
            {"action": "delete", "file_path": "bin/blob.dat"},
            {"action": "create", "file_path": "/sub-01/anat/sub-01_T1w.json", "content": "{}"},
        ],
    });
    let (status, second) = post_json(&fake, &dev_token, commits, &body).await;
    assert_eq!(status, 201, "{second}");
    assert_eq!(second["parent_ids"], serde_json::json!([first_id]));
    assert_eq!((second["author_name"].as_str(), second["committer_name"].as_str()), (Some("Provisioner"), Some("dev")));
    let second_id = second["id"].as_str().unwrap().to_owned();
    git_ok(&c, &["pull", "--quiet", "--ff-only", "origin", "main"]);
    assert_eq!(std::fs::read_to_string(c.join("dataset_description.json")).unwrap(), "{}\n");
    assert!(!c.join("bin").exists());
    assert_eq!(std::fs::read_to_string(c.join("sub-01/anat/sub-01_T1w.json")).unwrap(), "{}");

    // GitLab's errors; none of them moves the branch.
    let action = |a: &str, path: &str| serde_json::json!({"branch": "main", "commit_message": "m", "actions": [{"action": a, "file_path": path, "content": "x"}]});
    let exists = serde_json::json!({"message": "A file with this name already exists"});
    let missing = serde_json::json!({"message": "A file with this name doesn't exist"});
    for (body, expected) in [
        (action("create", "dataset_description.json"), exists.clone()),
        (action("create", "sub-01/anat/sub-01_T1w.json/x"), exists),
        (action("create", "sub-01"), serde_json::json!({"message": "A directory with this name already exists"})),
        (action("update", "nope.txt"), missing.clone()),
        (action("delete", "nope.txt"), missing.clone()),
        (action("delete", "sub-01"), missing),
        (action("create", "../x"), serde_json::json!({"message": "Path cannot include directory traversal"})),
        (action("rename", "x"), serde_json::json!({"error": "actions[0][action] does not have a valid value"})),
        (
            serde_json::json!({"branch": "main", "commit_message": "m"}),
            serde_json::json!({"error": "actions is missing"}),
        ),
        (
            serde_json::json!({"branch": "main", "commit_message": "m", "actions": [{"action": "update", "file_path": "a"}]}),
            serde_json::json!({"error": "actions[0][content] is missing"}),
        ),
    ] {
        let (status, resp) = post_json(&fake, &dev_token, commits, &body).await;
        assert_eq!((status, &resp), (400, &expected), "{body}");
    }
    let on_branch = |branch: &str, start: Option<&str>| {
        let mut b = serde_json::json!({"branch": branch, "commit_message": "m", "actions": [{"action": "create", "file_path": format!("{branch}.txt")}]});
        if let Some(s) = start {
            b["start_branch"] = s.into();
        }
        b
    };
    let (status, resp) = post_json(&fake, &dev_token, commits, &on_branch("feature", None)).await;
    assert_eq!(
        (status, resp),
        (400, serde_json::json!({"message": "You can only create or edit files when you are on a branch"}))
    );
    let (status, resp) = post_json(&fake, &dev_token, commits, &on_branch("feature", Some("main"))).await;
    assert_eq!(status, 201, "{resp}");
    assert_eq!(resp["parent_ids"], serde_json::json!([second_id]));
    let (status, resp) = post_json(&fake, &dev_token, commits, &on_branch("feature", Some("main"))).await;
    assert_eq!(
        (status, resp),
        (
            400,
            serde_json::json!({"message": "A branch called 'feature' already exists. Switch to that branch in order to make changes"})
        )
    );
    // A Reporter may read, not commit; protected branches hold for the API too.
    let forbidden = serde_json::json!({"message": "403 Forbidden - You are not allowed to push into this branch"});
    let (status, resp) = post_json(&fake, &rep_token, commits, &on_branch("main", None)).await;
    assert_eq!((status, &resp), (403, &forbidden));
    let protect = api::projects::protected_branches::ProtectBranch::builder()
        .project("pi/study1/bids")
        .name("main")
        .push_access_level(ProtectedAccessLevel::Maintainer)
        .build()
        .unwrap();
    api::ignore(protect).query_async(&admin).await.unwrap();
    let (status, resp) = post_json(&fake, &dev_token, commits, &on_branch("main", None)).await;
    assert_eq!((status, &resp), (403, &forbidden));
    assert_eq!(git_ok(&fake.repo_dir("pi/study1/bids").unwrap(), &["rev-parse", "main"]), second_id);

    // Files: content base64 with GitLab's metadata, at any ref.
    let f: Value = File::builder()
        .project("pi/study1/bids")
        .file_path("sub-01/anat/sub-01_T1w.json")
        .ref_("main")
        .build()
        .unwrap()
        .query_async(&gl)
        .await
        .unwrap();
    assert_eq!(
        (f["file_name"].as_str(), f["file_path"].as_str()),
        (Some("sub-01_T1w.json"), Some("sub-01/anat/sub-01_T1w.json"))
    );
    assert_eq!(
        (f["size"].as_u64(), f["encoding"].as_str(), f["content"].as_str()),
        (Some(2), Some("base64"), Some("e30="))
    );
    assert_eq!(
        (f["ref"].as_str(), f["commit_id"].as_str(), f["last_commit_id"].as_str()),
        (Some("main"), Some(second_id.as_str()), Some(second_id.as_str()))
    );
    let repo = fake.repo_dir("pi/study1/bids").unwrap();
    assert_eq!(f["blob_id"].as_str().unwrap(), git_ok(&repo, &["rev-parse", "main:sub-01/anat/sub-01_T1w.json"]));
    let f: Value = File::builder()
        .project("pi/study1/bids")
        .file_path("dataset_description.json")
        .ref_(first_id.as_str())
        .build()
        .unwrap()
        .query_async(&gl)
        .await
        .unwrap();
    let content = base64::engine::general_purpose::STANDARD.decode(f["content"].as_str().unwrap()).unwrap();
    assert_eq!(content, b"{\"Name\": \"study1\"}\n");
    let (_, f) = get_json(
        &fake,
        &rep_token,
        "/api/v4/projects/pi%2Fstudy1%2Fbids/repository/files/dataset_description.json?ref=main",
    )
    .await;
    assert_eq!(f["content_sha256"], "ca3d163bab055381827226140568f3bef7eaac187cebd76878e0b63e9e442356");
    assert_eq!(
        (f["last_commit_id"].as_str(), f["execute_filemode"].as_bool()),
        (Some(second_id.as_str()), Some(false))
    );
    let (_, f) =
        get_json(&fake, &rep_token, "/api/v4/projects/pi%2Fstudy1%2Fbids/repository/files/code%2Frun.sh?ref=main")
            .await;
    assert_eq!((f["last_commit_id"].as_str(), f["execute_filemode"].as_bool()), (Some(first_id.as_str()), Some(true)));
    // Raw content, through the crate and without a ref (the default branch).
    let bytes =
        api::raw(FileRaw::builder().project("pi/study1/bids").file_path("code/run.sh").ref_("main").build().unwrap())
            .query_async(&gl)
            .await
            .unwrap();
    assert_eq!(bytes, b"#!/bin/sh\n");
    let (status, h, body) = raw(
        &fake,
        "GET",
        "/api/v4/projects/pi%2Fstudy1%2Fbids/repository/files/dataset_description.json/raw",
        &[("PRIVATE-TOKEN", &dev_token)],
        "",
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "{}\n"));
    assert_eq!(header(&h, "x-gitlab-commit-id"), second_id);
    // Missing files, refs and parameters.
    let files = "/api/v4/projects/pi%2Fstudy1%2Fbids/repository/files";
    for (path, status, expected) in [
        (format!("{files}/nope.txt?ref=main"), 404, serde_json::json!({"message": "404 File Not Found"})),
        (format!("{files}/sub-01?ref=main"), 404, serde_json::json!({"message": "404 File Not Found"})),
        (format!("{files}/bin%2Fblob.dat?ref=main"), 404, serde_json::json!({"message": "404 File Not Found"})),
        (format!("{files}/nope.txt/raw?ref=main"), 404, serde_json::json!({"message": "404 File Not Found"})),
        (
            format!("{files}/dataset_description.json?ref=nope"),
            404,
            serde_json::json!({"message": "404 Commit Not Found"}),
        ),
        (format!("{files}/dataset_description.json"), 400, serde_json::json!({"error": "ref is missing"})),
    ] {
        assert_eq!(get_json(&fake, &dev_token, &path).await, (status, expected), "{path}");
    }
    // bin/blob.dat is still in the first commit.
    let (status, _) = get_json(&fake, &dev_token, &format!("{files}/bin%2Fblob.dat?ref={first_id}")).await;
    assert_eq!(status, 200);
    // Private project, not a member: 404.
    let (_, stranger) = fake.add_user("stranger", false);
    let (status, resp) = get_json(&fake, &stranger, &format!("{files}/dataset_description.json?ref=main")).await;
    assert_eq!((status, resp), (404, serde_json::json!({"message": "404 Project Not Found"})));
    let (status, _) = post_json(&fake, &stranger, commits, &on_branch("main", None)).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn write_requests_count_writes_not_reads() {
    let fake = FakeGitlab::start().await.unwrap();
    let gl = client(&fake, &fake.admin_token()).await;
    get_or_create_groups(&gl, "pi").await;
    fake.add_project("pi/repo").unwrap();
    assert!(fake.write_requests().contains(&("POST".into(), "/api/v4/groups".into())), "{:?}", fake.write_requests());

    // A run that only reads (REST and a git clone) writes nothing.
    fake.clear_requests();
    assert_eq!(get_or_create_groups(&gl, "pi").await, fake.group("pi").unwrap().id);
    let tmp = tempfile::tempdir().unwrap();
    git_ok(tmp.path(), &["clone", "--quiet", &fake.git_url("pi/repo", &fake.admin_token()), "r"]);
    assert!(!fake.requests().is_empty());
    assert_eq!(fake.write_requests(), Vec::<(String, String)>::new());

    // A POST is a write; the GET before it is not.
    let tok = fake.admin_token();
    let (status, _, _) = raw(&fake, "GET", "/api/v4/groups/pi", &[("PRIVATE-TOKEN", &tok)], "").await;
    assert_eq!(status, 200);
    let (status, _, _) = raw(&fake, "POST", "/api/v4/groups", &[("PRIVATE-TOKEN", &tok)], "name=qc&path=qc").await;
    assert_eq!(status, 201);
    assert_eq!(fake.write_requests(), [("POST".to_owned(), "/api/v4/groups".to_owned())]);
    // So is a push; and clear_requests forgets them.
    let r = tmp.path().join("r");
    std::fs::write(r.join("f"), "x").unwrap();
    git_ok(&r, &["add", "f"]);
    git_ok(&r, &["commit", "--quiet", "-m", "f"]);
    git_ok(&r, &["push", "--quiet", "origin", "HEAD:main"]);
    assert!(fake.write_requests().contains(&("POST".into(), "/pi/repo.git/git-receive-pack".into())));
    fake.clear_requests();
    assert!(fake.write_requests().is_empty());
}
