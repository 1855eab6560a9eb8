//! The GitLab REST client that the indexer and the provisioner share.
//!
//! [`Client`] builds the `gitlab` crate's async client on first use (building asks `GET /user`)
//! and again after a failed build, puts a timeout on every request, and sorts every failure into
//! a [`Fail`] by what the caller does next: look the object up again ([`Fail::Taken`], another
//! writer created it), retry later ([`Fail::Unavailable`]: no answer, 408, 429, 5xx), or stop
//! with GitLab's message ([`Fail::Refused`]: 401, 403, invalid input). A token is never in a URL,
//! a message or a `Debug` output.

use std::fmt;
use std::time::Duration;

use bidsflux_config::Secret;
use gitlab::api::{ApiError, AsyncQuery, Endpoint};
use gitlab::{AsyncGitlab, GitlabBuilder, GitlabError, RestError};
use serde::de::DeserializeOwned;

/// Why a GitLab call failed, by what the caller does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fail {
    /// 404.
    NotFound(String),
    /// 400 "has already been taken": another replica (or user) created it.
    Taken(String),
    /// 409 (e.g. "Member already exists").
    Conflict(String),
    /// No answer, a timeout, 408, 429 or 5xx: retry later.
    Unavailable(String),
    /// Any other refusal (401, 403, invalid input): GitLab's message.
    Refused(String),
}

/// The failure for an HTTP `status` with GitLab's `message`; `what` names the request.
pub fn by_status(what: &str, status: u16, message: &str) -> Fail {
    let text = format!("{what}: GitLab answered {status}: {message}");
    match status {
        404 => Fail::NotFound(text),
        409 => Fail::Conflict(text),
        400 if message.contains("has already been taken") => Fail::Taken(text),
        408 | 429 | 500..=599 => Fail::Unavailable(text),
        _ => Fail::Refused(text),
    }
}

/// The failure for an error of the `gitlab` crate.
pub fn classify(what: &str, e: ApiError<RestError>) -> Fail {
    match e {
        ApiError::GitlabWithStatus { status, msg } => by_status(what, status.as_u16(), &msg),
        ApiError::GitlabObjectWithStatus { status, obj } => by_status(what, status.as_u16(), &obj.to_string()),
        ApiError::GitlabUnrecognizedWithStatus { status, obj } => by_status(what, status.as_u16(), &obj.to_string()),
        ApiError::GitlabService { status, .. } => {
            by_status(what, status.as_u16(), status.canonical_reason().unwrap_or("no message"))
        }
        ApiError::GitlabRateLimited { .. } => Fail::Unavailable(format!("{what}: GitLab is rate limiting: {e}")),
        ApiError::Client { source: RestError::AuthError { .. } } | ApiError::Auth { .. } => {
            Fail::Refused(format!("{what}: {e}"))
        }
        // Connection refused or reset, TLS, a proxy's non-JSON answer...
        ApiError::Client { .. } | ApiError::Json { .. } | ApiError::DataType { .. } => {
            Fail::Unavailable(format!("{what}: {e}"))
        }
        e => Fail::Refused(format!("{what}: {e}")),
    }
}

fn classify_build(e: GitlabError) -> Fail {
    let what = "connect to GitLab (GET /user)";
    match e {
        GitlabError::Api { source } => classify(what, source),
        GitlabError::UrlParse { .. } | GitlabError::AuthError { .. } => Fail::Refused(format!("{what}: {e}")),
        e => Fail::Unavailable(format!("{what}: {e}")),
    }
}

impl Fail {
    /// The message: what was asked and what GitLab (or the connection) answered.
    pub fn message(&self) -> &str {
        match self {
            Self::NotFound(m) | Self::Taken(m) | Self::Conflict(m) | Self::Unavailable(m) | Self::Refused(m) => m,
        }
    }
}

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for Fail {}

/// A GitLab instance and a token. Cheap to create: nothing is contacted until the first request.
pub struct Client {
    url: String,
    /// `host[:port][/path]` for [`GitlabBuilder`].
    host: String,
    insecure: bool,
    token: Secret,
    timeout: Duration,
    /// Built on first use, again after a failed build.
    client: tokio::sync::Mutex<Option<AsyncGitlab>>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client").field("url", &self.url).field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

impl Client {
    /// A client of the GitLab at `url` (`https://host[:port][/path]`; `http://` for a test
    /// server) with `token`, each request given `timeout`.
    pub fn new(url: &str, token: Secret, timeout: Duration) -> Self {
        let url = url.trim_end_matches('/').to_owned();
        let (insecure, host) = match url.strip_prefix("http://") {
            Some(rest) => (true, rest.to_owned()),
            None => (false, url.strip_prefix("https://").unwrap_or(&url).to_owned()),
        };
        Self { url, host, insecure, token, timeout, client: tokio::sync::Mutex::new(None) }
    }

    /// The base URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The `gitlab` crate's client, built (`GET /user`) on first use.
    pub async fn client(&self) -> Result<AsyncGitlab, Fail> {
        let mut client = self.client.lock().await;
        if let Some(c) = &*client {
            return Ok(c.clone());
        }
        let mut builder = GitlabBuilder::new(self.host.as_str(), self.token.expose());
        if self.insecure {
            builder.insecure();
        }
        let built = tokio::time::timeout(self.timeout, builder.build_async())
            .await
            .map_err(|_| {
                Fail::Unavailable(format!("connect to GitLab at {}: no answer within {:?}", self.url, self.timeout))
            })?
            .map_err(classify_build)?;
        *client = Some(built.clone());
        Ok(built)
    }

    /// Runs one API request with the timeout; `what` names it in errors.
    pub async fn call<T, Q>(&self, what: &str, query: Q) -> Result<T, Fail>
    where
        Q: AsyncQuery<T, AsyncGitlab> + Sync,
        T: Send,
    {
        let client = self.client().await?;
        match tokio::time::timeout(self.timeout, query.query_async(&client)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(classify(what, e)),
            Err(_) => Err(Fail::Unavailable(format!("{what}: GitLab did not answer within {:?}", self.timeout))),
        }
    }

    /// [`Client::call`] of an endpoint that the `gitlab` crate's builder may have refused to build.
    pub async fn get<T, E>(&self, what: &str, endpoint: Result<E, impl fmt::Display>) -> Result<T, Fail>
    where
        E: Endpoint + Sync + Send,
        T: DeserializeOwned + Send + 'static,
    {
        let endpoint = endpoint.map_err(|e| Fail::Refused(format!("{what}: {e}")))?;
        self.call(what, endpoint).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_sort_into_what_to_do() {
        assert!(matches!(by_status("x", 502, "Bad Gateway"), Fail::Unavailable(_)));
        assert!(matches!(by_status("x", 429, "slow down"), Fail::Unavailable(_)));
        assert!(matches!(by_status("x", 408, "Request Timeout"), Fail::Unavailable(_)));
        assert!(matches!(by_status("x", 403, "403 Forbidden"), Fail::Refused(_)));
        assert!(matches!(by_status("x", 401, "401 Unauthorized"), Fail::Refused(_)));
        assert!(matches!(by_status("x", 404, "404 Group Not Found"), Fail::NotFound(_)));
        assert!(matches!(by_status("x", 409, "Member already exists"), Fail::Conflict(_)));
        let taken = r#"Failed to save group {:path=>["has already been taken"]}"#;
        assert!(matches!(by_status("x", 400, taken), Fail::Taken(_)));
        assert!(matches!(by_status("x", 400, "path is invalid"), Fail::Refused(_)));
        assert_eq!(
            by_status("get group g", 403, "403 Forbidden").to_string(),
            "get group g: GitLab answered 403: 403 Forbidden"
        );
    }

    #[test]
    fn the_url_gives_the_host_and_the_scheme() {
        let c = Client::new("https://gitlab.example.org/", Secret::new("t"), Duration::from_secs(1));
        assert_eq!((c.host.as_str(), c.insecure, c.url()), ("gitlab.example.org", false, "https://gitlab.example.org"));
        let c = Client::new("http://127.0.0.1:8080/gitlab", Secret::new("t"), Duration::from_secs(1));
        assert_eq!((c.host.as_str(), c.insecure), ("127.0.0.1:8080/gitlab", true));
    }

    #[test]
    fn debug_shows_no_token() {
        let c = Client::new("http://127.0.0.1:1/", Secret::new("glpat-very-secret"), Duration::from_secs(1));
        assert_eq!(c.url(), "http://127.0.0.1:1");
        assert!(!format!("{c:?}").contains("very-secret"));
    }
}
