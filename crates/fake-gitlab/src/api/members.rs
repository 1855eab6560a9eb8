//! Members of groups and projects: `GET|POST /…/:id/members`,
//! `GET|PUT|DELETE /…/:id/members/:user_id`, `GET /…/:id/members/all` and
//! `/…/:id/members/all/:user_id` (inherited members, highest level wins).
//! Maintainer is needed to manage members; only Owners grant Owner.

use serde_json::{Value, json};

use crate::clock::now_iso;
use crate::params::{ParamError, Params, matches_search};
use crate::replies::{ApiErr, Reply, created, ok};
use crate::state::{Member, Scope, State, User, access};

impl State {
    pub(crate) fn member_json(&self, uid: u64, level: u64, m: Option<&Member>) -> Value {
        let Some(u) = self.users.iter().find(|u| u.id == uid) else { return Value::Null };
        let mut v = self.user_json(u, false);
        if let Some(o) = v.as_object_mut() {
            o.insert("access_level".into(), json!(level));
            o.insert("expires_at".into(), json!(m.and_then(|m| m.expires_at.clone())));
            o.insert("created_at".into(), json!(m.map(|m| m.created_at.clone()).unwrap_or_else(now_iso)));
            o.insert("membership_state".into(), json!("active"));
        }
        v
    }

    /// `/groups/:id/members…` and `/projects/:id/members…` of `source`; `rest` is the path after `members`.
    pub(crate) fn members_route(
        &mut self,
        u: &User,
        source: Scope,
        method: &str,
        rest: &[&str],
        params: &Params,
    ) -> Result<Reply, ApiErr> {
        // `user_ids[]` and `query` filter the lists.
        let ids: Vec<u64> = params.list("user_ids").iter().filter_map(|s| s.parse().ok()).collect();
        let query = params.str("query").map(|q| q.to_lowercase());
        let wanted = |uid: u64| {
            (ids.is_empty() || ids.contains(&uid))
                && query.as_ref().is_none_or(|q| {
                    self.users.iter().any(|u| u.id == uid && matches_search(q, &[&u.username, &u.name]))
                })
        };
        match (method, rest) {
            ("GET", []) => {
                let mut items: Vec<&Member> =
                    self.members.iter().filter(|m| m.source == source && wanted(m.user_id)).collect();
                items.sort_by_key(|m| m.user_id);
                Ok(Reply::List(
                    items.into_iter().map(|m| self.member_json(m.user_id, m.access_level, Some(m))).collect(),
                ))
            }
            ("GET", ["all"]) => {
                let items = self
                    .all_members(source)
                    .into_iter()
                    .filter(|(uid, _, _)| wanted(*uid))
                    .map(|(uid, lvl, m)| self.member_json(uid, lvl, m.as_ref()))
                    .collect();
                Ok(Reply::List(items))
            }
            ("GET", ["all", uid]) => {
                let uid = uid.parse::<u64>().map_err(|_| ApiErr::not_found("Member"))?;
                self.all_members(source)
                    .into_iter()
                    .find(|(id, _, _)| *id == uid)
                    .map(|(id, lvl, m)| self.member_json(id, lvl, m.as_ref()))
                    .map_or_else(|| Err(ApiErr::not_found("Member")), ok)
            }
            ("GET", [uid]) => {
                let uid = uid.parse::<u64>().map_err(|_| ApiErr::not_found("Member"))?;
                let m = self.members.iter().find(|m| m.source == source && m.user_id == uid);
                m.map(|m| self.member_json(m.user_id, m.access_level, Some(m)))
                    .map_or_else(|| Err(ApiErr::not_found("Member")), ok)
            }
            ("POST", []) => {
                self.require(u, source, access::MAINTAINER)?;
                let level = member_level(params)?;
                let role = self.role(u, source);
                if level > role.min(access::OWNER) || (level == access::OWNER && role < access::OWNER) {
                    return Err(ApiErr::forbidden());
                }
                let target = match (params.str("user_id"), params.str("username")) {
                    (Some(id), _) => id,
                    (None, Some(name)) => name,
                    (None, None) => {
                        return Err(ApiErr::error(
                            400,
                            "user_id, username are missing, exactly one parameter must be provided",
                        ));
                    }
                };
                let mut ids = Vec::new();
                for t in target.split(',').map(str::trim) {
                    ids.push(self.user_by_ref(t).map(|x| x.id).ok_or_else(|| ApiErr::not_found("User"))?);
                }
                for &uid in &ids {
                    if self.direct_level(source, uid).is_some() {
                        return Err(ApiErr::message(409, "Member already exists"));
                    }
                    self.check_inherited(source, uid, level)?;
                }
                let expires_at = params.str("expires_at").filter(|s| !s.is_empty());
                for &uid in &ids {
                    self.members.push(Member {
                        source,
                        user_id: uid,
                        access_level: level,
                        expires_at: expires_at.clone(),
                        created_at: now_iso(),
                    });
                }
                let m = self.members.last().cloned();
                created(m.map(|m| self.member_json(m.user_id, m.access_level, Some(&m))).unwrap_or(Value::Null))
            }
            ("PUT", [uid]) => {
                self.require(u, source, access::MAINTAINER)?;
                let uid = uid.parse::<u64>().map_err(|_| ApiErr::not_found("Member"))?;
                let level = member_level(params)?;
                let role = self.role(u, source);
                if level > role.min(access::OWNER) || (level == access::OWNER && role < access::OWNER) {
                    return Err(ApiErr::forbidden());
                }
                if self.direct_level(source, uid).is_none() {
                    return Err(ApiErr::not_found("Member"));
                }
                self.check_inherited(source, uid, level)?;
                let expires_at = params.str("expires_at");
                let Some(m) = self.members.iter_mut().find(|m| m.source == source && m.user_id == uid) else {
                    return Err(ApiErr::not_found("Member"));
                };
                m.access_level = level;
                if let Some(e) = expires_at {
                    m.expires_at = Some(e).filter(|e| !e.is_empty());
                }
                let m = m.clone();
                ok(self.member_json(m.user_id, m.access_level, Some(&m)))
            }
            ("DELETE", [uid]) => {
                self.require(u, source, access::MAINTAINER)?;
                let uid = uid.parse::<u64>().map_err(|_| ApiErr::not_found("Member"))?;
                let before = self.members.len();
                self.members.retain(|m| !(m.source == source && m.user_id == uid));
                if self.members.len() == before { Err(ApiErr::not_found("Member")) } else { Ok(Reply::Empty) }
            }
            _ => Err(ApiErr::route()),
        }
    }

    /// GitLab refuses a direct membership below one inherited from an ancestor.
    pub(crate) fn check_inherited(&self, source: Scope, uid: u64, level: u64) -> Result<(), ApiErr> {
        let inherited: Option<(u64, String)> = match source {
            Scope::Group(g) => self
                .ancestors(g)
                .iter()
                .skip(1)
                .filter_map(|a| self.direct_level(Scope::Group(a.id), uid).map(|l| (l, a.full_path.clone())))
                .max_by_key(|(l, _)| *l),
            Scope::Project(p) => self
                .projects
                .iter()
                .find(|x| x.id == p)
                .map(|x| self.ancestors(x.namespace_id))
                .unwrap_or_default()
                .iter()
                .filter_map(|a| self.direct_level(Scope::Group(a.id), uid).map(|l| (l, a.full_path.clone())))
                .max_by_key(|(l, _)| *l),
            Scope::Instance => None,
        };
        match inherited {
            Some((l, from)) if l > level => Err(ApiErr::validation(
                "access_level",
                &format!("should be greater than or equal to {} inherited membership from group {from}", role_name(l)),
            )),
            _ => Ok(()),
        }
    }

    /// Direct and inherited members: `(user id, highest level, direct membership here)`.
    pub(crate) fn all_members(&self, source: Scope) -> Vec<(u64, u64, Option<Member>)> {
        let mut sources = vec![source];
        let groups = match source {
            Scope::Group(g) => self.ancestors(g),
            Scope::Project(p) => {
                self.projects.iter().find(|x| x.id == p).map(|x| self.ancestors(x.namespace_id)).unwrap_or_default()
            }
            Scope::Instance => Vec::new(),
        };
        sources.extend(groups.iter().map(|g| Scope::Group(g.id)));
        let mut out: Vec<(u64, u64, Option<Member>)> = Vec::new();
        for m in self.members.iter().filter(|m| sources.contains(&m.source)) {
            let here = (m.source == source).then(|| m.clone());
            match out.iter_mut().find(|(id, _, _)| *id == m.user_id) {
                Some(e) => {
                    if m.access_level > e.1 {
                        e.1 = m.access_level;
                        e.2 = here;
                    }
                }
                None => out.push((m.user_id, m.access_level, here)),
            }
        }
        if let Scope::Project(p) = source
            && let Some(owner) =
                self.projects.iter().find(|x| x.id == p).and_then(|x| self.namespace_owner(x.namespace_id))
            && !out.iter().any(|(id, _, _)| *id == owner.id)
        {
            out.push((owner.id, access::OWNER, None));
        }
        out.sort_by_key(|(id, _, _)| *id);
        out
    }
}

/// `access_level`: one of GitLab's roles.
fn member_level(params: &Params) -> Result<u64, ParamError> {
    let level = params.u64("access_level")?.ok_or_else(|| ParamError::missing("access_level"))?;
    if matches!(level, 5 | 10 | 15 | 20 | 30 | 40 | 50) { Ok(level) } else { Err(ParamError::invalid("access_level")) }
}

fn role_name(level: u64) -> &'static str {
    match level {
        5 => "Minimal Access",
        10 => "Guest",
        15 => "Planner",
        20 => "Reporter",
        30 => "Developer",
        40 => "Maintainer",
        50 => "Owner",
        _ => "Custom",
    }
}
