//! W3C trace context in NATS headers.
//!
//! The publisher injects the current span's context (`traceparent`,
//! `tracestate`); the consumer extracts it and makes it the parent of the
//! span that handles the message, so one study is one trace across services.

use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

/// Writes the context of `span` into `headers`.
pub fn inject_span(span: &tracing::Span, headers: &mut HeaderMap) {
    inject_context(&span.context(), headers);
}

/// Writes `cx` into `headers`.
pub fn inject_context(cx: &opentelemetry::Context, headers: &mut HeaderMap) {
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(cx, &mut HeaderInjector(headers)));
}

/// Reads a context from `headers` (an empty context when there is none).
pub fn extract(headers: Option<&HeaderMap>) -> opentelemetry::Context {
    match headers {
        Some(h) => opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(h))),
        None => opentelemetry::Context::new(),
    }
}

/// The `traceparent` of the current span, if it is sampled (for storing, e.g. in KV state).
pub fn current_traceparent() -> Option<String> {
    let mut h = HeaderMap::new();
    inject_span(&tracing::Span::current(), &mut h);
    h.get("traceparent").map(|v| v.as_str().to_owned())
}

/// A context from a stored `traceparent`.
pub fn context_from_traceparent(traceparent: &str) -> opentelemetry::Context {
    let mut h = HeaderMap::new();
    h.insert("traceparent", traceparent);
    extract(Some(&h))
}

/// The trace id (32 hex digits) in a `traceparent` header value.
pub fn trace_id_of(traceparent: &str) -> Option<&str> {
    traceparent.split('-').nth(1)
}
