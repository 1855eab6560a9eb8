//! Real servers for tests (and for `make dev`), started on free loopback
//! ports and cleaned up on drop, and the helpers tests share:
//!
//! - [`NatsServer`] (`nats`): Debian's `nats-server` with JetStream in a temp
//!   dir, stoppable and restartable on the same port (outage tests);
//! - [`S3Server`] (`s3`): an embedded S3 server (`s3s-fs`: objects are files
//!   under a directory), with signature checking;
//! - [`serve`] (`http`): the accept loop of the HTTP test servers (the S3
//!   server here, the fake GitLab of `bidsflux-fake-gitlab`);
//! - [`dicom`]: a synthetic MR study generator and Part 10 helpers (also the
//!   `bidsflux-synth-study` binary);
//! - [`pki`]: test certificates made with `openssl`;
//! - [`site`]: the whole site as separate processes (the services' binaries, killed and
//!   restarted at will), for the fault tests;
//! - [`scrape`]: a service's `/healthz` and `/metrics`, as a probe and Prometheus ask them;
//! - [`free_port`], [`wait_until`] (polling with a deadline instead of
//!   sleeps) and [`have_program`].
//!
//! The fake GitLab is not here: it is the `bidsflux-fake-gitlab` crate, kept
//! out of the `make dev` binary, which uses this crate.

pub mod dicom;
mod http;
mod nats;
pub mod pki;
mod s3;
pub mod scrape;
pub mod site;

use std::future::Future;
use std::time::Duration;

pub use http::serve;
pub use nats::NatsServer;
pub use s3::S3Server;

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Polls `check` every 50 ms until it returns `Some`, or fails after `timeout`
/// with `what` in the message.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether a program is on PATH (tests skip loudly, never silently pass, when a tool is absent: see callers).
pub fn have_program(name: &str) -> bool {
    std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file())).unwrap_or(false)
}
