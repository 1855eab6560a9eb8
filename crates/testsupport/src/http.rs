//! The accept loop of the HTTP test servers (the S3 server here, the fake GitLab of
//! `bidsflux-fake-gitlab`).

use std::error::Error as StdError;

use hyper::body::{Body, Incoming};
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

type BoxError = Box<dyn StdError + Send + Sync>;

/// Serves HTTP/1 and HTTP/2 connections from `listener` with `service` until the task is
/// aborted; connections run concurrently, finished ones are reaped as new ones arrive.
/// Accept errors are skipped. Public for the fake GitLab (`bidsflux-fake-gitlab`).
pub async fn serve<S, B>(listener: TcpListener, service: S)
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let http = ConnBuilder::new(TokioExecutor::new());
    let mut conns = JoinSet::new();
    loop {
        let Ok((socket, _)) = listener.accept().await else { continue };
        let conn = http.serve_connection(TokioIo::new(socket), service.clone()).into_owned();
        conns.spawn(async move {
            let _ = conn.await;
        });
        while conns.try_join_next().is_some() {}
    }
}
