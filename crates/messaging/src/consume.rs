//! Durable pull consumers.
//!
//! [`run_consumer`] pulls from a durable consumer until `shutdown` is
//! cancelled. Each message is handled in a span whose parent is the trace
//! context from the message headers. While the handler runs, in-progress acks
//! keep JetStream from redelivering it. Outcomes:
//!
//! - `Ok(())` → acked (and the ack confirmed by the server);
//! - [`HandlerError::Transient`] → negatively acked with a back-off delay, and
//!   dead-lettered as `RETRIES_EXHAUSTED` after [`ConsumerOptions::max_attempts`];
//! - [`HandlerError::Permanent`] → dead-lettered, then terminated.
//!
//! A message is only acked/terminated after its dead letter is stored, so
//! nothing is lost if the dead-letter publish fails.

use std::future::Future;
use std::time::Duration;

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
    fn from(e: anyhow::Error) -> Self {
        Self::Transient(e)
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
    /// Attempts before a transient failure is dead-lettered.
    pub max_attempts: i64,
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
            max_attempts: 20,
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
        let messages = match consumer.messages().await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, consumer = opts.consumer, "cannot pull messages, retrying");
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
                    Err(e) => tracing::warn!(error = %e, "pull failed"),
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
    let (delivered, stream_sequence) = match msg.info() {
        Ok(i) => (i.delivered, i.stream_sequence),
        Err(_) => (1, 0),
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
                    tracing::warn!(error = %e, "ack not confirmed; the message may be redelivered");
                }
            }
            Err(HandlerError::Transient(e)) if delivery.delivered < opts.max_attempts => {
                let shift = (delivery.delivered - 1).clamp(0, 16) as u32;
                let delay = opts.backoff.saturating_mul(1 << shift).min(opts.max_backoff);
                tracing::warn!(error = %format!("{e:#}"), attempt = delivery.delivered, retry_in_ms = delay.as_millis() as u64, "handling failed, will retry");
                let _ = msg.ack_with(AckKind::Nak(Some(delay))).await;
            }
            Err(e) => {
                let (kind, reason) = match e {
                    HandlerError::Transient(e) => (pb::FailureKind::RetriesExhausted, format!("{e:#}")),
                    HandlerError::Permanent { kind, reason } => (kind, reason),
                };
                tracing::error!(error = %reason, kind = kind.as_str_name(), "giving up on message, dead-lettering it");
                match bus.dead_letter(dead(kind, reason)).await {
                    Ok(()) => {
                        let _ = msg.ack_with(AckKind::Term).await;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "dead letter not stored, message will be redelivered");
                        let _ = msg.ack_with(AckKind::Nak(Some(opts.backoff))).await;
                    }
                }
            }
        }
    }
    .instrument(span)
    .await;
}
