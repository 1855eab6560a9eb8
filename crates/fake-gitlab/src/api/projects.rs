//! Projects: `GET /projects` (`search`), `GET /projects/:id`, `POST /projects`
//! (creates a bare repository; `initialize_with_readme` commits a README). A
//! project's creator gets no membership of its own: group projects inherit,
//! personal projects belong to their user.

use serde_json::{Map, Value, json};

use crate::clock::now_iso;
use crate::names::{PATH_RULE, valid_name, valid_path};
use crate::params::{ParamError, Params, matches_search, visibility_param};
use crate::replies::{ApiErr, Reply, created, ok};
use crate::repos::{Env, git, init_repo, repo_dir};
use crate::state::{Project, State, User, access, ci_eq};

impl State {
    pub(crate) fn namespace_json(&self, ns: u64) -> Value {
        if let Some(g) = self.group_by_id(ns) {
            return json!({
                "id": g.id, "name": g.name, "path": g.path, "kind": "group", "full_path": g.full_path,
                "parent_id": g.parent_id, "avatar_url": null, "web_url": format!("{}/groups/{}", self.url, g.full_path),
            });
        }
        match self.namespace_owner(ns) {
            Some(u) => json!({
                "id": ns, "name": u.name, "path": u.username, "kind": "user", "full_path": u.username,
                "parent_id": null, "avatar_url": null, "web_url": format!("{}/{}", self.url, u.username),
            }),
            None => Value::Null,
        }
    }

    pub(crate) fn project_json(&self, env: &Env, p: &Project) -> Value {
        let ns_name = match self.group_by_id(p.namespace_id) {
            Some(g) => g.full_name.clone(),
            None => self.namespace_owner(p.namespace_id).map(|u| u.name.clone()).unwrap_or_default(),
        };
        let empty = git(&repo_dir(env, p), &["for-each-ref", "--count=1", "refs/heads"], None)
            .map(|s| s.trim().is_empty())
            .unwrap_or(true);
        let host = self.url.trim_start_matches("http://").split(':').next().unwrap_or("127.0.0.1").to_owned();
        let mut v = json!({
            "id": p.id,
            "name": p.name,
            "path": p.path,
            "description": p.description,
            "name_with_namespace": format!("{ns_name} / {}", p.name),
            "path_with_namespace": p.path_with_namespace,
            "default_branch": p.default_branch,
            "visibility": p.visibility,
            "http_url_to_repo": format!("{}/{}.git", self.url, p.path_with_namespace),
            "ssh_url_to_repo": format!("git@{host}:{}.git", p.path_with_namespace),
            "web_url": format!("{}/{}", self.url, p.path_with_namespace),
            "readme_url": null,
            "namespace": self.namespace_json(p.namespace_id),
            "created_at": p.created_at,
            "last_activity_at": p.created_at,
            "empty_repo": empty,
            "archived": false,
            "topics": [],
            "tag_list": [],
            "forks_count": 0,
            "star_count": 0,
        });
        if let (Some(o), Some(u)) = (v.as_object_mut(), self.namespace_owner(p.namespace_id)) {
            o.insert("owner".into(), self.user_json(u, false));
        }
        v
    }

    /// Creates a project and its repository (the API and the seeding helpers).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn create_project(
        &mut self,
        env: &Env,
        creator: u64,
        name: &str,
        path: &str,
        namespace_id: u64,
        default_branch: &str,
        visibility: &str,
        description: &str,
        readme: bool,
    ) -> Result<Project, ApiErr> {
        if !valid_path(path) {
            return Err(ApiErr::validation("path", PATH_RULE));
        }
        if !valid_name(name) {
            return Err(ApiErr::validation(
                "name",
                "can contain only letters, digits, emoji, '_', '.', '+', dashes, or spaces. It must start with a letter, digit, emoji, or '_'.",
            ));
        }
        if git(&env.repos, &["check-ref-format", "--branch", default_branch], None).is_err() {
            return Err(ParamError::invalid("default_branch").into());
        }
        let (_, ns_path, _) = self
            .namespace_by_ref(&namespace_id.to_string())
            .ok_or_else(|| ApiErr::validation("namespace", "is not valid"))?;
        let mut errors = Map::new();
        if self.projects.iter().any(|p| p.namespace_id == namespace_id && ci_eq(&p.name, name)) {
            errors.insert("name".into(), json!(["has already been taken"]));
        }
        if self.projects.iter().any(|p| p.namespace_id == namespace_id && ci_eq(&p.path, path))
            || self.groups.iter().any(|g| g.parent_id == Some(namespace_id) && ci_eq(&g.path, path))
        {
            errors.insert("path".into(), json!(["has already been taken"]));
        }
        if !errors.is_empty() {
            return Err(ApiErr { status: 400, body: json!({ "message": errors }) });
        }
        let p = Project {
            id: self.projects.iter().map(|p| p.id).max().unwrap_or(0) + 1,
            name: name.to_owned(),
            path: path.to_owned(),
            namespace_id,
            path_with_namespace: format!("{ns_path}/{path}"),
            default_branch: default_branch.to_owned(),
            visibility: visibility.to_owned(),
            description: description.to_owned(),
            created_at: now_iso(),
        };
        let creator_name = self.users.iter().find(|u| u.id == creator).map(|u| u.name.clone()).unwrap_or_default();
        init_repo(env, &p, readme.then_some(creator_name.as_str()))
            .map_err(|e| ApiErr::message(500, format!("500 Internal Server Error: {e:#}")))?;
        self.projects.push(p.clone());
        Ok(p)
    }

    pub(crate) fn api_create_project(&mut self, env: &Env, u: &User, params: &Params) -> Result<Reply, ApiErr> {
        let name = params.str("name").filter(|s| !s.is_empty());
        let path = params.str("path").filter(|s| !s.is_empty());
        let (name, path) = match (name, path) {
            (Some(n), Some(p)) => (n, p),
            (Some(n), None) => {
                let p = n.trim().to_lowercase().replace(' ', "-");
                (n, p)
            }
            (None, Some(p)) => (p.clone(), p),
            (None, None) => {
                return Err(ApiErr::error(400, "name, path are missing, at least one parameter must be provided"));
            }
        };
        let ns = match params.str("namespace_id").filter(|s| !s.is_empty()) {
            None => u.namespace_id,
            Some(r) => {
                self.namespace_by_ref(&r).map(|n| n.0).ok_or_else(|| ApiErr::validation("namespace", "is not valid"))?
            }
        };
        let allowed = u.admin
            || match self.group_by_id(ns) {
                Some(_) => self.group_level(ns, u.id) >= access::MAINTAINER,
                None => ns == u.namespace_id,
            };
        if !allowed {
            return Err(ApiErr::validation("namespace", "is not valid"));
        }
        let visibility = visibility_param(params, "private")?;
        let default_branch = params.str("default_branch").filter(|s| !s.is_empty()).unwrap_or_else(|| "main".into());
        let description = params.str("description").unwrap_or_default();
        let readme = params.bool("initialize_with_readme")?.unwrap_or(false);
        let p = self.create_project(env, u.id, &name, &path, ns, &default_branch, &visibility, &description, readme)?;
        created(self.project_json(env, &p))
    }

    /// `GET /projects`.
    pub(crate) fn list_projects(&self, env: &Env, u: &User, params: &Params) -> Result<Reply, ApiErr> {
        let search = params.str("search").map(|s| s.to_lowercase());
        let items: Vec<Project> = self
            .projects
            .iter()
            .filter(|p| self.can_see_project(u, p))
            .filter(|p| search.as_ref().is_none_or(|s| matches_search(s, &[&p.name, &p.path, &p.path_with_namespace])))
            .cloned()
            .collect();
        Ok(Reply::List(self.sort_projects(env, items, params)))
    }

    /// `GET /projects/:id`.
    pub(crate) fn get_project(&self, env: &Env, u: &User, p: &str) -> Result<Reply, ApiErr> {
        let p = self.find_project(u, p)?;
        ok(self.project_json(env, &p))
    }

    pub(crate) fn sort_projects(&self, env: &Env, mut items: Vec<Project>, params: &Params) -> Vec<Value> {
        match params.str("order_by").as_deref() {
            Some("name") => {
                items.sort_by(|a, b| a.name.to_lowercase().cmp(&b.name.to_lowercase()).then(a.id.cmp(&b.id)))
            }
            Some("path") => items.sort_by(|a, b| a.path_with_namespace.cmp(&b.path_with_namespace)),
            _ => items.sort_by_key(|p| p.id),
        }
        // GitLab sorts projects in descending order unless told otherwise.
        if params.str("sort").as_deref() != Some("asc") {
            items.reverse();
        }
        items.iter().map(|p| self.project_json(env, p)).collect()
    }
}
