//! Users: `GET /user`, `GET /users` (`username`, `search`), `GET /users/:id`,
//! `POST /users` (admin).

use serde_json::{Value, json};

use crate::clock::now_iso;
use crate::names::{PATH_RULE, valid_path};
use crate::params::{Params, matches_search};
use crate::replies::{ApiErr, Reply, created, ok};
use crate::state::{State, User, ci_eq};

impl State {
    /// Adds a user with a personal namespace; returns its id.
    pub(crate) fn insert_user(&mut self, username: &str, name: &str, email: &str, admin: bool) -> u64 {
        let id = self.users.iter().map(|u| u.id).max().unwrap_or(0) + 1;
        let namespace_id = self.next();
        self.users.push(User {
            id,
            username: username.to_owned(),
            name: name.to_owned(),
            email: email.to_owned(),
            admin,
            namespace_id,
            created_at: now_iso(),
        });
        id
    }

    pub(crate) fn user_json(&self, u: &User, full: bool) -> Value {
        let mut v = json!({
            "id": u.id,
            "username": u.username,
            "name": u.name,
            "state": "active",
            "locked": false,
            "avatar_url": null,
            "web_url": format!("{}/{}", self.url, u.username),
        });
        if full && let Some(o) = v.as_object_mut() {
            o.insert("email".into(), json!(u.email));
            o.insert("public_email".into(), json!(null));
            o.insert("is_admin".into(), json!(u.admin));
            o.insert("bot".into(), json!(false));
            o.insert("created_at".into(), json!(u.created_at));
            o.insert("can_create_group".into(), json!(true));
            o.insert("can_create_project".into(), json!(true));
            o.insert("projects_limit".into(), json!(100_000));
            o.insert("two_factor_enabled".into(), json!(false));
            o.insert("external".into(), json!(false));
            o.insert("namespace_id".into(), json!(u.namespace_id));
        }
        v
    }

    /// `GET /user`.
    pub(crate) fn current_user(&self, u: &User) -> Result<Reply, ApiErr> {
        ok(self.user_json(u, true))
    }

    /// `GET /users/:id` (id or username); all fields for admins and oneself.
    pub(crate) fn get_user(&self, u: &User, id: &str) -> Result<Reply, ApiErr> {
        let found = self.user_by_ref(id).ok_or_else(|| ApiErr::not_found("User"))?;
        ok(self.user_json(found, u.admin || u.id == found.id))
    }

    pub(crate) fn list_users(&self, u: &User, params: &Params) -> Result<Reply, ApiErr> {
        let username = params.str("username");
        let search = params.str("search").map(|s| s.to_lowercase());
        let mut items: Vec<&User> = self
            .users
            .iter()
            .filter(|x| username.as_deref().is_none_or(|n| ci_eq(n, &x.username)))
            .filter(|x| {
                search.as_ref().is_none_or(|s| {
                    matches_search(s, &[&x.username, &x.name]) || (u.admin && x.email.to_lowercase() == *s)
                })
            })
            .collect();
        items.sort_by_key(|x| x.id);
        if params.str("sort").as_deref() != Some("asc") {
            items.reverse();
        }
        Ok(Reply::List(items.into_iter().map(|x| self.user_json(x, u.admin)).collect()))
    }

    pub(crate) fn create_user(&mut self, u: &User, params: &Params) -> Result<Reply, ApiErr> {
        if !u.admin {
            return Err(ApiErr::forbidden());
        }
        let email = params.required("email")?;
        let name = params.required("name")?;
        let username = params.required("username")?;
        if params.str("password").is_none()
            && !params.bool("reset_password")?.unwrap_or(false)
            && !params.bool("force_random_password")?.unwrap_or(false)
        {
            return Err(ApiErr::error(
                400,
                "password, reset_password, force_random_password are missing, exactly one parameter must be provided",
            ));
        }
        if !valid_path(&username) {
            return Err(ApiErr::validation("username", PATH_RULE));
        }
        if self.users.iter().any(|x| ci_eq(&x.username, &username))
            || self.groups.iter().any(|g| g.parent_id.is_none() && ci_eq(&g.path, &username))
        {
            return Err(ApiErr::message(409, "Username has already been taken"));
        }
        if self.users.iter().any(|x| ci_eq(&x.email, &email)) {
            return Err(ApiErr::message(409, "Email has already been taken"));
        }
        let admin = params.bool("admin")?.unwrap_or(false);
        let id = self.insert_user(&username, &name, &email, admin);
        let user = self.users.iter().find(|x| x.id == id).cloned().ok_or_else(|| ApiErr::not_found("User"))?;
        created(self.user_json(&user, true))
    }
}
