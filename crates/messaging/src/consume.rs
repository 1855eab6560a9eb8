//! Durable pull consumers.
//!
//! [`run_consumer`] pulls from a durable consumer until `shutdown` is
//! cancelled. Each message is handled in a span whose parent is the trace
//! context from the message headers. While the handler runs, in-progress acks
//! keep JetStream from redelivering it. Outcomes:
//!
//! - `Ok(())` → acked (and the ack confirmed by the server);
//! - [`HandlerError::Transient`] → negatively acked with a back-off delay, and
//!   dead-lettered as `RETRIES_EXHAUSTED` once the message is older than
//!   [`ConsumerOptions::max_retry_age`] (or, if set, after
//!   [`ConsumerOptions::max_attempts`] deliveries), so an outage shorter than
//!   that heals by itself;
//! - [`HandlerError::Permanent`] → dead-lettered, then terminated.
//!
//! A message is only acked/terminated after its dead letter is stored, so
//! nothing is lost if the dead-letter publish fails.

use std::future::Future;
use std::time::{Duration, SystemTime};

use async_nats::HeaderMap;
use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::PullConsumer;
use bidsflux_proto::v1 as pb;
use bytes::Bytes;
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::bus::{Bus, now_unix_ms};

/// What a handler reports.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Worth retrying later (network, server unavailable, busy).
    #[error("{0:#}")]
    Transient(anyhow::Error),
    /// Retrying will not help; the message is dead-lettered.
    #[error("{reason}")]
    Permanent {
        /// Kind of failure.
        kind: pb::FailureKind,
        /// What went wrong, without patient values.
        reason: String,
    },
}

impl HandlerError {
    /// A malformed message.
    pub fn malformed(reason: impl Into<String>) -> Self {
        Self::Permanent { kind: pb::FailureKind::Malformed, reason: reason.into() }
    }
    /// Valid data that cannot be processed as configured.
    pub fn invalid(reason: impl Into<String>) -> Self {
        Self::Permanent { kind: pb::FailureKind::InvalidInput, reason: reason.into() }
    }
    /// A downstream refusal that will not heal.
    pub fn permanent(reason: impl Into<String>) -> Self {
        Self::Permanent { kind: pb::FailureKind::Permanent, reason: reason.into() }
    }
}

impl From<anyhow::Error> for HandlerError {
    /// An error nobody classified is taken as transient: retried until the message is too old.
    fn from(e: anyhow::Error) -> Self {
        Self::Transient(e)
    }
}

/// What a consumer does with an error: retry the message, or dead-letter it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Worth retrying later (network, a server unavailable or busy, a disk error).
    Transient,
    /// Retrying will not help: dead-lettered with this kind.
    Permanent(pb::FailureKind),
}

/// An error that knows its [`ErrorClass`], so a handler turns it into a [`HandlerError`] with
/// `?` (quickwit's `error_code()` idea). Each error type classifies itself once, next to its
/// definition, instead of each handler matching its variants by hand
/// (`docs/error-handling.md`).
pub trait Classify: std::error::Error + Send + Sync + 'static {
    /// Whether this error is transient or permanent, and of which kind.
    fn class(&self) -> ErrorClass;
}

impl<E: Classify> From<E> for HandlerError {
    /// Transient errors keep their chain of causes; a permanent one becomes its message, which
    /// is the dead letter's reason (so it must not carry patient values).
    fn from(e: E) -> Self {
        match e.class() {
            ErrorClass::Transient => Self::Transient(anyhow::Error::new(e)),
            ErrorClass::Permanent(kind) => Self::Permanent { kind, reason: e.to_string() },
        }
    }
}

impl HandlerError {
    /// Adds `what` (a verb phrase: "read spool") to a transient error's chain; a permanent
    /// error's reason stays as it is.
    pub fn context(self, what: &'static str) -> Self {
        match self {
            Self::Transient(e) => Self::Transient(e.context(what)),
            permanent => permanent,
        }
    }
}

/// One delivered message.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Subject it was published on.
    pub subject: String,
    /// Payload (protobuf).
    pub payload: Bytes,
    /// Headers (trace context, message id).
    pub headers: Option<HeaderMap>,
    /// 1 on first delivery.
    pub delivered: i64,
    /// Stream sequence.
    pub stream_sequence: u64,
}

impl Delivery {
    /// Decodes the payload, mapping failure to a permanent `MALFORMED` error.
    pub fn decode<M: prost::Message + Default>(&self) -> Result<M, HandlerError> {
        M::decode(self.payload.as_ref())
            .map_err(|e| HandlerError::malformed(format!("cannot decode message on {}: {e}", self.subject)))
    }
}

/// Tuning of a consumer loop.
#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    /// Stream name.
    pub stream: &'static str,
    /// Durable consumer name.
    pub consumer: &'static str,
    /// Messages handled at once.
    pub concurrency: usize,
    /// Messages one pull request asks for (default 200, async-nats'). Consumers
    /// of long jobs shared by replicas set it to `concurrency`: a replica then
    /// holds only what it works on, the others get the rest, and no buffered
    /// message waits out its `ack_wait` unacknowledged (to be redelivered
    /// elsewhere while still queued here).
    pub pull_batch: usize,
    /// A transient failure is retried until the message is this old (counted
    /// from when JetStream stored it), then dead-lettered. Long enough to ride
    /// out a maintenance window of a downstream service.
    pub max_retry_age: Duration,
    /// Optional extra cap: deliveries after which a transient failure is
    /// dead-lettered even if the message is younger than `max_retry_age`.
    pub max_attempts: Option<i64>,
    /// Retries are logged at `warn` for the first `warn_every` attempts, then
    /// only every `warn_every`-th attempt (the others at `debug`), so a long
    /// outage does not flood the logs.
    pub warn_every: i64,
    /// Interval of in-progress acks (keep below the consumer's `ack_wait`).
    pub progress_every: Duration,
    /// First retry delay; doubles per attempt up to `max_backoff`.
    pub backoff: Duration,
    /// Largest retry delay.
    pub max_backoff: Duration,
}

impl ConsumerOptions {
    /// Defaults for a consumer.
    pub fn new(stream: &'static str, consumer: &'static str) -> Self {
        Self {
            stream,
            consumer,
            concurrency: 1,
            pull_batch: 200,
            max_retry_age: Duration::from_secs(24 * 3600),
            max_attempts: None,
            warn_every: 10,
            progress_every: Duration::from_secs(10),
            backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(60),
        }
    }
}

/// Study UID used in dead letters, if the handler can tell it.
pub type StudyOf = fn(&Delivery) -> Option<String>;

/// Pulls and handles messages until `shutdown`; returns an error only if the
/// consumer cannot be reached at start.
pub async fn run_consumer<F, Fut>(
    bus: Bus,
    opts: ConsumerOptions,
    shutdown: CancellationToken,
    study_of: StudyOf,
    handler: F,
) -> anyhow::Result<()>
where
    F: Fn(Delivery) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
{
    let stream =
        bus.js.get_stream(opts.stream).await.map_err(|e| anyhow::anyhow!("get stream {}: {e}", opts.stream))?;
    let consumer: PullConsumer = stream
        .get_consumer(opts.consumer)
        .await
        .map_err(|e| anyhow::anyhow!("get consumer {} on {}: {e}", opts.consumer, opts.stream))?;
    tracing::info!(stream = opts.stream, consumer = opts.consumer, "consuming");
    while !shutdown.is_cancelled() {
        let pull = consumer
            .stream()
            .max_messages_per_batch(opts.pull_batch.max(1))
            .heartbeat(Duration::from_secs(15))
            .messages();
        let messages = match pull.await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), consumer = opts.consumer, "cannot pull messages, retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        let work = messages.take_until(shutdown.cancelled()).for_each_concurrent(opts.concurrency.max(1), |m| {
            let bus = bus.clone();
            let opts = opts.clone();
            let handler = handler.clone();
            async move {
                match m {
                    Ok(msg) => handle_one(&bus, &opts, study_of, &handler, msg).await,
                    Err(e) => tracing::warn!(error = %format!("{e:#}"), "pull failed"),
                }
            }
        });
        work.await;
        if !shutdown.is_cancelled() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    tracing::info!(consumer = opts.consumer, "consumer stopped");
    Ok(())
}

async fn handle_one<F, Fut>(
    bus: &Bus,
    opts: &ConsumerOptions,
    study_of: StudyOf,
    handler: &F,
    msg: async_nats::jetstream::Message,
) where
    F: Fn(Delivery) -> Fut,
    Fut: Future<Output = Result<(), HandlerError>>,
{
    let (delivered, stream_sequence, published) = match msg.info() {
        Ok(i) => (i.delivered, i.stream_sequence, Some(SystemTime::from(i.published))),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "message without JetStream metadata; attempts and age unknown");
            (1, 0, None)
        }
    };
    let delivery = Delivery {
        subject: msg.subject.to_string(),
        payload: msg.payload.clone(),
        headers: msg.headers.clone(),
        delivered,
        stream_sequence,
    };
    let span = tracing::info_span!("consume", subject = %delivery.subject, stream_sequence, delivered);
    let _ = span.set_parent(crate::trace::extract(delivery.headers.as_ref()));
    async {
        let fut = handler(delivery.clone());
        tokio::pin!(fut);
        let mut tick = tokio::time::interval(opts.progress_every);
        tick.tick().await;
        let result = loop {
            tokio::select! {
                r = &mut fut => break r,
                _ = tick.tick() => { let _ = msg.ack_with(AckKind::Progress).await; }
            }
        };
        let dead = |kind: pb::FailureKind, reason: String| pb::DeadLetter {
            service: bus.service().to_owned(),
            subject: delivery.subject.clone(),
            payload: delivery.payload.to_vec(),
            kind: kind as i32,
            reason,
            study_instance_uid: study_of(&delivery).unwrap_or_default(),
            deliveries: delivery.delivered.max(0) as u64,
            at_unix_ms: now_unix_ms(),
        };
        match result {
            Ok(()) => {
                if let Err(e) = msg.double_ack().await {
                    tracing::warn!(error = %format!("{e:#}"), "ack not confirmed; the message may be redelivered");
                }
            }
            Err(HandlerError::Transient(e))
                if let Retry::After { delay, warn } = retry_decision(opts, delivery.delivered, age(published)) =>
            {
                let attempt = delivery.delivered;
                let retry_in_ms = delay.as_millis() as u64;
                if warn {
                    tracing::warn!(error = %format!("{e:#}"), attempt, retry_in_ms, "handling failed, will retry");
                } else {
                    tracing::debug!(error = %format!("{e:#}"), attempt, retry_in_ms, "handling failed, will retry");
                }
                let _ = msg.ack_with(AckKind::Nak(Some(delay))).await;
            }
            Err(e) => {
                let (kind, reason) = match e {
                    HandlerError::Transient(e) => {
                        let age_s = age(published).unwrap_or_default().as_secs();
                        let attempts = delivery.delivered;
                        let reason = format!("{e:#} (still failing after {attempts} attempts over {age_s} s)");
                        (pb::FailureKind::RetriesExhausted, reason)
                    }
                    HandlerError::Permanent { kind, reason } => (kind, reason),
                };
                tracing::error!(error = %reason, kind = kind.as_str_name(), "giving up on message, dead-lettering it");
                match bus.dead_letter(dead(kind, reason)).await {
                    Ok(()) => {
                        let _ = msg.ack_with(AckKind::Term).await;
                    }
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "dead letter not stored, message will be redelivered");
                        let _ = msg.ack_with(AckKind::Nak(Some(opts.backoff))).await;
                    }
                }
            }
        }
    }
    .instrument(span)
    .await;
}

/// What to do with a transiently failed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Negatively acknowledge it for redelivery after `delay`; `warn` says whether to log at warn level.
    After { delay: Duration, warn: bool },
    /// The retry budget is spent: dead-letter it.
    GiveUp,
}

/// How long ago JetStream stored the message (zero if the clocks disagree).
fn age(published: Option<SystemTime>) -> Option<Duration> {
    published.map(|p| SystemTime::now().duration_since(p).unwrap_or_default())
}

/// The retry policy: give up once the message is older than `max_retry_age`
/// (an unknown age never expires) or after `max_attempts` deliveries if set;
/// otherwise back off exponentially up to `max_backoff`.
fn retry_decision(opts: &ConsumerOptions, delivered: i64, age: Option<Duration>) -> Retry {
    let too_old = age.is_some_and(|a| a >= opts.max_retry_age);
    let too_many = opts.max_attempts.is_some_and(|max| delivered >= max);
    if too_old || too_many {
        return Retry::GiveUp;
    }
    let attempt = u32::try_from(delivered.max(1)).unwrap_or(u32::MAX);
    let delay = bidsflux_service::Backoff::doubling(opts.backoff, opts.max_backoff).delay(attempt);
    let every = opts.warn_every.max(1);
    Retry::After { delay, warn: delivered <= every || delivered % every == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> ConsumerOptions {
        ConsumerOptions::new("S", "c")
    }

    #[test]
    fn transient_failures_are_retried_until_the_message_is_too_old() {
        let o = opts();
        let hour = Duration::from_secs(3600);
        // A long outage: many attempts, still retried while younger than a day, back-off capped.
        assert_eq!(retry_decision(&o, 1, Some(Duration::ZERO)), Retry::After { delay: o.backoff, warn: true });
        assert_eq!(retry_decision(&o, 500, Some(8 * hour)), Retry::After { delay: o.max_backoff, warn: true });
        assert_eq!(retry_decision(&o, 501, Some(8 * hour)), Retry::After { delay: o.max_backoff, warn: false });
        assert_eq!(retry_decision(&o, 1000, None), Retry::After { delay: o.max_backoff, warn: true });
        assert_eq!(retry_decision(&o, 2, Some(24 * hour)), Retry::GiveUp);
    }

    #[test]
    fn attempts_cap_is_optional_and_warnings_thin_out() {
        let mut o = opts();
        o.max_attempts = Some(3);
        assert!(matches!(retry_decision(&o, 2, Some(Duration::ZERO)), Retry::After { .. }));
        assert_eq!(retry_decision(&o, 3, Some(Duration::ZERO)), Retry::GiveUp);
        let o = opts();
        let warned = (1..=100)
            .filter(|&n| matches!(retry_decision(&o, n, Some(Duration::ZERO)), Retry::After { warn: true, .. }));
        assert_eq!(warned.count(), 10 + 9);
    }
}
