//! Pooled HTTP/1.1 connections to plain-`http://` backends, driven by the task that reads
//! the response.
//!
//! With hyper's pooled client each connection runs in a task of its own and hands the body
//! over one chunk at a time through a channel: every SSE event then costs a wake-up of the
//! reading task and a write of its own. Here the response body's reader polls the connection
//! itself, so all events that arrived in one socket read are decoded in one go and leave in
//! one write:
//!
//! ```text
//!  pooled client:  socket ─read─► conn task ─chunk─► channel ─wake─► body ─► 1 write / event
//!  driven here:    socket ─read─► (same task: poll conn, drain body) ─► 1 write / read
//! ```
//!
//! HTTPS backends (commercial APIs) keep the pooled client: their events arrive paced by the
//! network, one per read, so there is nothing to gather.

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpStream;

/// Idle connections kept per backend at most.
const MAX_IDLE: usize = 256;

type Conn = Connection<TokioIo<TcpStream>, Full<Bytes>>;

#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    #[error("connect failed: {0}")]
    Connect(std::io::Error),
    #[error("connect timed out")]
    ConnectTimeout,
    #[error("request failed: {0}")]
    Request(#[from] hyper::Error),
}

impl H1Error {
    pub fn is_connect(&self) -> bool {
        matches!(self, H1Error::Connect(_) | H1Error::ConnectTimeout)
    }
}

#[derive(Debug)]
pub struct H1Pool {
    /// `host:port` of the backend.
    authority: String,
    connect_timeout: Duration,
    idle: Mutex<Vec<H1Conn>>,
    /// Whether a request whose reused connection closed before any answer may be sent again
    /// on a new one (see [`H1Pool::send`]).
    replay_after_close: bool,
}

pub struct H1Conn {
    tx: SendRequest<Full<Bytes>>,
    conn: Conn,
}

impl std::fmt::Debug for H1Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("H1Conn")
    }
}

/// A connection lent to one request; the response body's reader polls it. Dropped mid-body,
/// it closes the connection (the backend sees the client go away); released after a whole
/// body, it goes back to the pool.
#[derive(Debug)]
pub struct Driver {
    conn: Option<H1Conn>,
    pool: Arc<H1Pool>,
    /// The connection ended (closed, or broke); it cannot be reused.
    finished: bool,
}

// === impl H1Pool ===

impl H1Pool {
    /// `replay_after_close`: see [`H1Pool::send`].
    pub fn new(
        authority: String,
        connect_timeout: Duration,
        replay_after_close: bool,
    ) -> Arc<Self> {
        Arc::new(Self {
            authority,
            connect_timeout,
            idle: Mutex::new(Vec::new()),
            replay_after_close,
        })
    }

    /// For a plain-`http://` base URL, a pool to its `host:port` (port 80 when not given).
    pub fn for_base_url(
        base_url: &str,
        connect_timeout: Duration,
        replay_after_close: bool,
    ) -> Option<Arc<Self>> {
        let uri: http::Uri = base_url.parse().ok()?;
        if uri.scheme_str() != Some("http") {
            return None;
        }
        let host = uri.host()?;
        Some(Self::new(
            format!("{host}:{}", uri.port_u16().unwrap_or(80)),
            connect_timeout,
            replay_after_close,
        ))
    }

    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// Sends a request on a pooled or new connection; returns the response head and the
    /// connection's driver. A pooled connection found closed before the request was written
    /// is retried once on a new one. One that closed after, before any answer, only where the
    /// pool allows it (self-hosted servers, which close idle keep-alive connections at will:
    /// llama.cpp's after 5 s): the backend may have read the request, and for a provider a
    /// second send could pay for it twice.
    pub async fn send(
        self: &Arc<Self>,
        req: Request<Full<Bytes>>,
    ) -> Result<(Response<Incoming>, Driver), H1Error> {
        if let Some(conn) = self.checkout() {
            let retry = req.clone();
            match self.clone().send_on(conn, req).await {
                Ok(r) => return Ok(r),
                Err(H1Error::Request(e))
                    if e.is_canceled()
                        || e.is_closed()
                        || (self.replay_after_close && e.is_incomplete_message()) =>
                {
                    return self.clone().send_on(self.connect().await?, retry).await;
                }
                Err(e) => return Err(e),
            }
        }
        self.clone().send_on(self.connect().await?, req).await
    }

    async fn send_on(
        self: Arc<Self>,
        conn: H1Conn,
        req: Request<Full<Bytes>>,
    ) -> Result<(Response<Incoming>, Driver), H1Error> {
        let mut driver = Driver {
            conn: Some(conn),
            pool: self,
            finished: false,
        };
        let c = driver.conn.as_mut().expect("just set");
        let response = c.tx.send_request(req);
        let resp = driver.drive(response).await?;
        Ok((resp, driver))
    }

    /// A new connection. Boxed: the TCP connect and HTTP/1 handshake futures are large and
    /// only a new connection needs them; inline, their room would be allocated and copied
    /// with every request's future.
    fn connect(&self) -> Pin<Box<dyn Future<Output = Result<H1Conn, H1Error>> + Send + '_>> {
        Box::pin(self.dial())
    }

    async fn dial(&self) -> Result<H1Conn, H1Error> {
        let stream =
            tokio::time::timeout(self.connect_timeout, TcpStream::connect(&self.authority))
                .await
                .map_err(|_| H1Error::ConnectTimeout)?
                .map_err(H1Error::Connect)?;
        let _ = stream.set_nodelay(true);
        let (tx, conn) = http1::handshake(TokioIo::new(stream)).await?;
        Ok(H1Conn { tx, conn })
    }

    /// An idle connection that is still open, if any.
    fn checkout(&self) -> Option<H1Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(mut c) = idle.pop() {
            // One look without waiting: a connection the backend closed ends at once.
            let mut cx = Context::from_waker(std::task::Waker::noop());
            let open =
                matches!(Pin::new(&mut c.conn).poll(&mut cx), Poll::Pending) && !c.tx.is_closed();
            if open && c.tx.poll_ready(&mut cx).is_ready() {
                return Some(c);
            }
        }
        None
    }

    fn checkin(&self, conn: H1Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
    }
}

// === impl Driver ===

impl Driver {
    /// Moves the connection's I/O forward (reads feed the response body). `Ready` once the
    /// connection has ended; errors surface through the body as well.
    pub fn poll_io(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.finished {
            return Poll::Ready(());
        }
        let Some(c) = self.conn.as_mut() else {
            return Poll::Ready(());
        };
        match Pin::new(&mut c.conn).poll(cx) {
            Poll::Ready(_) => {
                self.finished = true;
                // Dropped, not kept: a request still queued on an ended connection (the
                // backend closed it as the request was handed over) is then cancelled, and
                // its response future fails at once instead of waiting for the timeout.
                self.conn = None;
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// Runs `fut` (a response, or a body being read) while driving the connection.
    pub async fn drive<F: Future>(&mut self, fut: F) -> F::Output {
        let mut fut = std::pin::pin!(fut);
        std::future::poll_fn(|cx| {
            let _ = self.poll_io(cx);
            fut.as_mut().poll(cx)
        })
        .await
    }

    /// The response body was read to its end: the connection may serve another request.
    pub fn release(mut self) {
        if let Some(c) = self.conn.take() {
            if !self.finished && !c.tx.is_closed() {
                self.pool.checkin(c);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// A pooled connection the backend closed while it sat idle: the request sent on it
    /// must fail at once (and be retried by `send`), never wait for a response that cannot
    /// come.
    #[tokio::test]
    async fn a_request_on_a_connection_the_backend_closed_fails_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = crate::tasks::Tasks::new().spawn(async move {
            // Accept and close without reading: what a server does to an idle keep-alive.
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1];
            let _ = tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await;
            drop(s);
        });
        let pool = H1Pool::new(addr.to_string(), Duration::from_secs(1), false);
        let conn = pool.connect().await.unwrap();
        server.await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let req = Request::post("/v1/chat/completions")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let sent =
            tokio::time::timeout(Duration::from_secs(5), pool.clone().send_on(conn, req)).await;
        match sent {
            Err(_) => panic!("the request waited on a closed connection"),
            Ok(Ok(_)) => panic!("no server answered"),
            Ok(Err(_)) => {}
        }
    }
}
