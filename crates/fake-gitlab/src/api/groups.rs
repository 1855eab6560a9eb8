//! Groups: `GET /groups` (`search`, `top_level_only`, `all_available`,
//! `order_by` name|path|id, `sort`), `GET /groups/:id` (id or URL-encoded full
//! path), `POST /groups`, `GET /groups/:id/subgroups`, `GET /groups/:id/projects`
//! (`include_subgroups`, `search`). The creator of a group becomes its Owner.

use serde_json::{Value, json};

use crate::clock::now_iso;
use crate::names::{PATH_RULE, RESERVED_TOP_LEVEL, valid_name, valid_path};
use crate::params::{Params, matches_search, visibility_param};
use crate::replies::{ApiErr, Reply, created, ok};
use crate::repos::Env;
use crate::state::{Group, Member, Project, Scope, State, User, access, ci_eq};

impl State {
    pub(crate) fn group_json(&self, g: &Group) -> Value {
        json!({
            "id": g.id,
            "name": g.name,
            "path": g.path,
            "description": g.description,
            "visibility": g.visibility,
            "full_name": g.full_name,
            "full_path": g.full_path,
            "parent_id": g.parent_id,
            "web_url": format!("{}/groups/{}", self.url, g.full_path),
            "avatar_url": null,
            "created_at": g.created_at,
            "lfs_enabled": true,
            "request_access_enabled": true,
            "share_with_group_lock": false,
            "require_two_factor_authentication": false,
            "project_creation_level": "maintainer",
            "subgroup_creation_level": "maintainer",
            "auto_devops_enabled": null,
            "emails_enabled": true,
            "mentions_disabled": null,
            "default_branch": null,
            "organization_id": 1,
        })
    }

    /// Creates a group (the API and the seeding helpers); `creator` becomes its Owner.
    pub(crate) fn create_group(
        &mut self,
        creator: Option<u64>,
        name: &str,
        path: &str,
        parent: Option<u64>,
        visibility: &str,
        description: &str,
    ) -> Result<Group, ApiErr> {
        let fail = |field: &str, text: &str| {
            ApiErr::message(400, format!("Failed to save group {{:{field}=>[\"{}\"]}}", text.replace('"', "\\\"")))
        };
        if !valid_path(path) {
            return Err(fail("path", PATH_RULE));
        }
        if !valid_name(name) {
            return Err(fail(
                "name",
                "can contain only letters, digits, emoji, '_', '.', '-', '+', space and parentheses, and must start with a letter, digit, emoji or '_'",
            ));
        }
        let parent_group = match parent {
            Some(pid) => Some(self.group_by_id(pid).cloned().ok_or_else(|| ApiErr::not_found("Parent Group"))?),
            None => None,
        };
        let taken = match parent {
            Some(pid) => {
                self.groups.iter().any(|g| g.parent_id == Some(pid) && ci_eq(&g.path, path))
                    || self.projects.iter().any(|p| p.namespace_id == pid && ci_eq(&p.path, path))
            }
            None => {
                self.groups.iter().any(|g| g.parent_id.is_none() && ci_eq(&g.path, path))
                    || self.users.iter().any(|u| ci_eq(&u.username, path))
                    || RESERVED_TOP_LEVEL.iter().any(|r| ci_eq(r, path))
            }
        };
        if taken {
            return Err(fail("path", "has already been taken"));
        }
        let (full_path, full_name) = match &parent_group {
            Some(pg) => (format!("{}/{path}", pg.full_path), format!("{} / {name}", pg.full_name)),
            None => (path.to_owned(), name.to_owned()),
        };
        let g = Group {
            id: self.next(),
            name: name.to_owned(),
            path: path.to_owned(),
            full_path,
            full_name,
            parent_id: parent,
            visibility: visibility.to_owned(),
            description: description.to_owned(),
            created_at: now_iso(),
        };
        self.groups.push(g.clone());
        if let Some(uid) = creator {
            self.members.push(Member {
                source: Scope::Group(g.id),
                user_id: uid,
                access_level: access::OWNER,
                expires_at: None,
                created_at: now_iso(),
            });
        }
        Ok(g)
    }

    pub(crate) fn list_groups(&self, u: &User, params: &Params) -> Result<Reply, ApiErr> {
        let search = params.str("search").map(|s| s.to_lowercase());
        let top = params.bool("top_level_only")?.unwrap_or(false);
        let all = params.bool("all_available")?.unwrap_or(u.admin);
        let items: Vec<Group> = self
            .groups
            .iter()
            .filter(|g| if all { self.can_see_group(u, g) } else { u.admin || self.group_level(g.id, u.id) > 0 })
            .filter(|g| !top || g.parent_id.is_none())
            .filter(|g| search.as_ref().is_none_or(|s| matches_search(s, &[&g.name, &g.path])))
            .cloned()
            .collect();
        Ok(Reply::List(self.sort_groups(items, params)))
    }

    pub(crate) fn api_create_group(&mut self, u: &User, params: &Params) -> Result<Reply, ApiErr> {
        let name = params.required("name")?;
        let path = params.required("path")?;
        let visibility = visibility_param(params, "private")?;
        let parent = params.u64("parent_id")?;
        if let Some(pid) = parent {
            let pg = self.group_by_id(pid).filter(|g| self.can_see_group(u, g)).cloned();
            let pg = pg.ok_or_else(|| ApiErr::not_found("Parent Group"))?;
            self.require(u, Scope::Group(pg.id), access::MAINTAINER)?;
        }
        let description = params.str("description").unwrap_or_default();
        let g = self.create_group(Some(u.id), &name, &path, parent, &visibility, &description)?;
        created(self.group_json(&g))
    }

    /// `GET /groups/:id`.
    pub(crate) fn get_group(&self, u: &User, g: &str) -> Result<Reply, ApiErr> {
        let g = self.find_group(u, g)?;
        ok(self.group_json(&g))
    }

    /// `GET /groups/:id/subgroups`.
    pub(crate) fn subgroups(&self, u: &User, g: &str, params: &Params) -> Result<Reply, ApiErr> {
        let g = self.find_group(u, g)?;
        let search = params.str("search").map(|s| s.to_lowercase());
        let items: Vec<Group> = self
            .groups
            .iter()
            .filter(|x| x.parent_id == Some(g.id) && self.can_see_group(u, x))
            .filter(|x| search.as_ref().is_none_or(|s| matches_search(s, &[&x.name, &x.path])))
            .cloned()
            .collect();
        Ok(Reply::List(self.sort_groups(items, params)))
    }

    /// `GET /groups/:id/projects`.
    pub(crate) fn group_projects(&self, env: &Env, u: &User, g: &str, params: &Params) -> Result<Reply, ApiErr> {
        let g = self.find_group(u, g)?;
        let sub = params.bool("include_subgroups")?.unwrap_or(false);
        let search = params.str("search").map(|s| s.to_lowercase());
        let items: Vec<Project> = self
            .projects
            .iter()
            .filter(|p| p.namespace_id == g.id || (sub && self.is_descendant(p.namespace_id, g.id)))
            .filter(|p| self.can_see_project(u, p))
            .filter(|p| search.as_ref().is_none_or(|s| matches_search(s, &[&p.name, &p.path])))
            .cloned()
            .collect();
        Ok(Reply::List(self.sort_projects(env, items, params)))
    }

    pub(crate) fn sort_groups(&self, mut items: Vec<Group>, params: &Params) -> Vec<Value> {
        match params.str("order_by").as_deref() {
            Some("id") => items.sort_by_key(|g| g.id),
            Some("path") => items.sort_by(|a, b| a.full_path.cmp(&b.full_path).then(a.id.cmp(&b.id))),
            _ => items.sort_by(|a, b| a.name.to_lowercase().cmp(&b.name.to_lowercase()).then(a.id.cmp(&b.id))),
        }
        if params.str("sort").as_deref() == Some("desc") {
            items.reverse();
        }
        items.iter().map(|g| self.group_json(g)).collect()
    }
}
