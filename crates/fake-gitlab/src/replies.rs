//! Errors and replies: what a route answers ([`Reply`], [`ApiErr`]) and the
//! HTTP responses the server sends (JSON, plain text for git clients). A leaf.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::{Value, json};

/// An error reply of the REST API: status and JSON body.
#[derive(Debug, Clone)]
pub(crate) struct ApiErr {
    /// HTTP status.
    pub(crate) status: u16,
    /// `{"message": ...}` or `{"error": ...}`.
    pub(crate) body: Value,
}

impl ApiErr {
    /// `{"message": message}`: an application error.
    pub(crate) fn message(status: u16, message: impl Into<String>) -> Self {
        Self { status, body: json!({ "message": message.into() }) }
    }
    /// `{"error": error}`: a request GitLab's API layer rejects.
    pub(crate) fn error(status: u16, error: impl Into<String>) -> Self {
        Self { status, body: json!({ "error": error.into() }) }
    }
    /// `404 {"message": "404 <what> Not Found"}`.
    pub(crate) fn not_found(what: &str) -> Self {
        Self::message(404, format!("404 {what} Not Found"))
    }
    /// `403 {"message": "403 Forbidden"}`.
    pub(crate) fn forbidden() -> Self {
        Self::message(403, "403 Forbidden")
    }
    /// `403 {"message": "403 Forbidden - <reason>"}`.
    pub(crate) fn forbidden_because(reason: &str) -> Self {
        Self::message(403, format!("403 Forbidden - {reason}"))
    }
    /// `400 {"message": "400 Bad request - <reason>"}`.
    pub(crate) fn bad_request(reason: &str) -> Self {
        Self::message(400, format!("400 Bad request - {reason}"))
    }
    /// `401 {"message": "401 Unauthorized"}`.
    pub(crate) fn unauthorized() -> Self {
        Self::message(401, "401 Unauthorized")
    }
    /// A model validation error: `{"message":{"field":["text"]}}`.
    pub(crate) fn validation(field: &str, text: &str) -> Self {
        Self { status: 400, body: json!({ "message": { field: [text] } }) }
    }
    /// `404 {"error": "404 Not Found"}`: no such route.
    pub(crate) fn route() -> Self {
        Self::error(404, "404 Not Found")
    }
}

/// A successful reply of a route.
#[derive(Debug)]
pub(crate) enum Reply {
    /// A JSON value with a status (200, 201).
    Json(u16, Value),
    /// A whole list, paginated when it is sent.
    List(Vec<Value>),
    /// `204 No Content`.
    Empty,
    /// `200` with raw bytes (`text/plain`) and extra headers: a file's content.
    Raw(Vec<u8>, Vec<(String, String)>),
}

/// `200` with `v`.
pub(crate) fn ok(v: Value) -> Result<Reply, ApiErr> {
    Ok(Reply::Json(200, v))
}

/// `201` with `v`.
pub(crate) fn created(v: Value) -> Result<Reply, ApiErr> {
    Ok(Reply::Json(201, v))
}

/// The body of every response: whole JSON or text, or a stream from `git http-backend`.
pub(crate) type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// A body of these bytes.
pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never: Infallible| match never {}).boxed_unsync()
}

/// A JSON response with extra headers (pagination).
pub(crate) fn json_response(status: u16, body: &Value, headers: Vec<(String, String)>) -> Response<Body> {
    let mut resp = Response::new(full(body.to_string()));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = resp.headers_mut();
    h.insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    for (k, v) in headers {
        if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(&v)) {
            h.append(k, v);
        }
    }
    resp
}

/// A `200` response of raw bytes with extra headers (`GET …/files/:file_path/raw`).
pub(crate) fn raw_response(bytes: Vec<u8>, headers: Vec<(String, String)>) -> Response<Body> {
    let mut resp = Response::new(full(bytes));
    let h = resp.headers_mut();
    h.insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    for (k, v) in headers {
        if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(&v)) {
            h.append(k, v);
        }
    }
    resp
}

/// A plain text response, as GitLab answers git clients; `www_authenticate` asks for Basic credentials.
pub(crate) fn text_response(status: u16, text: &str, www_authenticate: bool) -> Response<Body> {
    let mut resp = Response::new(full(text.to_owned()));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    if www_authenticate {
        resp.headers_mut().insert(hyper::header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"GitLab\""));
    }
    resp
}

/// The reason phrase of a status (`Bad Gateway`).
pub(crate) fn reason(status: u16) -> &'static str {
    StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("Error")
}
