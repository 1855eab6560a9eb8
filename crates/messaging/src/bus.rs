//! A connection to the bus.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, context::PublishAckFuture};
use async_nats::{HeaderMap, ServerAddr};
use bidsflux_proto::v1 as pb;
use prost::Message;

use crate::subjects;
use crate::topology::{self, Requirement, TopologyError};

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Why an event was not stored by JetStream.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The server did not accept the message (it is not stored).
    #[error("publish to {subject} was not sent: {source}")]
    Send {
        /// Subject.
        subject: String,
        /// Cause.
        source: async_nats::jetstream::context::PublishError,
    },
    /// No ack came back in time (the message may or may not be stored; resend with the same id).
    #[error("publish to {subject} was not acknowledged: {source}")]
    Ack {
        /// Subject.
        subject: String,
        /// Cause.
        source: async_nats::jetstream::context::PublishError,
    },
}

/// A connection to NATS with its JetStream context.
#[derive(Debug, Clone)]
pub struct Bus {
    /// The core NATS client.
    pub client: async_nats::Client,
    /// The JetStream context (acks time out after [`Bus::ACK_TIMEOUT`]).
    pub js: jetstream::Context,
    /// Name of the service, used for dead letters and the connection name.
    service: String,
}

impl bidsflux_service::http::Ready for Bus {
    /// Healthy only while the NATS connection is up.
    fn ready(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }
}

impl Bus {
    /// How long a publish waits for JetStream's ack.
    pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);

    /// Connects to `url`, retrying for up to `wait` if the server is not up yet.
    ///
    /// Once connected, the client reconnects by itself for ever; publishes
    /// during an outage fail with [`PublishError`] after the ack timeout.
    pub async fn connect(url: &str, service: &str, wait: Duration) -> anyhow::Result<Self> {
        let addrs: Vec<ServerAddr> = url
            .split(',')
            .map(|u| u.trim().parse::<ServerAddr>())
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("NATS_URL {url:?} is not a NATS URL: {e}"))?;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let opts = async_nats::ConnectOptions::new()
                .name(service)
                .connection_timeout(Duration::from_secs(5))
                .max_reconnects(None::<usize>);
            match opts.connect(addrs.clone()).await {
                Ok(client) => {
                    let mut js = jetstream::new(client.clone());
                    js.set_timeout(Self::ACK_TIMEOUT);
                    return Ok(Self { client, js, service: service.to_owned() });
                }
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::warn!(error = %format!("{e:#}"), "nats not reachable yet, retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(anyhow::anyhow!("connect to NATS at {url}: {e}")),
            }
        }
    }

    /// The service this connection belongs to.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Fails with a clear message unless the JetStream objects this service needs exist.
    pub async fn require(&self, needs: &[Requirement]) -> Result<(), TopologyError> {
        topology::require(&self.js, needs).await
    }

    /// Publishes `msg` on `subject` with the current span's trace context and
    /// waits until JetStream has stored it. `msg_id` de-duplicates resends
    /// within the stream's duplicate window.
    pub async fn publish<M: Message>(&self, subject: &str, msg: &M, msg_id: Option<&str>) -> Result<(), PublishError> {
        self.publish_in(&tracing::Span::current().context_otel(), subject, msg, msg_id).await
    }

    /// Like [`Bus::publish`], with an explicit trace context.
    pub async fn publish_in<M: Message>(
        &self,
        cx: &opentelemetry::Context,
        subject: &str,
        msg: &M,
        msg_id: Option<&str>,
    ) -> Result<(), PublishError> {
        let mut headers = HeaderMap::new();
        crate::trace::inject_context(cx, &mut headers);
        if let Some(id) = msg_id {
            headers.insert(async_nats::header::NATS_MESSAGE_ID, id);
        }
        let fut: PublishAckFuture = self
            .js
            .publish_with_headers(subject.to_owned(), headers, msg.encode_to_vec().into())
            .await
            .map_err(|source| PublishError::Send { subject: subject.to_owned(), source })?;
        fut.await.map_err(|source| PublishError::Ack { subject: subject.to_owned(), source })?;
        Ok(())
    }

    /// Stores a dead letter for this service.
    pub async fn dead_letter(&self, letter: pb::DeadLetter) -> Result<(), PublishError> {
        let subject = subjects::deadletter(&self.service);
        self.publish(&subject, &letter, None).await
    }
}

trait SpanContextExt {
    fn context_otel(&self) -> opentelemetry::Context;
}

impl SpanContextExt for tracing::Span {
    fn context_otel(&self) -> opentelemetry::Context {
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;
        self.context()
    }
}
