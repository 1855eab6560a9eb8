//! Parameters: the query string, a JSON or a form body, merged (body last),
//! and the checks GitLab's API layer applies to them. A leaf: its errors are
//! [`ParamError`]s, which the API turns into GitLab's `{"error": ...}` replies.

use serde_json::Value;

/// A parameter GitLab's API layer rejects before anything is looked up:
/// a status and the text of `{"error": ...}`.
#[derive(Debug, Clone)]
pub(crate) struct ParamError {
    /// HTTP status (400, or 415 for a multipart body).
    pub(crate) status: u16,
    /// The text of the `error` field.
    pub(crate) error: String,
}

impl ParamError {
    /// A rejection with its own text.
    pub(crate) fn new(status: u16, error: impl Into<String>) -> Self {
        Self { status, error: error.into() }
    }

    /// `400 {"error": "<param> is missing"}`.
    pub(crate) fn missing(param: &str) -> Self {
        Self::new(400, format!("{param} is missing"))
    }

    /// `400 {"error": "<param> does not have a valid value"}`.
    pub(crate) fn invalid(param: &str) -> Self {
        Self::new(400, format!("{param} does not have a valid value"))
    }
}

/// The parameters of a request: query string, then JSON or form body (the last value of a key wins).
#[derive(Debug, Default)]
pub(crate) struct Params {
    pairs: Vec<(String, Value)>,
}

impl Params {
    /// Reads the query string and the body (JSON, or a form); multipart bodies are refused.
    pub(crate) fn parse(query: Option<&str>, content_type: Option<&str>, body: &[u8]) -> Result<Self, ParamError> {
        let mut pairs: Vec<(String, Value)> = form_urlencoded::parse(query.unwrap_or("").as_bytes())
            .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
            .collect();
        let ct = content_type.unwrap_or("").to_ascii_lowercase();
        if !body.iter().all(u8::is_ascii_whitespace) {
            if ct.starts_with("application/json") || (ct.is_empty() && body.first() == Some(&b'{')) {
                match serde_json::from_slice::<Value>(body) {
                    Ok(Value::Object(map)) => pairs.extend(map),
                    _ => {
                        return Err(ParamError::new(
                            400,
                            "The provided content-type 'application/json' is not supported.",
                        ));
                    }
                }
            } else if ct.starts_with("multipart/") {
                return Err(ParamError::new(415, "multipart bodies are not supported by the fake GitLab"));
            } else {
                pairs
                    .extend(form_urlencoded::parse(body).map(|(k, v)| (k.into_owned(), Value::String(v.into_owned()))));
            }
        }
        Ok(Self { pairs })
    }

    /// The last value of `key`, as given.
    pub(crate) fn raw(&self, key: &str) -> Option<&Value> {
        self.pairs.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The last value of `key` as a string (numbers and booleans too).
    pub(crate) fn str(&self, key: &str) -> Option<String> {
        match self.raw(key)? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }

    /// A non-empty string, else `{key} is missing`.
    pub(crate) fn required(&self, key: &str) -> Result<String, ParamError> {
        self.str(key).filter(|s| !s.is_empty()).ok_or_else(|| ParamError::missing(key))
    }

    /// An optional number, else `{key} does not have a valid value`.
    pub(crate) fn u64(&self, key: &str) -> Result<Option<u64>, ParamError> {
        match self.str(key).filter(|s| !s.is_empty()) {
            None => Ok(None),
            Some(s) => s.trim().parse().map(Some).map_err(|_| ParamError::invalid(key)),
        }
    }

    /// An optional boolean (`true`/`1`/`t`/`yes`, `false`/`0`/`f`/`no`).
    pub(crate) fn bool(&self, key: &str) -> Result<Option<bool>, ParamError> {
        match self.str(key).filter(|s| !s.is_empty()).map(|s| s.to_ascii_lowercase()) {
            None => Ok(None),
            Some(s) => match s.as_str() {
                "true" | "1" | "t" | "yes" => Ok(Some(true)),
                "false" | "0" | "f" | "no" => Ok(Some(false)),
                _ => Err(ParamError::invalid(key)),
            },
        }
    }

    /// `key[]=a&key[]=b`, a JSON array, or `key=a,b`.
    pub(crate) fn list(&self, key: &str) -> Vec<String> {
        let bracket = format!("{key}[]");
        let mut out = Vec::new();
        for (k, v) in &self.pairs {
            if k == &bracket {
                if let Some(s) = v.as_str() {
                    out.push(s.to_owned());
                }
            } else if k == key {
                match v {
                    Value::Array(a) => out.extend(a.iter().filter_map(|x| x.as_str().map(str::to_owned))),
                    Value::String(s) => {
                        out.extend(s.split(',').map(str::trim).filter(|t| !t.is_empty()).map(str::to_owned))
                    }
                    _ => {}
                }
            }
        }
        out
    }

    /// An array of objects: a JSON array of objects, or form fields in Rack's
    /// notation, `key[][field]=…` (a new object starts when a field repeats)
    /// or `key[N][field]=…`. Each object becomes its own [`Params`]; `None`
    /// when `key` is absent.
    pub(crate) fn objects(&self, key: &str) -> Result<Option<Vec<Params>>, ParamError> {
        if let Some(v) = self.raw(key) {
            let Value::Array(items) = v else { return Err(ParamError::new(400, format!("{key} is invalid"))) };
            let mut out = Vec::new();
            for item in items {
                let Value::Object(map) = item else { return Err(ParamError::new(400, format!("{key} is invalid"))) };
                out.push(Params { pairs: map.clone().into_iter().collect() });
            }
            return Ok(Some(out));
        }
        let open = format!("{key}[");
        let mut out: Vec<Params> = Vec::new();
        // `key[N][…]`: N and the position of its object.
        let mut indexed: Vec<(String, usize)> = Vec::new();
        for (k, v) in &self.pairs {
            let Some(rest) = k.strip_prefix(open.as_str()) else { continue };
            let Some((index, field)) = rest.split_once("][") else { continue };
            let Some(field) = field.strip_suffix(']').filter(|f| !f.is_empty() && !f.contains('[')) else {
                continue;
            };
            let target = if index.is_empty() {
                match out.last() {
                    Some(last) if last.raw(field).is_none() => out.len() - 1,
                    _ => {
                        out.push(Params::default());
                        out.len() - 1
                    }
                }
            } else {
                match indexed.iter().find(|(i, _)| i == index) {
                    Some((_, at)) => *at,
                    None => {
                        out.push(Params::default());
                        indexed.push((index.to_owned(), out.len() - 1));
                        out.len() - 1
                    }
                }
            };
            if let Some(obj) = out.get_mut(target) {
                obj.pairs.push((field.to_owned(), v.clone()));
            }
        }
        Ok((!out.is_empty()).then_some(out))
    }
}

/// `visibility`: `private`, `internal` or `public`, `default` when absent.
pub(crate) fn visibility_param(params: &Params, default: &str) -> Result<String, ParamError> {
    let v = params.str("visibility").unwrap_or_else(|| default.to_owned());
    match v.as_str() {
        "private" | "internal" | "public" => Ok(v),
        _ => Err(ParamError::invalid("visibility")),
    }
}

/// GitLab's `search`: a case-insensitive substring of any of `hay` (`needle` is lowercase).
pub(crate) fn matches_search(needle: &str, hay: &[&str]) -> bool {
    hay.iter().any(|h| h.to_lowercase().contains(needle))
}

/// A percent-decoded path segment.
pub(crate) fn decode(seg: &str) -> String {
    percent_encoding::percent_decode_str(seg).decode_utf8_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_of_objects() {
        let form = b"branch=main&actions[][action]=create&actions[][file_path]=a&actions[][content]=x\
&actions[][action]=delete&actions[][file_path]=b";
        let p = Params::parse(None, Some("application/x-www-form-urlencoded"), form).unwrap_or_default();
        let actions = p.objects("actions").ok().flatten().unwrap_or_default();
        let summary: Vec<(Option<String>, Option<String>)> =
            actions.iter().map(|a| (a.str("action"), a.str("file_path"))).collect();
        assert_eq!(summary, [(Some("create".into()), Some("a".into())), (Some("delete".into()), Some("b".into()))]);
        assert_eq!(actions[0].str("content").as_deref(), Some("x"));

        let form = b"actions[1][file_path]=b&actions[0][file_path]=a&actions[1][action]=delete";
        let p = Params::parse(None, None, form).unwrap_or_default();
        let actions = p.objects("actions").ok().flatten().unwrap_or_default();
        assert_eq!(actions.len(), 2);
        assert_eq!(
            (actions[0].str("file_path").as_deref(), actions[0].str("action").as_deref()),
            (Some("b"), Some("delete"))
        );

        let json = br#"{"actions":[{"action":"update","file_path":"c","execute_filemode":true}]}"#;
        let p = Params::parse(None, Some("application/json"), json).unwrap_or_default();
        let actions = p.objects("actions").ok().flatten().unwrap_or_default();
        assert_eq!(actions[0].bool("execute_filemode").ok().flatten(), Some(true));
        assert!(p.objects("nothing").ok().flatten().is_none());
        let p = Params::parse(None, Some("application/json"), br#"{"actions":"x"}"#).unwrap_or_default();
        assert_eq!(p.objects("actions").err().map(|e| e.error).as_deref(), Some("actions is invalid"));
    }
}
