//! CI/CD variables: `/groups/:id/variables`, `/projects/:id/variables`,
//! `/admin/ci/variables` (admin), each with `GET|POST` and `GET|PUT|DELETE /:key`.

use serde_json::{Value, json};

use crate::params::{ParamError, Params};
use crate::replies::{ApiErr, Reply, created, ok};
use crate::state::{Scope, State, Variable};

impl State {
    pub(crate) fn variable_json(v: &Variable) -> Value {
        let mut out = json!({
            "variable_type": v.variable_type,
            "key": v.key,
            "value": v.value,
            "protected": v.protected,
            "masked": v.masked,
            "hidden": false,
            "raw": v.raw,
            "description": v.description,
        });
        if v.scope != Scope::Instance
            && let Some(o) = out.as_object_mut()
        {
            o.insert("environment_scope".into(), json!(v.environment_scope));
        }
        out
    }

    /// The variables of `scope`; `rest` is the path after `variables`.
    pub(crate) fn variables_route(
        &mut self,
        scope: Scope,
        method: &str,
        rest: &[&str],
        params: &Params,
    ) -> Result<Reply, ApiErr> {
        let env_scope = params.str("environment_scope").filter(|s| !s.is_empty()).unwrap_or_else(|| "*".into());
        let filter_scope = params.str("filter[environment_scope]");
        match (method, rest) {
            ("GET", []) => {
                Ok(Reply::List(self.variables.iter().filter(|v| v.scope == scope).map(Self::variable_json).collect()))
            }
            ("POST", []) => {
                let key = params.required("key")?;
                let value = params.str("value").ok_or_else(|| ParamError::missing("value"))?;
                if key.len() > 255 || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(ApiErr::validation("key", "can contain only letters, digits and '_'."));
                }
                let v = Variable {
                    scope,
                    key: key.clone(),
                    value,
                    variable_type: variable_type(params, "env_var")?,
                    protected: params.bool("protected")?.unwrap_or(false),
                    masked: params.bool("masked")?.unwrap_or(false)
                        || params.bool("masked_and_hidden")?.unwrap_or(false),
                    raw: params.bool("raw")?.unwrap_or(false),
                    environment_scope: env_scope,
                    description: params.str("description"),
                };
                check_masked(&v)?;
                if self
                    .variables
                    .iter()
                    .any(|x| x.scope == scope && x.key == key && x.environment_scope == v.environment_scope)
                {
                    return Err(ApiErr::validation("key", &format!("({key}) has already been taken")));
                }
                self.variables.push(v.clone());
                created(Self::variable_json(&v))
            }
            ("GET", [key]) => self
                .variables
                .iter()
                .find(|v| {
                    v.scope == scope && v.key == *key && filter_scope.as_ref().is_none_or(|f| *f == v.environment_scope)
                })
                .map(Self::variable_json)
                .map_or_else(|| Err(ApiErr::not_found("Variable")), ok),
            ("PUT", [key]) => {
                let variable_type =
                    params.str("variable_type").map(|_| variable_type(params, "env_var")).transpose()?;
                let (protected, masked, raw) = (params.bool("protected")?, params.bool("masked")?, params.bool("raw")?);
                let value = params.str("value");
                let description = params.str("description");
                let new_scope = params.str("environment_scope").filter(|s| !s.is_empty());
                let Some(v) = self.variables.iter_mut().find(|v| {
                    v.scope == scope && v.key == *key && filter_scope.as_ref().is_none_or(|f| *f == v.environment_scope)
                }) else {
                    return Err(ApiErr::not_found("Variable"));
                };
                let mut updated = v.clone();
                if let Some(x) = value {
                    updated.value = x;
                }
                if let Some(x) = variable_type {
                    updated.variable_type = x;
                }
                if let Some(x) = protected {
                    updated.protected = x;
                }
                if let Some(x) = masked {
                    updated.masked = x;
                }
                if let Some(x) = raw {
                    updated.raw = x;
                }
                if description.is_some() {
                    updated.description = description;
                }
                if let Some(x) = new_scope
                    && scope != Scope::Instance
                {
                    updated.environment_scope = x;
                }
                check_masked(&updated)?;
                *v = updated.clone();
                ok(Self::variable_json(&updated))
            }
            ("DELETE", [key]) => {
                let before = self.variables.len();
                self.variables.retain(|v| {
                    !(v.scope == scope
                        && v.key == *key
                        && filter_scope.as_ref().is_none_or(|f| *f == v.environment_scope))
                });
                if self.variables.len() == before { Err(ApiErr::not_found("Variable")) } else { Ok(Reply::Empty) }
            }
            _ => Err(ApiErr::route()),
        }
    }
}

fn variable_type(params: &Params, default: &str) -> Result<String, ParamError> {
    let t = params.str("variable_type").unwrap_or_else(|| default.to_owned());
    if matches!(t.as_str(), "env_var" | "file") { Ok(t) } else { Err(ParamError::invalid("variable_type")) }
}

/// GitLab's rule for masked values: at least 8 characters, no whitespace,
/// a restricted alphabet.
fn check_masked(v: &Variable) -> Result<(), ApiErr> {
    let ok_chars = v.value.chars().all(|c| c.is_ascii_alphanumeric() || "@:.~-_+/=".contains(c));
    if v.masked && (v.value.len() < 8 || !ok_chars) {
        return Err(ApiErr::validation("value", "is invalid"));
    }
    Ok(())
}
