//! One GitLab REST request, as GitLab's API documentation writes it: a method, a path under
//! `/api/v4`, query parameters and a form body.
//!
//! It implements the `gitlab` crate's [`Endpoint`] (and [`Pageable`], so lists are read whole
//! with [`gitlab::api::paged`]), so every call goes through the crate's client, authentication
//! and error decoding ([`bidsflux_gitlab_api::Client`]). The crate's typed endpoints are not used
//! here: they lack the instance CI variables and user SSH keys, and its token scope enums lack
//! scopes GitLab has; one explicit form per call also reads the way the REST docs do, which is
//! what a data manager checks when GitLab refuses something.

use std::borrow::Cow;

use gitlab::api::{BodyError, Endpoint, FormParams, Pageable, QueryParams};
use http::Method;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

/// Characters kept in a path segment: GitLab wants `/` in a full path as `%2F`.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.');

/// `segment` escaped for a URL path (`ni-dataops/ci-pipelines` → `ni-dataops%2Fci-pipelines`).
pub fn esc(segment: &str) -> String {
    utf8_percent_encode(segment, SEGMENT).to_string()
}

/// A request: [`Rest::get`], [`Rest::post`], ... with [`Rest::query`] and [`Rest::form`].
#[derive(Debug, Clone)]
pub struct Rest {
    method: Method,
    path: String,
    query: Vec<(String, String)>,
    form: Vec<(String, String)>,
}

impl Rest {
    fn new(method: Method, path: impl Into<String>) -> Self {
        Self { method, path: path.into(), query: Vec::new(), form: Vec::new() }
    }

    /// `GET path`.
    pub fn get(path: impl Into<String>) -> Self {
        Self::new(Method::GET, path)
    }

    /// `POST path`.
    pub fn post(path: impl Into<String>) -> Self {
        Self::new(Method::POST, path)
    }

    /// `PUT path`.
    pub fn put(path: impl Into<String>) -> Self {
        Self::new(Method::PUT, path)
    }

    /// `DELETE path`.
    pub fn delete(path: impl Into<String>) -> Self {
        Self::new(Method::DELETE, path)
    }

    /// Adds a query parameter.
    #[must_use]
    pub fn query(mut self, key: &str, value: impl ToString) -> Self {
        self.query.push((key.to_owned(), value.to_string()));
        self
    }

    /// Adds a form field (`key[]` for each item of a list).
    #[must_use]
    pub fn form(mut self, key: &str, value: impl ToString) -> Self {
        self.form.push((key.to_owned(), value.to_string()));
        self
    }

    /// What the request is, for messages: `POST users`.
    pub fn what(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

impl Endpoint for Rest {
    fn method(&self) -> Method {
        self.method.clone()
    }

    fn endpoint(&self) -> Cow<'static, str> {
        self.path.clone().into()
    }

    fn parameters(&self) -> QueryParams<'_> {
        let mut q = QueryParams::default();
        for (k, v) in &self.query {
            q.push(k.as_str(), v.as_str());
        }
        q
    }

    fn body(&self) -> Result<Option<(&'static str, Vec<u8>)>, BodyError> {
        if self.form.is_empty() {
            return Ok(None);
        }
        let mut f = FormParams::default();
        for (k, v) in &self.form {
            f.push(k.as_str(), v.as_str());
        }
        f.into_body()
    }
}

impl Pageable for Rest {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_escaped_and_forms_encoded() {
        assert_eq!(esc("ni-dataops/ci-pipelines"), "ni-dataops%2Fci-pipelines");
        assert_eq!(esc("bids.yml"), "bids.yml");
        let r = Rest::post("users").form("username", "dicom_bot").form("scopes[]", "api");
        assert_eq!(r.what(), "POST users");
        let (kind, body) = r.body().unwrap().unwrap();
        assert_eq!(kind, "application/x-www-form-urlencoded");
        assert_eq!(String::from_utf8(body).unwrap(), "username=dicom_bot&scopes%5B%5D=api");
        assert!(Rest::get("user").body().unwrap().is_none());
    }
}
