//! The REST API v4 under `/api/v4/`: reading a request (parameters, token),
//! routing it ([`dispatch`]), and sending the reply (paginated lists). One
//! module per resource, each an `impl State` block with its handlers and its
//! JSON: [`users`], [`keys`], [`tokens`], [`groups`], [`projects`],
//! [`members`], [`variables`], [`branches`], [`protected_branches`],
//! [`files`] (commits and files), [`runners`]; and [`pagination`].
//!
//! Authentication: `PRIVATE-TOKEN: <token>`, `Authorization: Bearer <token>`
//! or `private_token=`; otherwise `401 {"message":"401 Unauthorized"}`. A
//! token needs the scope `api`, or `read_api` for GET.

mod branches;
mod dispatch;
mod files;
mod groups;
mod keys;
mod members;
mod pagination;
mod projects;
mod protected_branches;
mod runners;
pub(crate) mod tokens;
mod users;
mod variables;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};

use crate::params::{ParamError, Params, decode};
use crate::replies::{ApiErr, Body, Reply, full, json_response, raw_response};
use crate::shared::{Shared, lock};
use dispatch::Route;
use pagination::paginate;

/// A rejected parameter is GitLab's `{"error": ...}` reply.
impl From<ParamError> for ApiErr {
    fn from(e: ParamError) -> Self {
        ApiErr::error(e.status, e.error)
    }
}

/// Serves a request whose path is `path`, `rest` being what follows `/api/v4/`.
pub(crate) async fn handle(
    shared: &Shared,
    req: Request<Incoming>,
    method: &str,
    rest: &str,
    path: &str,
    query: Option<&str>,
) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let bytes = match Limited::new(body, 64 << 20).collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => return json_response(400, &json!({"error": "the request body could not be read"}), Vec::new()),
    };
    let content_type = parts.headers.get(hyper::header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let params = match Params::parse(query, content_type, &bytes) {
        Ok(p) => p,
        Err(e) => {
            let e = ApiErr::from(e);
            return json_response(e.status, &e.body, Vec::new());
        }
    };
    let token = parts
        .headers
        .get("private-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| {
            let v = parts.headers.get(hyper::header::AUTHORIZATION)?.to_str().ok()?;
            let (scheme, t) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| t.trim().to_owned())
        })
        .or_else(|| params.str("private_token"));
    let segs: Vec<String> = rest.split('/').filter(|s| !s.is_empty()).map(decode).collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let env = shared.env();
    let result = {
        let mut st = lock(&shared.state);
        let auth = st.authenticate(token.as_deref(), method);
        match Route::parse(method, &segs) {
            Some(route) => route.apply(&mut st, &env, &auth, method, &params),
            None => Err(ApiErr::route()),
        }
    };
    match result {
        Ok(Reply::Json(status, v)) => json_response(status, &v, Vec::new()),
        Ok(Reply::Empty) => {
            let mut resp = Response::new(full(Bytes::new()));
            *resp.status_mut() = StatusCode::NO_CONTENT;
            resp
        }
        Ok(Reply::Raw(bytes, headers)) => raw_response(bytes, headers),
        Ok(Reply::List(items)) => {
            let (page, headers) = paginate(items, &params, &format!("{}{path}", shared.url), query);
            json_response(200, &Value::Array(page), headers)
        }
        Err(e) => json_response(e.status, &e.body, Vec::new()),
    }
}
