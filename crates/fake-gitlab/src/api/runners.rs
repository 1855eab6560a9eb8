//! Runners: `POST /user/runners` (`glrt-` tokens; Owner of a group, Maintainer
//! of a project, admin for the instance), `GET /runners/all` (admin),
//! `GET|DELETE /runners/:id`, `POST /runners/verify` (runner token, no user).

use serde_json::{Value, json};

use super::tokens::random_token;
use crate::params::{ParamError, Params};
use crate::replies::{ApiErr, Reply, created, ok};
use crate::state::{Runner, Scope, State, User, access};

impl State {
    fn runner_json(&self, r: &Runner) -> Value {
        let mut v = json!({
            "id": r.id,
            "description": r.description,
            "ip_address": null,
            "active": !r.paused,
            "paused": r.paused,
            "is_shared": r.runner_type == "instance_type",
            "runner_type": r.runner_type,
            "name": null,
            "online": false,
            "status": "never_contacted",
            "tag_list": r.tag_list,
            "run_untagged": r.run_untagged,
            "locked": r.locked,
            "access_level": r.access_level,
            "maximum_timeout": r.maximum_timeout,
        });
        if let Some(o) = v.as_object_mut() {
            match r.scope {
                Scope::Group(g) => {
                    let groups: Vec<Value> = self.group_by_id(g).map(|g| self.group_json(g)).into_iter().collect();
                    o.insert("groups".into(), Value::Array(groups));
                }
                Scope::Project(p) => {
                    let projects: Vec<Value> = self
                        .projects
                        .iter()
                        .filter(|x| x.id == p)
                        .map(|x| json!({"id": x.id, "name": x.name, "path": x.path, "path_with_namespace": x.path_with_namespace}))
                        .collect();
                    o.insert("projects".into(), Value::Array(projects));
                }
                Scope::Instance => {}
            }
        }
        v
    }

    /// `POST /user/runners`.
    pub(crate) fn create_runner(&mut self, u: &User, params: &Params) -> Result<Reply, ApiErr> {
        let runner_type = params.required("runner_type")?;
        let scope = match runner_type.as_str() {
            "instance_type" => {
                if !u.admin {
                    return Err(ApiErr::forbidden());
                }
                Scope::Instance
            }
            "group_type" => {
                let gid = params.u64("group_id")?.ok_or_else(|| ParamError::missing("group_id"))?;
                let g = self.find_group(u, &gid.to_string())?;
                self.require(u, Scope::Group(g.id), access::OWNER)?;
                Scope::Group(g.id)
            }
            "project_type" => {
                let pid = params.u64("project_id")?.ok_or_else(|| ParamError::missing("project_id"))?;
                let p = self.find_project(u, &pid.to_string())?;
                self.require(u, Scope::Project(p.id), access::MAINTAINER)?;
                Scope::Project(p.id)
            }
            _ => return Err(ParamError::invalid("runner_type").into()),
        };
        let access_level = params.str("access_level").unwrap_or_else(|| "not_protected".into());
        if !matches!(access_level.as_str(), "not_protected" | "ref_protected") {
            return Err(ParamError::invalid("access_level").into());
        }
        let r = Runner {
            id: self.runners.iter().map(|r| r.id).max().unwrap_or(0) + 1,
            runner_type,
            scope,
            description: params.str("description").unwrap_or_default(),
            tag_list: params.list("tag_list"),
            run_untagged: params.bool("run_untagged")?.unwrap_or(true),
            paused: params.bool("paused")?.unwrap_or(false),
            locked: params.bool("locked")?.unwrap_or(false),
            access_level,
            maximum_timeout: params.u64("maximum_timeout")?,
            token: random_token("glrt-"),
            created_by: u.id,
        };
        self.runners.push(r.clone());
        created(json!({ "id": r.id, "token": r.token, "token_expires_at": null }))
    }

    /// `GET /runners/all` (admin; `type`, `tag_list`).
    pub(crate) fn list_all_runners(&self, u: &User, params: &Params) -> Result<Reply, ApiErr> {
        if !u.admin {
            return Err(ApiErr::forbidden());
        }
        let ty = params.str("type");
        let tags = params.list("tag_list");
        let items = self
            .runners
            .iter()
            .filter(|r| ty.as_deref().is_none_or(|t| t == r.runner_type))
            .filter(|r| tags.iter().all(|t| r.tag_list.contains(t)))
            .map(|r| self.runner_json(r))
            .collect();
        Ok(Reply::List(items))
    }

    /// `GET|DELETE /runners/:id`.
    pub(crate) fn runner(&mut self, u: &User, method: &str, id: &str) -> Result<Reply, ApiErr> {
        let r = id
            .parse::<u64>()
            .ok()
            .and_then(|id| self.runners.iter().find(|r| r.id == id))
            .cloned()
            .ok_or_else(|| ApiErr::not_found("Runner"))?;
        let allowed = u.admin
            || match r.scope {
                Scope::Group(g) => self.group_level(g, u.id) >= access::OWNER,
                Scope::Project(p) => self.project_level(p, u.id) >= access::MAINTAINER,
                Scope::Instance => false,
            };
        if !allowed {
            return Err(ApiErr::forbidden());
        }
        if method == "DELETE" {
            self.runners.retain(|x| x.id != r.id);
            return Ok(Reply::Empty);
        }
        ok(self.runner_json(&r))
    }

    /// `POST /runners/verify` (`token`, `system_id`): authenticated by the
    /// runner's token alone, as `gitlab-runner register` does with a `glrt-`
    /// token; `403 Forbidden` when no runner has it.
    pub(crate) fn verify_runner(&self, params: &Params) -> Result<Reply, ApiErr> {
        let token = params.str("token").ok_or_else(|| ParamError::missing("token"))?;
        let r = self.runners.iter().find(|r| r.token == token).ok_or_else(ApiErr::forbidden)?;
        ok(json!({ "id": r.id, "token": r.token, "token_expires_at": null }))
    }
}
