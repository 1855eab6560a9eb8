//! A **fake** GitLab, for tests only: an in-memory imitation of a small part
//! of GitLab's REST API v4, plus real git repositories served over smart HTTP
//! and SSH. It is not GitLab and shares no code with it. It is a dev-dependency
//! of what it tests and is not part of the `make dev` binary.
//!
//! GitLab cannot run on the machines that run our tests, so code that talks to
//! GitLab (the indexer's forge, the provisioner) is tested against this. It
//! follows the behaviour documented for **GitLab 17.x** in the REST API
//! documentation (docs.gitlab.com/ee/api/: `groups`, `members`,
//! `group_level_variables`, `project_level_variables`, `instance_level_ci_variables`,
//! `projects`, `branches`, `protected_branches`, `commits`, `repository_files`,
//! `users`, `user_keys`, `user_tokens`, `personal_access_tokens`, `runners`,
//! `rest/index` for authentication, status codes and pagination):
//! paths, parameters, status codes, the fields of the responses that callers
//! use, and error bodies shaped like GitLab's (`{"message": ...}` for
//! application errors, `{"error": ...}` for parameter validation and unknown
//! routes). Where the documentation is silent, it does what GitLab is known to
//! do (e.g. `400 Failed to save group {:path=>["has already been taken"]}`).
//!
//! # What it serves
//!
//! - `GET /api/v4/user`, `GET /users` (`username`, `search`), `GET /users/:id`,
//!   `POST /users` (admin), `POST /users/:id/personal_access_tokens` (admin),
//!   `GET /personal_access_tokens` (`user_id`), `GET /personal_access_tokens/self`,
//!   `POST /personal_access_tokens/:id/rotate` (`expires_at`, a week by
//!   default; `self` too): revokes the token and answers `200` with a new one
//!   of the same name and scopes (admins rotate anyone's, users their own; a
//!   revoked token is `400 Bad request - Token already revoked`, an unknown
//!   one `404 Not Found` for admins and `401` for others, as in GitLab).
//! - SSH keys: `GET /users/:id/keys`, `POST /users/:id/keys` (admin; `title`,
//!   `key`, `expires_at`, `usage_type` default `auth_and_signing`). Keys must
//!   be OpenSSH public keys (`{"message":{"key":["is invalid"],…}}`) and are
//!   unique across the instance (`{"message":{"fingerprint_sha256":["has
//!   already been taken"]}}`; the fake compares key blobs).
//! - Groups: `GET /groups` (`search`, `top_level_only`, `all_available`,
//!   `order_by` name|path|id, `sort`), `GET /groups/:id` (id or URL-encoded
//!   full path), `POST /groups`, `GET /groups/:id/subgroups`,
//!   `GET /groups/:id/projects` (`include_subgroups`, `search`).
//! - Members of groups and projects: `GET|POST /…/:id/members`,
//!   `GET|PUT|DELETE /…/:id/members/:user_id`, `GET /…/:id/members/all` and
//!   `/…/:id/members/all/:user_id` (inherited members, highest level wins).
//! - CI/CD variables: `/groups/:id/variables`, `/projects/:id/variables`,
//!   `/admin/ci/variables` (admin), each with `GET|POST` and
//!   `GET|PUT|DELETE /:key`.
//! - Projects: `GET /projects` (`search`), `GET /projects/:id`, `POST /projects`
//!   (creates a bare repository; `initialize_with_readme` commits a README),
//!   `GET /projects/:id/repository/branches[/:branch]` (read from the real
//!   repository), `GET|POST /projects/:id/protected_branches`,
//!   `GET|DELETE /projects/:id/protected_branches/:name` (wildcards like
//!   `convert/*`).
//! - Repository files, on the real repository with git plumbing (no work
//!   tree): `POST /projects/:id/repository/commits` (Developer and the
//!   branch's protected branch rules; `branch`, `commit_message`,
//!   `start_branch`, `author_name`, `author_email`, `actions` of `create`,
//!   `update`, `delete`, `move`, `chmod` with `encoding` `text`|`base64`, as
//!   JSON or as the form fields `actions[][…]` the `gitlab` crate sends; the
//!   first commit of an empty repository needs no `start_branch`), with
//!   GitLab's `400` messages (`A file with this name already exists`, `A file
//!   with this name doesn't exist`, ...); `GET /projects/:id/repository/files/:file_path`
//!   (`ref`; content in base64 with `blob_id`, `last_commit_id`,
//!   `content_sha256`, ...; `404 File Not Found`, `404 Commit Not Found`) and
//!   `…/files/:file_path/raw` (`ref` optional: the default branch).
//! - Runners: `POST /user/runners` (`glrt-` tokens), `GET /runners/all`
//!   (admin), `GET|DELETE /runners/:id`, `POST /runners/verify` (no user: the
//!   runner's `token`; `403 Forbidden` if unknown).
//! - Git smart HTTP at `/<path_with_namespace>.git/{info/refs,git-upload-pack,git-receive-pack}`
//!   through `git http-backend` (CGI), authenticated with HTTP Basic where the
//!   password is a personal access token (any user name, e.g. `oauth2`).
//!   Protected branches are enforced on push by a `pre-receive` hook the fake
//!   installs in every repository: no deletion by push, no push below the
//!   rule's push level, no non-fast-forward update unless `allow_force_push`.
//!
//! Lists paginate like GitLab: offset pagination (`page`, `per_page` default
//! 20 and at most 100; `X-Total`, `X-Total-Pages`, `X-Page`, `X-Per-Page`,
//! `X-Next-Page`, `X-Prev-Page`; `Link` with `prev`/`next`/`first`/`last` on the
//! server's own URL), and keyset pagination when asked with
//! `pagination=keyset` (only a `Link` `rel="next"` carrying an opaque
//! `cursor`), which the `gitlab` crate uses for `/groups` and `/users`.
//!
//! Authentication: `PRIVATE-TOKEN: <token>`, `Authorization: Bearer <token>` or
//! `private_token=`; otherwise `401 {"message":"401 Unauthorized"}`. Token
//! scopes are checked (`api`, `read_api` for GET; `api`,
//! `read_repository`/`write_repository` for git). Permissions follow GitLab's
//! roles (Guest 10, Reporter 20, Developer 30, Maintainer 40, Owner 50;
//! admins can do everything): private things a user cannot see are 404,
//! visible things a user may not change are 403. Maintainer is needed to
//! create subgroups and projects in a group, to manage members (only Owners
//! grant Owner), protected branches and variables; Owner to create group
//! runners; Developer to push; Reporter to fetch private repositories.
//!
//! Git over HTTP answers like GitLab: no or wrong credentials → 401 with
//! `WWW-Authenticate: Basic realm="GitLab"` (so `git` retries with the
//! credentials of the URL), a private project the user cannot see → 404, a
//! member below Reporter (fetch) or Developer (push) → 403; public projects
//! can be cloned anonymously. When several protected branch rules match a
//! branch, a push is allowed if any rule allows it, a force push only if all
//! do. Request and response bodies are streamed through `git http-backend`,
//! so large pushes do not sit in memory.
//!
//! The creator of a group becomes its Owner (as in GitLab); a project's
//! creator gets no membership of its own (group projects inherit; personal
//! projects belong to their user). The server runs on its own runtime: tests
//! may block their thread (e.g. run `git` with `std::process`) while it serves.
//!
//! Tests can seed state directly ([`FakeGitlab::add_user`],
//! [`FakeGitlab::add_group`], ...), inspect it ([`FakeGitlab::group`],
//! [`FakeGitlab::members`], ...), read the request log
//! ([`FakeGitlab::requests`]; [`FakeGitlab::write_requests`] keeps those that
//! may write, to show that a second run changed nothing) and inject failures
//! or delays on any path, REST or git ([`FakeGitlab::fail_next`],
//! [`FakeGitlab::delay_next`]). A constant
//! [`Latency`] before every API and git request ([`FakeGitlab::set_latency`])
//! stands for a GitLab on another host; [`FakeGitlab::stop`] and
//! [`FakeGitlab::restart`] make an outage (connections refused, then served
//! again on the same port with the same state).
//!
//! # What it does not implement
//!
//! Everything else: merge requests, pipelines, jobs, issues, tags, the other
//! commits and files endpoints (listing, single commit, `PUT|POST|DELETE
//! /files`) and the `start_sha`, `start_project`, `force` and
//! `last_commit_id` parameters of a commit (the first three are refused),
//! webhooks, the other SSH key endpoints (`/user/keys`, deletion; keys can
//! also be seeded with [`FakeGitlab::add_ssh_key`]; git over SSH runs
//! through a real `sshd` with [`FakeGitlab::start_ssh`], whose forced command
//! asks a fake-only endpoint where gitlab-shell would ask GitLab's internal
//! API; signing-only keys do not log in), LFS, GraphQL, OAuth, passwords,
//! group/project access tokens, CI
//! job tokens, `sudo`, deletion and transfer of groups and projects, invites,
//! group sharing, member expiry, approval rules, the `allowed_to_*` per-user
//! or per-group protected branch rules (only the access levels), protected
//! tags, visibility inheritance checks (a public subgroup under a private group
//! is accepted), rate limiting, and GitLab's side effects of a push (the default
//! branch is what the project was created with, never updated by a push).
//! Keyset cursors are positions in the sorted list, not keys. Values it cannot
//! know (avatars, statistics) are `null` or absent.
//!
//! # Modules
//!
//! Leaves, which use no other module of the crate:
//!
//! - `state`: the data model (users, tokens, groups, projects, members,
//!   protected branches, variables, runners, SSH keys) and its lookups;
//! - `params`: request parameters (query, JSON or form body) and their checks;
//! - `replies`: API errors and replies, HTTP responses;
//! - `clock`: timestamps and dates; `names`: GitLab's path and name rules.
//!
//! Above them:
//!
//! - `repos`: the bare repositories, the `pre-receive` hook, running git;
//! - `permissions`: tokens and scopes, roles, visibility, git access;
//! - `shared`: what the request handlers share (state behind a lock, paths);
//! - `api`: the REST API, one module per resource, with its routing;
//! - `git_http`: git over smart HTTP through `git http-backend`;
//! - `ssh`: git over SSH through `sshd` and a forced command;
//! - `server`: [`FakeGitlab`], its runtime, request log and fault injection;
//! - `seed`: seeding and inspecting the state from tests.

mod api;
mod clock;
mod git_http;
mod names;
mod params;
mod permissions;
mod replies;
mod repos;
mod seed;
mod server;
mod shared;
mod ssh;
mod state;

pub use server::{FakeGitlab, Latency, LoggedRequest};
pub use ssh::FakeGitlabSsh;
pub use state::{
    Group, Member, PersonalAccessToken, Project, ProtectedBranch, Runner, Scope, SshKey, User, Variable, access,
};
