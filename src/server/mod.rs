//! Accepting connections: HTTP/1.1 and h2 on one port, timeouts hyper leaves off by default,
//! and a graceful drain on shutdown.
//!
//! ```text
//! listen(backlog) ─► accept ─► nodelay ─► auto (h1|h2) conn ─► service per request
//!        shutdown ─► stop accepting ─► conns finish in-flight requests ─► (grace) ─► close
//! ```

pub mod catch_panic;
pub mod limits;
pub mod peer;
pub mod request_id;

/// What the server's own layers need of the response body they pass on: an answer of their
/// own when they refuse a request (shed, panic), rendered by the body's owner in the client's
/// protocol, and a place to keep the in-flight permit until the last byte.
pub trait EdgeBody: Sized {
    fn refusal(error: &crate::error::GatewayError) -> http::Response<Self>;
    fn hold(&mut self, permit: limits::InFlightPermit);
}

use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket};

/// Binds with an explicit backlog: the kernel queue for connections not yet accepted must
/// hold a burst of new clients, or some wait a full second for a SYN retry.
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// Time a client has to send a request's headers; hyper also arms it while a keep-alive
    /// connection waits for its next request, so it closes idle connections too.
    pub header_read_timeout: Duration,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// Serves `service` on `listener` until `shutdown` resolves, then drains.
pub async fn serve<S, B>(
    listener: TcpListener,
    service: S,
    opts: ServeOptions,
    tasks: &crate::tasks::Tasks,
    shutdown: impl Future<Output = ()>,
) where
    S: Service<http::Request<Incoming>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    // Connections are tracked (shutdown waits for them) and kept abortable: past the grace
    // period they are dropped, their requests ending as their clients left, each recorded.
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let conn = builder
            .serve_connection(
                TokioIo::new(stream),
                peer::WithPeer::new(service.clone(), peer),
            )
            .into_owned();
        let conn = graceful.watch(conn);
        connections.spawn(tasks.track(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection closed with error");
            }
        }));
        // Finished connections are reaped as new ones come, so the set holds the open ones.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let drained = graceful.shutdown();
    tokio::pin!(drained);
    if tokio::time::timeout(opts.shutdown_grace, &mut drained)
        .await
        .is_err()
    {
        tracing::warn!(grace = ?opts.shutdown_grace, "requests still open after the grace period; ending them");
        tasks.end_streams();
        // Each open request now writes its ending and its record, which takes moments; a
        // connection still open after that (a client that does not read) is closed.
        if tokio::time::timeout(ENDING_WINDOW, &mut drained)
            .await
            .is_err()
        {
            tracing::warn!("connections still open after their requests ended; closing");
            connections.abort_all();
        }
    }
    while connections.join_next().await.is_some() {}
}

/// How long requests ended by shutdown have to write their endings and records.
const ENDING_WINDOW: Duration = Duration::from_secs(5);
