//! Git over smart HTTP at
//! `/<path_with_namespace>.git/{info/refs,git-upload-pack,git-receive-pack}`,
//! through `git http-backend` (CGI) with bodies streamed both ways, answering
//! like GitLab: no or wrong credentials 401 (with `WWW-Authenticate`), a
//! project the user may not see 404, a role too low 403.

use std::process::Stdio;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::params::decode;
use crate::permissions::GitGrant;
use crate::replies::{Body, text_response};
use crate::shared::{Shared, lock};
use crate::state::State;

/// The three requests of git's smart HTTP protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GitAction {
    /// `GET info/refs?service=...`.
    InfoRefs,
    /// `POST git-upload-pack` (fetch).
    UploadPack,
    /// `POST git-receive-pack` (push).
    ReceivePack,
}

/// The project and the action of a git request path, if it is one.
pub(crate) fn git_route(path: &str) -> Option<(String, GitAction)> {
    let actions = [
        ("/info/refs", GitAction::InfoRefs),
        ("/git-upload-pack", GitAction::UploadPack),
        ("/git-receive-pack", GitAction::ReceivePack),
    ];
    for (suffix, action) in actions {
        if let Some(repo) = path.strip_suffix(suffix) {
            let repo = decode(repo.trim_start_matches('/'));
            let repo = repo.strip_suffix(".git").unwrap_or(&repo).to_owned();
            if !repo.is_empty() {
                return Some((repo, action));
            }
        }
    }
    None
}

/// Serves a git request on `repo` after checking credentials and role.
pub(crate) async fn handle(
    shared: &Shared,
    req: Request<Incoming>,
    repo: &str,
    action: GitAction,
    query: Option<&str>,
) -> Response<Body> {
    let service = match action {
        GitAction::InfoRefs => form_urlencoded::parse(query.unwrap_or("").as_bytes())
            .find(|(k, _)| k == "service")
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default(),
        GitAction::UploadPack => "git-upload-pack".to_owned(),
        GitAction::ReceivePack => "git-receive-pack".to_owned(),
    };
    let push = match service.as_str() {
        "git-upload-pack" => false,
        "git-receive-pack" => true,
        _ => return text_response(403, "Only the smart HTTP protocol is supported.", false),
    };
    let creds = basic_credentials(req.headers());
    let grant = match lock(&shared.state).git_access(repo, creds.as_ref(), push) {
        Ok(g) => g,
        Err((status, text)) => return text_response(status, text, status == 401),
    };
    match run_backend(shared, req, &grant, action, query).await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::warn!("fake gitlab: git http-backend failed: {e:#}");
            text_response(500, "git http-backend failed", false)
        }
    }
}

/// Runs `git http-backend` for the request: the body streams to its stdin, its stdout back.
async fn run_backend(
    shared: &Shared,
    req: Request<Incoming>,
    grant: &GitGrant,
    action: GitAction,
    query: Option<&str>,
) -> anyhow::Result<Response<Body>> {
    let (parts, body) = req.into_parts();
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let suffix = match action {
        GitAction::InfoRefs => "info/refs",
        GitAction::UploadPack => "git-upload-pack",
        GitAction::ReceivePack => "git-receive-pack",
    };
    let mut cmd = tokio::process::Command::new("git");
    cmd.arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", &shared.home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_PROJECT_ROOT", &shared.repos)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("PATH_INFO", format!("/{}.git/{suffix}", grant.path_with_namespace))
        .env("QUERY_STRING", query.unwrap_or(""))
        .env("REQUEST_METHOD", parts.method.as_str())
        .env("CONTENT_TYPE", header("content-type").unwrap_or_default())
        .env("REMOTE_USER", &grant.username)
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("FAKE_GITLAB_PROTECTED", &grant.protected)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(len) = header("content-length") {
        cmd.env("CONTENT_LENGTH", len);
    }
    if let Some(enc) = header("content-encoding") {
        cmd.env("HTTP_CONTENT_ENCODING", enc);
    }
    if let Some(proto) = header("git-protocol") {
        cmd.env("HTTP_GIT_PROTOCOL", proto);
    }
    let mut child = cmd.spawn()?;
    let (Some(mut stdin), Some(mut stdout), Some(mut stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        anyhow::bail!("git http-backend pipes missing");
    };
    // Request body → CGI stdin, frame by frame (pushes can be large).
    tokio::spawn(async move {
        let mut body = body;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { break };
            if let Ok(data) = frame.into_data()
                && stdin.write_all(&data).await.is_err()
            {
                break;
            }
        }
        let _ = stdin.shutdown().await;
    });
    let stderr_task = tokio::spawn(async move {
        let mut buf = Vec::new();
        let _ = (&mut stderr).take(64 << 10).read_to_end(&mut buf).await;
        let mut sink = tokio::io::sink();
        let _ = tokio::io::copy(&mut stderr, &mut sink).await;
        String::from_utf8_lossy(&buf).into_owned()
    });
    // CGI response headers.
    let mut buf = Vec::with_capacity(8192);
    let mut chunk = vec![0u8; 64 << 10];
    let (head_end, body_start) = loop {
        if let Some(found) = header_end(&buf) {
            break found;
        }
        let n = stdout.read(&mut chunk).await?;
        if n == 0 {
            let _ = child.wait().await;
            let err = stderr_task.await.unwrap_or_default();
            anyhow::bail!("no CGI headers from git http-backend: {err}");
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 1 << 20 {
            anyhow::bail!("CGI headers too long");
        }
    };
    let mut resp_builder = Response::builder();
    let mut status = 200u16;
    for line in String::from_utf8_lossy(&buf[..head_end]).lines() {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            status = value.split_whitespace().next().and_then(|s| s.parse().ok()).unwrap_or(500);
        } else {
            resp_builder = resp_builder.header(name.trim(), value);
        }
    }
    let rest = buf.split_off(body_start);
    // CGI stdout → response body, streamed.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(8);
    tokio::spawn(async move {
        let mut ok = rest.is_empty() || tx.send(Ok(Frame::data(Bytes::from(rest)))).await.is_ok();
        while ok {
            match stdout.read(&mut chunk).await {
                Ok(0) => break,
                Ok(n) => ok = tx.send(Ok(Frame::data(Bytes::copy_from_slice(&chunk[..n])))).await.is_ok(),
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    ok = false;
                }
            }
        }
        if !ok {
            let _ = child.start_kill();
        }
        let exit = child.wait().await;
        let err = stderr_task.await.unwrap_or_default();
        if !err.trim().is_empty() || !exit.as_ref().is_ok_and(|s| s.success()) {
            tracing::debug!("fake gitlab: git http-backend exited {exit:?}: {err}");
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    let resp = resp_builder.status(status).body(StreamBody::new(stream).boxed_unsync())?;
    Ok(resp)
}

/// End of the CGI header block: (end of headers, start of body).
fn header_end(buf: &[u8]) -> Option<(usize, usize)> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| (i, i + 4));
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| (i, i + 2));
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

fn basic_credentials(headers: &hyper::HeaderMap) -> Option<(String, String)> {
    let v = headers.get(hyper::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, b64) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok()?;
    let raw = String::from_utf8(raw).ok()?;
    let (user, pass) = raw.split_once(':')?;
    Some((user.to_owned(), pass.to_owned()))
}

impl State {
    /// What the HTTP Basic credentials (password: a token) may do with `repo`.
    pub(crate) fn git_access(
        &self,
        repo: &str,
        creds: Option<&(String, String)>,
        push: bool,
    ) -> Result<GitGrant, (u16, &'static str)> {
        pub(crate) const DENIED: &str = "HTTP Basic: Access denied. If a password was provided for Git authentication, the password was incorrect or you're required to use a token instead of a password. If a token was provided, it was either incorrect, expired, or improperly scoped.";
        let project = self.project_by_path(repo);
        let user = match creds {
            None => {
                return match project {
                    Some(p) if p.visibility == "public" && !push => Ok(GitGrant {
                        path_with_namespace: p.path_with_namespace.clone(),
                        username: String::new(),
                        protected: String::new(),
                    }),
                    _ => Err((401, DENIED)),
                };
            }
            Some((_, token)) => self.token_user(token).ok_or((401, DENIED))?,
        };
        self.git_grant(repo, user, push)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgi_header_end() {
        assert_eq!(header_end(b"Status: 200\r\n\r\nbody"), Some((11, 15)));
        assert_eq!(header_end(b"A: b\n\nbody"), Some((4, 6)));
        assert_eq!(header_end(b"A: b\r\n"), None);
    }
}
