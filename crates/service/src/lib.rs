//! What every bidsflux service starts with, defined once.
//!
//! - [`listen`]: binds a listener whose address came from a variable, waiting a few seconds
//!   while a predecessor still holds the port (`AddrInUse`);
//! - [`http`]: the small listener for orchestrators and Prometheus, `GET /healthz` and
//!   `GET /metrics`;
//! - [`metrics`]: the Prometheus text format, written by [`metrics::Exposition`], and the one
//!   [`metrics::Histogram`];
//! - [`backoff`]: the one retry delay policy, [`backoff::Backoff`];
//! - [`tasks`]: tracked background tasks and a graceful shutdown ([`tasks::Tasks`]), and the
//!   token cancelled on SIGINT or SIGTERM ([`tasks::shutdown_on_signals`]);
//! - [`workdir`]: a process's own scratch directory in a shared work directory, and the removal
//!   of what killed processes left there ([`WorkDir`]).
//!
//! This crate knows nothing of the bus: [`http::Ready`] is how a service tells the health
//! check what it depends on (`bidsflux-messaging` implements it for its `Bus`).

pub mod backoff;
pub mod http;
pub mod listen;
pub mod metrics;
pub mod tasks;
pub mod workdir;

pub use backoff::Backoff;
pub use tasks::{Tasks, shutdown_on_signals};
pub use workdir::WorkDir;
