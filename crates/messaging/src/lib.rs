//! The bidsflux bus.
//!
//! - [`subjects`]: every subject, stream, consumer and KV bucket name, defined once.
//! - [`topology`]: the JetStream objects, declared by the provisioner and
//!   required (checked) by every service at start.
//! - [`Bus`]: a connection that publishes protobuf events to JetStream, waits
//!   for the ack and carries the W3C trace context in headers ([`trace`]).
//! - [`consume`]: durable pull consumers with in-progress acks, retries with
//!   back-off and dead letters.

pub mod consume;
pub mod http;
pub mod manifest;
pub mod subjects;
pub mod topology;
pub mod trace;

mod bus;

pub use bus::{Bus, PublishError, now_unix_ms};
pub use consume::{ConsumerOptions, Delivery, HandlerError, run_consumer};

/// A token cancelled on SIGINT or SIGTERM (for service `main`s).
pub fn shutdown_on_signals() -> tokio_util::sync::CancellationToken {
    let token = tokio_util::sync::CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
        tracing::info!("shutdown requested");
        t.cancel();
    });
    token
}
