//! Personal access tokens: `POST /users/:id/personal_access_tokens` (admin),
//! `GET /personal_access_tokens` (`user_id`), `GET /personal_access_tokens/self`,
//! `POST /personal_access_tokens/:id/rotate`.

use serde_json::{Value, json};

use crate::clock::{date_in_days, is_date, now_iso};
use crate::params::{ParamError, Params};
use crate::permissions::AuthUser;
use crate::replies::{ApiErr, Reply, created, ok};
use crate::state::{PersonalAccessToken, State, User};

/// The scopes of the tokens the fake makes itself (`root`'s, seeded users').
pub(crate) const ALL_SCOPES: [&str; 8] = [
    "api",
    "read_api",
    "read_user",
    "read_repository",
    "write_repository",
    "read_registry",
    "write_registry",
    "admin_mode",
];

/// The scopes GitLab accepts for a personal access token.
const VALID_SCOPES: [&str; 13] = [
    "api",
    "read_api",
    "read_user",
    "create_runner",
    "manage_runner",
    "k8s_proxy",
    "read_repository",
    "write_repository",
    "read_registry",
    "write_registry",
    "ai_features",
    "sudo",
    "admin_mode",
];

/// A secret: `prefix` and 20 random hex digits.
pub(crate) fn random_token(prefix: &str) -> String {
    let a = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}{}", &a[..20])
}

impl State {
    /// Adds a token of `user_id`.
    pub(crate) fn insert_token(
        &mut self,
        user_id: u64,
        name: &str,
        scopes: &[&str],
        expires_at: Option<String>,
    ) -> PersonalAccessToken {
        let t = PersonalAccessToken {
            id: self.tokens.len() as u64 + 1,
            user_id,
            name: name.to_owned(),
            token: random_token("glpat-"),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            expires_at,
            revoked: false,
            created_at: now_iso(),
        };
        self.tokens.push(t.clone());
        t
    }

    pub(crate) fn token_json(t: &PersonalAccessToken, with_secret: bool) -> Value {
        let mut v = json!({
            "id": t.id,
            "name": t.name,
            "revoked": t.revoked,
            "created_at": t.created_at,
            "description": null,
            "scopes": t.scopes,
            "user_id": t.user_id,
            "last_used_at": null,
            "active": !t.revoked,
            "expires_at": t.expires_at,
        });
        if with_secret && let Some(o) = v.as_object_mut() {
            o.insert("token".into(), json!(t.token));
        }
        v
    }

    pub(crate) fn create_token(&mut self, u: &User, id: &str, params: &Params) -> Result<Reply, ApiErr> {
        if !u.admin {
            return Err(ApiErr::forbidden());
        }
        let target = self.user_by_ref(id).map(|x| x.id).ok_or_else(|| ApiErr::not_found("User"))?;
        let name = params.required("name")?;
        let scopes = params.list("scopes");
        if scopes.is_empty() {
            return Err(ParamError::missing("scopes").into());
        }
        if scopes.iter().any(|s| !VALID_SCOPES.contains(&s.as_str())) {
            return Err(ParamError::invalid("scopes").into());
        }
        let expires_at = params.str("expires_at").filter(|s| !s.is_empty());
        if let Some(e) = &expires_at
            && !is_date(e)
        {
            return Err(ParamError::invalid("expires_at").into());
        }
        let scopes: Vec<&str> = scopes.iter().map(String::as_str).collect();
        let t = self.insert_token(target, &name, &scopes, expires_at);
        created(Self::token_json(&t, true))
    }

    /// `GET /personal_access_tokens`: one's own tokens; an admin's are all (or `user_id`'s).
    pub(crate) fn list_tokens(&self, u: &User, params: &Params) -> Result<Reply, ApiErr> {
        let filter = params.u64("user_id")?;
        let items = self
            .tokens
            .iter()
            .filter(|t| if u.admin { filter.is_none_or(|f| f == t.user_id) } else { t.user_id == u.id })
            .map(|t| Self::token_json(t, false))
            .collect();
        Ok(Reply::List(items))
    }

    /// `GET /personal_access_tokens/self`: the token used.
    pub(crate) fn current_token(&self, a: &AuthUser) -> Result<Reply, ApiErr> {
        let t = self.tokens.iter().find(|t| t.id == a.token_id).ok_or_else(|| ApiErr::not_found("Token"))?;
        ok(Self::token_json(t, false))
    }

    /// `POST /personal_access_tokens/:id/rotate` (`expires_at`, in a week by
    /// default): revokes the token and makes a new one with the same name and
    /// scopes, returned with its secret (`200`, as GitLab answers). Admins
    /// rotate any token, users their own; only admins learn that a token does
    /// not exist (`404`), others get `401` for it and for others' tokens.
    pub(crate) fn rotate_token(&mut self, u: &User, id: &str, params: &Params) -> Result<Reply, ApiErr> {
        let id: u64 = id.parse().map_err(|_| ParamError::new(400, "id is invalid"))?;
        let expires_at = params.str("expires_at").filter(|s| !s.is_empty());
        if let Some(e) = &expires_at
            && !is_date(e)
        {
            return Err(ParamError::new(400, "expires_at is invalid").into());
        }
        let Some(i) = self.tokens.iter().position(|t| t.id == id && (u.admin || t.user_id == u.id)) else {
            return Err(if u.admin { ApiErr::message(404, "404 Not Found") } else { ApiErr::unauthorized() });
        };
        if self.tokens[i].revoked {
            return Err(ApiErr::bad_request("Token already revoked"));
        }
        self.tokens[i].revoked = true;
        let old = self.tokens[i].clone();
        let scopes: Vec<&str> = old.scopes.iter().map(String::as_str).collect();
        let t = self.insert_token(old.user_id, &old.name, &scopes, Some(expires_at.unwrap_or_else(|| date_in_days(7))));
        ok(Self::token_json(&t, true))
    }
}
