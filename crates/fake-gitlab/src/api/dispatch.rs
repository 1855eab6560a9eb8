//! The routes of the REST API (after `/api/v4/`): a request's method and path
//! segments are parsed into a [`Route`] before anything is looked up, then
//! [`Route::apply`] authenticates and calls the resource's handler. A path
//! with no route is `404 {"error":"404 Not Found"}`, authenticated or not.
//! Every route needs a user but `POST /runners/verify`, which a runner's token
//! authenticates.

use crate::params::Params;
use crate::permissions::AuthUser;
use crate::replies::{ApiErr, Reply};
use crate::repos::Env;
use crate::state::{Scope, State, access};

/// One route: which resource and which of its endpoints, with the path's ids.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Route<'a> {
    /// `GET /user`.
    CurrentUser,
    /// `POST /user/runners`.
    CreateRunner,
    /// `GET /users`.
    ListUsers,
    /// `POST /users`.
    CreateUser,
    /// `GET /users/:id`.
    GetUser(&'a str),
    /// `POST /users/:id/personal_access_tokens`.
    CreateToken(&'a str),
    /// `GET /personal_access_tokens`.
    ListTokens,
    /// `GET /personal_access_tokens/self`.
    CurrentToken,
    /// `POST /personal_access_tokens/:id/rotate` (`self`: the token used).
    RotateToken(&'a str),
    /// `GET /users/:id/keys`.
    UserKeys(&'a str),
    /// `POST /users/:id/keys`.
    CreateUserKey(&'a str),
    /// `GET /groups`.
    ListGroups,
    /// `POST /groups`.
    CreateGroup,
    /// `GET /groups/:id`.
    GetGroup(&'a str),
    /// `GET /groups/:id/subgroups`.
    Subgroups(&'a str),
    /// `GET /groups/:id/projects`.
    GroupProjects(&'a str),
    /// `GET /projects`.
    ListProjects,
    /// `POST /projects`.
    CreateProject,
    /// `GET /projects/:id`.
    GetProject(&'a str),
    /// `/groups/:id/members…` or `/projects/:id/members…`: `groups` or
    /// `projects`, the id, the segments after `members`.
    Members(&'a str, &'a str, &'a [&'a str]),
    /// `/groups/:id/variables…` or `/projects/:id/variables…`, likewise.
    Variables(&'a str, &'a str, &'a [&'a str]),
    /// `/admin/ci/variables…`: the segments after `variables`.
    InstanceVariables(&'a [&'a str]),
    /// `GET /projects/:id/repository/branches`.
    Branches(&'a str),
    /// `GET /projects/:id/repository/branches/:branch`.
    Branch(&'a str, &'a str),
    /// `/projects/:id/protected_branches…`: the id, the segments after `protected_branches`.
    ProtectedBranches(&'a str, &'a [&'a str]),
    /// `GET /runners/all`.
    AllRunners,
    /// `GET|DELETE /runners/:id`.
    Runner(&'a str),
    /// `POST /runners/verify` (no user: the runner's token).
    VerifyRunner,
    /// `POST /projects/:id/repository/commits`.
    CreateCommit(&'a str),
    /// `GET /projects/:id/repository/files/:file_path`.
    File(&'a str, &'a str),
    /// `GET /projects/:id/repository/files/:file_path/raw`.
    RawFile(&'a str, &'a str),
}

impl<'a> Route<'a> {
    /// The route of `method` on the path `segs` (decoded segments after `/api/v4/`), if any.
    pub(crate) fn parse(method: &str, segs: &'a [&'a str]) -> Option<Self> {
        let route = match (method, segs) {
            ("GET", ["user"]) => Self::CurrentUser,
            ("POST", ["user", "runners"]) => Self::CreateRunner,
            ("GET", ["users"]) => Self::ListUsers,
            ("POST", ["users"]) => Self::CreateUser,
            ("GET", ["users", id]) => Self::GetUser(id),
            ("POST", ["users", id, "personal_access_tokens"]) => Self::CreateToken(id),
            ("GET", ["personal_access_tokens"]) => Self::ListTokens,
            ("GET", ["personal_access_tokens", "self"]) => Self::CurrentToken,
            ("POST", ["personal_access_tokens", id, "rotate"]) => Self::RotateToken(id),
            ("GET", ["users", id, "keys"]) => Self::UserKeys(id),
            ("POST", ["users", id, "keys"]) => Self::CreateUserKey(id),
            ("GET", ["groups"]) => Self::ListGroups,
            ("POST", ["groups"]) => Self::CreateGroup,
            ("GET", ["groups", g]) => Self::GetGroup(g),
            ("GET", ["groups", g, "subgroups"]) => Self::Subgroups(g),
            ("GET", ["groups", g, "projects"]) => Self::GroupProjects(g),
            ("GET", ["projects"]) => Self::ListProjects,
            ("POST", ["projects"]) => Self::CreateProject,
            ("GET", ["projects", p]) => Self::GetProject(p),
            (_, [kind @ ("groups" | "projects"), id, "members", rest @ ..]) => Self::Members(kind, id, rest),
            (_, [kind @ ("groups" | "projects"), id, "variables", rest @ ..]) => Self::Variables(kind, id, rest),
            (_, ["admin", "ci", "variables", rest @ ..]) => Self::InstanceVariables(rest),
            ("GET", ["projects", p, "repository", "branches"]) => Self::Branches(p),
            ("GET", ["projects", p, "repository", "branches", branch]) => Self::Branch(p, branch),
            (_, ["projects", p, "protected_branches", rest @ ..]) => Self::ProtectedBranches(p, rest),
            ("GET", ["runners", "all"]) => Self::AllRunners,
            ("POST", ["runners", "verify"]) => Self::VerifyRunner,
            ("GET" | "DELETE", ["runners", id]) => Self::Runner(id),
            ("POST", ["projects", p, "repository", "commits"]) => Self::CreateCommit(p),
            ("GET", ["projects", p, "repository", "files", path]) => Self::File(p, path),
            ("GET", ["projects", p, "repository", "files", path, "raw"]) => Self::RawFile(p, path),
            _ => return None,
        };
        Some(route)
    }

    /// Serves the route for `auth` (a failed authentication is the reply of
    /// every route).
    pub(crate) fn apply(
        self,
        st: &mut State,
        env: &Env,
        auth: &Result<AuthUser, ApiErr>,
        method: &str,
        params: &Params,
    ) -> Result<Reply, ApiErr> {
        let me = || auth.as_ref().map(|a| a.user.clone()).map_err(Clone::clone);
        match self {
            Self::CurrentUser => st.current_user(&me()?),
            Self::CreateRunner => st.create_runner(&me()?, params),
            Self::ListUsers => st.list_users(&me()?, params),
            Self::CreateUser => st.create_user(&me()?, params),
            Self::GetUser(id) => st.get_user(&me()?, id),
            Self::CreateToken(id) => st.create_token(&me()?, id, params),
            Self::ListTokens => st.list_tokens(&me()?, params),
            Self::CurrentToken => st.current_token(auth.as_ref().map_err(Clone::clone)?),
            Self::RotateToken("self") => {
                let a = auth.as_ref().map_err(Clone::clone)?;
                st.rotate_token(&a.user, &a.token_id.to_string(), params)
            }
            Self::RotateToken(id) => st.rotate_token(&me()?, id, params),
            Self::UserKeys(id) => {
                me()?;
                st.list_user_keys(id)
            }
            Self::CreateUserKey(id) => st.create_user_key(&me()?, id, params),
            Self::ListGroups => st.list_groups(&me()?, params),
            Self::CreateGroup => st.api_create_group(&me()?, params),
            Self::GetGroup(g) => st.get_group(&me()?, g),
            Self::Subgroups(g) => st.subgroups(&me()?, g, params),
            Self::GroupProjects(g) => st.group_projects(env, &me()?, g, params),
            Self::ListProjects => st.list_projects(env, &me()?, params),
            Self::CreateProject => st.api_create_project(env, &me()?, params),
            Self::GetProject(p) => st.get_project(env, &me()?, p),
            Self::Members(kind, id, rest) => {
                let u = me()?;
                let source = st.find_source(&u, kind, id)?;
                st.members_route(&u, source, method, rest, params)
            }
            Self::Variables(kind, id, rest) => {
                let u = me()?;
                let source = st.find_source(&u, kind, id)?;
                st.require(&u, source, access::MAINTAINER)?;
                st.variables_route(source, method, rest, params)
            }
            Self::InstanceVariables(rest) => {
                let u = me()?;
                if !u.admin {
                    return Err(ApiErr::forbidden());
                }
                st.variables_route(Scope::Instance, method, rest, params)
            }
            Self::Branches(p) => st.list_branches(env, &me()?, p, params),
            Self::Branch(p, branch) => st.get_branch(env, &me()?, p, branch),
            Self::ProtectedBranches(p, rest) => {
                let u = me()?;
                let p = st.find_project(&u, p)?;
                st.protected_route(&u, &p, method, rest, params)
            }
            Self::AllRunners => st.list_all_runners(&me()?, params),
            Self::Runner(id) => st.runner(&me()?, method, id),
            Self::VerifyRunner => st.verify_runner(params),
            Self::CreateCommit(p) => st.create_commit(env, &me()?, p, params),
            Self::File(p, path) => st.get_file(env, &me()?, p, path, params, false),
            Self::RawFile(p, path) => st.get_file(env, &me()?, p, path, params, true),
        }
    }
}
