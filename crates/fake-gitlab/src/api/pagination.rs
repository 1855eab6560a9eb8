//! Pagination of lists like GitLab's: offset pagination (`page`, `per_page`
//! default 20 and at most 100; `X-Total`, `X-Total-Pages`, `X-Page`,
//! `X-Per-Page`, `X-Next-Page`, `X-Prev-Page`; `Link` with
//! `prev`/`next`/`first`/`last` on the server's own URL), and keyset
//! pagination with `pagination=keyset` (only a `Link` `rel="next"` with an
//! opaque `cursor`: a position in the sorted list, not a key).

use base64::Engine as _;
use serde_json::Value;

use crate::params::Params;

/// Offset or keyset pagination of a full list, with GitLab's headers.
pub(crate) fn paginate(
    items: Vec<Value>,
    params: &Params,
    self_url: &str,
    query: Option<&str>,
) -> (Vec<Value>, Vec<(String, String)>) {
    let per_page =
        params.str("per_page").and_then(|s| s.parse::<usize>().ok()).filter(|n| *n > 0).unwrap_or(20).min(100);
    let link = |replace: &[(&str, String)]| {
        let drop: Vec<&str> = replace.iter().map(|(k, _)| *k).collect();
        let mut ser = form_urlencoded::Serializer::new(String::new());
        for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            if !drop.contains(&k.as_ref()) {
                ser.append_pair(&k, &v);
            }
        }
        for (k, v) in replace {
            ser.append_pair(k, v);
        }
        format!("{self_url}?{}", ser.finish())
    };
    let total = items.len();
    if params.str("pagination").as_deref() == Some("keyset") {
        let start = params
            .str("cursor")
            .and_then(|c| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(c).ok())
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.strip_prefix("offset:").and_then(|n| n.parse::<usize>().ok()))
            .unwrap_or(0);
        let page: Vec<Value> = items.into_iter().skip(start).take(per_page).collect();
        let mut headers = Vec::new();
        let next = start + page.len();
        if next < total {
            let cursor = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("offset:{next}"));
            headers.push(("Link".to_owned(), format!("<{}>; rel=\"next\"", link(&[("cursor", cursor)]))));
        }
        return (page, headers);
    }
    let page_no = params.str("page").and_then(|s| s.parse::<usize>().ok()).filter(|n| *n > 0).unwrap_or(1);
    let total_pages = total.div_ceil(per_page).max(1);
    let page: Vec<Value> = items.into_iter().skip((page_no - 1).saturating_mul(per_page)).take(per_page).collect();
    let next = (page_no < total_pages).then_some(page_no + 1);
    let prev = (page_no > 1).then(|| (page_no - 1).min(total_pages));
    let at = |n: usize| link(&[("page", n.to_string()), ("per_page", per_page.to_string())]);
    let mut links = Vec::new();
    if let Some(p) = prev {
        links.push(format!("<{}>; rel=\"prev\"", at(p)));
    }
    if let Some(n) = next {
        links.push(format!("<{}>; rel=\"next\"", at(n)));
    }
    links.push(format!("<{}>; rel=\"first\"", at(1)));
    links.push(format!("<{}>; rel=\"last\"", at(total_pages)));
    let opt = |o: Option<usize>| o.map(|n| n.to_string()).unwrap_or_default();
    let headers = vec![
        ("X-Page".to_owned(), page_no.to_string()),
        ("X-Per-Page".to_owned(), per_page.to_string()),
        ("X-Total".to_owned(), total.to_string()),
        ("X-Total-Pages".to_owned(), total_pages.to_string()),
        ("X-Next-Page".to_owned(), opt(next)),
        ("X-Prev-Page".to_owned(), opt(prev)),
        ("Link".to_owned(), links.join(", ")),
    ];
    (page, headers)
}
