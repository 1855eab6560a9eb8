//! The bidsflux bus.
//!
//! - [`subjects`]: every subject, stream, consumer and KV bucket name, defined once.
//! - [`topology`]: the JetStream objects, declared by the provisioner and
//!   required (checked) by every service at start.
//! - [`Bus`]: a connection that publishes protobuf events to JetStream, waits
//!   for the ack and carries the W3C trace context in headers ([`trace`]).
//! - [`consume`]: durable pull consumers with in-progress acks, retries with
//!   back-off and dead letters;
//! - [`manifest`]: archive manifests kept in the JetStream object store;
//! - [`trace`]: the W3C trace context in message headers;
//! - [`service_main`](mod@service_main): the `main` of every service on the bus.
//!
//! The health check of `bidsflux_service::http` asks the [`Bus`] whether its connection is up
//! (`impl Ready for Bus`).

pub mod consume;
pub mod manifest;
pub mod service_main;
pub mod subjects;
pub mod topology;
pub mod trace;

mod bus;

pub use bus::{Bus, PublishError, now_unix_ms};
pub use consume::{Classify, ConsumerOptions, Delivery, ErrorClass, HandlerError, run_consumer};
pub use service_main::{HealthProbe, service_main};
