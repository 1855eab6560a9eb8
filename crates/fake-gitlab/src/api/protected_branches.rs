//! Protected branches: `GET|POST /projects/:id/protected_branches`,
//! `GET|DELETE /projects/:id/protected_branches/:name` (wildcards like
//! `convert/*`; only access levels, no per-user or per-group rules). They are
//! enforced on push by the repositories' `pre-receive` hook.

use serde_json::{Value, json};

use crate::params::{ParamError, Params};
use crate::replies::{ApiErr, Reply, created, ok};
use crate::state::{Project, ProtectedBranch, Scope, State, User, access};

fn access_description(level: u64) -> &'static str {
    match level {
        0 => "No one",
        30 => "Developers + Maintainers",
        40 => "Maintainers",
        60 => "Admins",
        _ => "Custom",
    }
}

/// GitLab's protected branch wildcard: `*` matches any run of characters.
pub(crate) fn wildcard_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

impl State {
    pub(crate) fn protected_json(&self, b: &ProtectedBranch) -> Value {
        let lvl = |id: u64, level: u64| {
            json!([{ "id": id, "access_level": level, "access_level_description": access_description(level),
                     "user_id": null, "group_id": null, "deploy_key_id": null }])
        };
        json!({
            "id": b.id,
            "name": b.name,
            "push_access_levels": lvl(b.id * 10 + 1, b.push_access_level),
            "merge_access_levels": lvl(b.id * 10 + 2, b.merge_access_level),
            "unprotect_access_levels": lvl(b.id * 10 + 3, b.unprotect_access_level),
            "allow_force_push": b.allow_force_push,
            "code_owner_approval_required": false,
        })
    }

    /// The protected branch rules of `p`; `rest` is the path after `protected_branches`.
    pub(crate) fn protected_route(
        &mut self,
        u: &User,
        p: &Project,
        method: &str,
        rest: &[&str],
        params: &Params,
    ) -> Result<Reply, ApiErr> {
        let source = Scope::Project(p.id);
        match (method, rest) {
            ("GET", []) => {
                let search = params.str("search");
                Ok(Reply::List(
                    self.protected
                        .iter()
                        .filter(|b| b.project_id == p.id && search.as_deref().is_none_or(|s| b.name.contains(s)))
                        .map(|b| self.protected_json(b))
                        .collect(),
                ))
            }
            ("GET", [name]) => self
                .protected
                .iter()
                .find(|b| b.project_id == p.id && b.name == *name)
                .map(|b| self.protected_json(b))
                .map_or_else(|| Err(ApiErr::not_found("Protected Branch")), ok),
            ("POST", []) => {
                self.require(u, source, access::MAINTAINER)?;
                let name = params.required("name")?;
                if self.protected.iter().any(|b| b.project_id == p.id && b.name == name) {
                    return Err(ApiErr::message(409, format!("Protected branch '{name}' already exists")));
                }
                let level = |key: &str, nested: &str| -> Result<u64, ApiErr> {
                    let v =
                        params.u64(key)?.or(params.raw(nested).and_then(|v| v.as_str().and_then(|s| s.parse().ok())));
                    match v {
                        None => Ok(access::MAINTAINER),
                        Some(l @ (0 | 30 | 40 | 60)) => Ok(l),
                        Some(_) => Err(ParamError::invalid(key).into()),
                    }
                };
                let b = ProtectedBranch {
                    id: self.next(),
                    project_id: p.id,
                    name,
                    push_access_level: level("push_access_level", "allowed_to_push[][access_level]")?,
                    merge_access_level: level("merge_access_level", "allowed_to_merge[][access_level]")?,
                    unprotect_access_level: level("unprotect_access_level", "allowed_to_unprotect[][access_level]")?,
                    allow_force_push: params.bool("allow_force_push")?.unwrap_or(false),
                };
                self.protected.push(b.clone());
                created(self.protected_json(&b))
            }
            ("DELETE", [name]) => {
                self.require(u, source, access::MAINTAINER)?;
                let before = self.protected.len();
                self.protected.retain(|b| !(b.project_id == p.id && b.name == *name));
                if self.protected.len() == before {
                    Err(ApiErr::not_found("Protected Branch"))
                } else {
                    Ok(Reply::Empty)
                }
            }
            _ => Err(ApiErr::route()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_like_gitlab() {
        assert!(wildcard_match("convert/*", "convert/sub-01"));
        assert!(wildcard_match("convert/*", "convert/a/b"));
        assert!(!wildcard_match("convert/*", "main"));
        assert!(wildcard_match("*-stable", "1-0-stable"));
        assert!(wildcard_match("main", "main"));
        assert!(!wildcard_match("main", "main2"));
        assert!(wildcard_match("a*b*c", "axxbyyc"));
        assert!(!wildcard_match("a*b*c", "acb"));
    }
}
