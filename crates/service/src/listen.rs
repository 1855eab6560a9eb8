//! Listeners bound from a configured address.
//!
//! The address itself is parsed with `bidsflux_config::Env::listen_addr_or` (`off`, in any
//! case, turns the listener off); this module binds it. A restarted container or a rolling
//! update can start the new process while the old one still holds the port for a moment, so
//! `AddrInUse` is retried for [`ADDR_IN_USE_WAIT`] before the start fails.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;

/// How long a port held by another process is waited for.
pub const ADDR_IN_USE_WAIT: Duration = Duration::from_secs(5);

/// Binds `addr`, configured by the variable `var` (named in the error), retrying while the
/// port is in use for up to [`ADDR_IN_USE_WAIT`].
pub async fn bind(addr: SocketAddr, var: &str) -> anyhow::Result<TcpListener> {
    let deadline = tokio::time::Instant::now() + ADDR_IN_USE_WAIT;
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(anyhow::anyhow!("listen on {addr} ({var}): {e}")),
        }
    }
}

/// [`bind`] for a listener that may be turned off (`None`).
pub async fn bind_optional(addr: Option<SocketAddr>, var: &str) -> anyhow::Result<Option<TcpListener>> {
    match addr {
        Some(addr) => bind(addr, var).await.map(Some),
        None => Ok(None),
    }
}

/// The next connection on `listener`, or `None` once `stop` is cancelled. A failed accept
/// (usually no file descriptor left) is logged and retried after a pause instead of spinning.
pub async fn accept(
    listener: &TcpListener,
    stop: &tokio_util::sync::CancellationToken,
) -> Option<(tokio::net::TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return None,
            accepted = listener.accept() => match accepted {
                Ok(a) => return Some(a),
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "failed to accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_port_in_use_is_waited_for_then_refused_with_the_variable() {
        let held = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = held.local_addr().unwrap();
        // Released while bind waits: bound.
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            drop(held);
        });
        let l = bind(addr, "X_BIND").await.unwrap();
        assert_eq!(l.local_addr().unwrap(), addr);
        release.await.unwrap();
        // Never released: refused after the wait, naming the variable.
        tokio::time::pause();
        let e = bind(addr, "X_BIND").await.unwrap_err().to_string();
        assert!(e.contains("X_BIND") && e.contains(&addr.to_string()), "{e}");
        assert!(bind_optional(None, "X_BIND").await.unwrap().is_none());
    }
}
