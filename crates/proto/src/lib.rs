//! Wire types of the bidsflux bus, generated from `proto/bidsflux/v1/*.proto`, and the
//! study-completion admin API (`study_admin_client`, `study_admin_server` in [`v1`]).
//!
//! These are transport types: services convert them into validated domain
//! types at the edge and never pass them around as their model.

/// Version 1 of the bus contract (`bidsflux.v1.*` subjects) and of the admin API.
#[allow(
    missing_docs,
    clippy::all,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_debug_implementations
)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/bidsflux.v1.rs"));
}

pub use prost::Message;
