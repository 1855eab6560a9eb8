//! A tiny HTTP/1.1 listener every service uses for orchestrators and Prometheus: `GET /healthz`
//! (200 while running and connected to NATS, 503 otherwise) and `GET /metrics` (the service's
//! Prometheus text).
//!
//! Deliberately minimal (one request per connection, `Connection: close`, request head capped
//! at [`MAX_HEAD`], a few connections at once, each bounded in time): it serves scrapes and
//! probes, not browsers, and must cost nothing next to the service's real work.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::metrics::MetricsText;

/// What a service needs to do its work besides itself (for the bidsflux services: the NATS
/// connection), asked at each `/healthz`.
pub trait Ready: std::fmt::Debug + Send + Sync {
    /// Whether it is usable now.
    fn ready(&self) -> bool;
}

/// Largest request head read.
const MAX_HEAD: usize = 8 * 1024;
/// Connections handled at once; more are closed without an answer.
const MAX_CONNECTIONS: usize = 16;
/// Time a connection may take, from accept to the last byte of the answer.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// What the endpoints report on.
#[derive(Debug, Clone)]
pub struct Health {
    /// What the service depends on: healthy only while it is ready (the bus connection).
    pub ready: Arc<dyn Ready>,
    /// The service's metrics.
    pub metrics: Arc<dyn MetricsText>,
    /// The service's shutdown token: unhealthy once it is cancelled.
    pub shutdown: CancellationToken,
}

impl Health {
    /// Whether the service can do its work: running and its dependency ready.
    pub fn healthy(&self) -> bool {
        !self.shutdown.is_cancelled() && self.ready.ready()
    }
}

/// Serves `/healthz` and `/metrics` on `listener`, if there is one, as a task of `tasks` that
/// ends when `tasks` shuts down (after the service's other work: probes see it stopping, as
/// `/healthz` answers 503 from the moment the tasks are told to stop).
pub fn spawn(
    tasks: &crate::Tasks,
    listener: Option<TcpListener>,
    ready: Arc<dyn Ready>,
    metrics: Arc<dyn MetricsText>,
) {
    let Some(listener) = listener else { return };
    let health = Health { ready, metrics, shutdown: tasks.shutdown().clone() };
    match listener.local_addr() {
        Ok(addr) => tracing::info!(addr = %addr, "serving /healthz and /metrics"),
        Err(e) => warn!(error = %format!("{e:#}"), "http listener has no address"),
    }
    tasks.spawn_final("http listener", |stop| async move {
        serve(listener, health, stop).await;
        Ok(())
    });
}

/// Serves `/healthz` and `/metrics` on `listener` until `stop` is cancelled, then waits for the
/// connections being answered (each bounded by [`CONNECTION_TIMEOUT`]).
pub async fn serve(listener: TcpListener, health: Health, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let connections = tokio_util::task::TaskTracker::new();
    while let Some((socket, peer)) = crate::listen::accept(&listener, &stop).await {
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(peer = %peer, "too many http connections, closed");
            continue;
        };
        let health = health.clone();
        connections.spawn(async move {
            match tokio::time::timeout(CONNECTION_TIMEOUT, handle(socket, &health)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(peer = %peer, error = %format!("{e:#}"), "http connection failed"),
                Err(_) => debug!(peer = %peer, "http connection timed out"),
            }
            drop(slot);
        });
    }
    connections.close();
    connections.wait().await;
}

async fn handle(mut socket: TcpStream, health: &Health) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0_u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
        let n = socket.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(buf.get(..n).unwrap_or_default());
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let path = target.split('?').next().unwrap_or_default();
    let (status, content_type, body) = match (method, path) {
        ("GET" | "HEAD", "/healthz") if health.healthy() => ("200 OK", "text/plain", "ok\n".to_owned()),
        ("GET" | "HEAD", "/healthz") => ("503 Service Unavailable", "text/plain", "unavailable\n".to_owned()),
        ("GET" | "HEAD", "/metrics") => ("200 OK", "text/plain; version=0.0.4", health.metrics.render()),
        ("GET" | "HEAD", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        _ => ("405 Method Not Allowed", "text/plain", "method not allowed\n".to_owned()),
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        response.push_str(&body);
    }
    socket.write_all(response.as_bytes()).await?;
    socket.shutdown().await
}

/// The container healthcheck, `bidsflux-<service> health`: `GET /healthz` on the service's own
/// listener at `bind` (an unspecified address is probed on loopback), within `timeout`. `Ok`
/// when the service answers 200; the error says what failed (docker keeps it in `docker
/// inspect`'s health log). Blocking and dependency-free: the images have no curl or wget.
pub fn probe(bind: std::net::SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    use std::io::{Read as _, Write as _};
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

    let ip = match bind.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let addr = SocketAddr::new(ip, bind.port());
    let mut socket =
        std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| anyhow::anyhow!("connect to {addr}: {e}"))?;
    socket.set_read_timeout(Some(timeout))?;
    socket.set_write_timeout(Some(timeout))?;
    socket.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut answer = Vec::with_capacity(256);
    socket.take(MAX_HEAD as u64).read_to_end(&mut answer).map_err(|e| anyhow::anyhow!("read from {addr}: {e}"))?;
    let answer = String::from_utf8_lossy(&answer);
    let status = answer.lines().next().unwrap_or_default();
    match status.split_whitespace().nth(1) {
        Some("200") => Ok(()),
        _ if status.is_empty() => anyhow::bail!("{addr} closed the connection without an answer"),
        _ => anyhow::bail!("{addr}/healthz answered {status:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Flag(std::sync::atomic::AtomicBool);
    impl Ready for Flag {
        fn ready(&self) -> bool {
            self.0.load(std::sync::atomic::Ordering::SeqCst)
        }
    }
    #[derive(Debug)]
    struct NoMetrics;
    impl MetricsText for NoMetrics {
        fn render(&self) -> String {
            String::new()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_probe_follows_healthz_and_fails_on_a_closed_port() {
        let listener = TcpListener::bind("0.0.0.0:0").await.unwrap();
        let bind = listener.local_addr().unwrap();
        let flag = Arc::new(Flag(std::sync::atomic::AtomicBool::new(true)));
        let stop = CancellationToken::new();
        let health = Health { ready: flag.clone(), metrics: Arc::new(NoMetrics), shutdown: stop.clone() };
        let server = tokio::spawn(serve(listener, health, stop.clone()));
        let probe_now = move || tokio::task::spawn_blocking(move || probe(bind, Duration::from_secs(2)));

        probe_now().await.unwrap().unwrap();
        flag.0.store(false, std::sync::atomic::Ordering::SeqCst);
        let err = probe_now().await.unwrap().unwrap_err();
        assert!(format!("{err:#}").contains("503"), "{err:#}");
        stop.cancel();
        server.await.unwrap();
        let err = probe_now().await.unwrap().unwrap_err();
        assert!(format!("{err:#}").contains("connect to 127.0.0.1"), "{err:#}");
    }
}
