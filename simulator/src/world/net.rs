//! The simulated network seen from the engine and from the clients: an `axum` listener on
//! turmoil's TCP, and a small HTTP/1.1 client with a connection pool per engine node.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

/// The port every engine node serves HTTP on.
pub const ENGINE_PORT: u16 = 8080;
/// The most idle connections a client host keeps per engine node.
pub const IDLE_CONNECTIONS_MAX: usize = 512;

/// turmoil's TCP listener as an `axum` listener, so the engine's router runs unchanged.
pub struct SimListener(pub turmoil::net::TcpListener);

impl std::fmt::Debug for SimListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SimListener").field(&self.0.local_addr().ok()).finish()
    }
}

impl axum::serve::Listener for SimListener {
    type Io = turmoil::net::TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok(accepted) => return accepted,
                Err(error) => {
                    tracing::debug!(%error, "accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

/// What came back from one HTTP call.
#[derive(Debug, Clone)]
pub struct HttpReply {
    pub status: u16,
    pub body: Bytes,
}

/// Why an HTTP call has no answer: the outcome is unknown to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpFailure {
    /// No answer within the timeout.
    Timeout,
    /// The connection could not be made or broke.
    ConnectionLost,
}

/// One request to send.
#[derive(Debug, Clone)]
pub struct HttpRequest {
    pub method: &'static str,
    pub path: String,
    pub bearer: Option<String>,
    pub idempotency_key: Option<String>,
    pub forwarded_for: String,
    pub body: Option<String>,
}

/// An HTTP client of one client host: a pool of HTTP/1.1 connections per engine node.
/// Single-threaded, like the host it runs on.
#[derive(Debug, Clone, Default)]
pub struct HttpClient {
    idle: Rc<RefCell<IdleConnections>>,
}

/// Idle connections per engine node, the most recently used last.
type IdleConnections = BTreeMap<String, Vec<SendRequest<Full<Bytes>>>>;

impl HttpClient {
    /// Sends `request` to `node`, waiting at most `timeout` for the whole answer.
    pub async fn send(&self, node: &str, request: HttpRequest, timeout: Duration) -> Result<HttpReply, HttpFailure> {
        match tokio::time::timeout(timeout, self.send_unbounded(node, request)).await {
            Ok(result) => result,
            Err(_) => Err(HttpFailure::Timeout),
        }
    }

    async fn send_unbounded(&self, node: &str, request: HttpRequest) -> Result<HttpReply, HttpFailure> {
        let mut sender = self.connection(node).await?;
        let mut builder = hyper::Request::builder()
            .method(request.method)
            .uri(request.path)
            .header("host", node)
            .header("x-forwarded-for", request.forwarded_for);
        if let Some(token) = request.bearer {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        if let Some(key) = request.idempotency_key {
            builder = builder.header("idempotency-key", key);
        }
        let body = match request.body {
            Some(body) => {
                builder = builder.header("content-type", "application/json");
                Full::new(Bytes::from(body))
            }
            None => Full::new(Bytes::new()),
        };
        let request = builder.body(body).map_err(|_| HttpFailure::ConnectionLost)?;
        let response = sender.send_request(request).await.map_err(|_| HttpFailure::ConnectionLost)?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.map_err(|_| HttpFailure::ConnectionLost)?.to_bytes();
        self.give_back(node, sender);
        Ok(HttpReply { status, body })
    }

    async fn connection(&self, node: &str) -> Result<SendRequest<Full<Bytes>>, HttpFailure> {
        loop {
            let idle = self.idle.borrow_mut().get_mut(node).and_then(Vec::pop);
            match idle {
                Some(sender) if sender.is_ready() => return Ok(sender),
                Some(_) => continue,
                None => break,
            }
        }
        let stream =
            turmoil::net::TcpStream::connect((node, ENGINE_PORT)).await.map_err(|_| HttpFailure::ConnectionLost)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|_| HttpFailure::ConnectionLost)?;
        tokio::task::spawn_local(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }

    fn give_back(&self, node: &str, sender: SendRequest<Full<Bytes>>) {
        let mut idle = self.idle.borrow_mut();
        let pool = idle.entry(node.to_owned()).or_default();
        if pool.len() < IDLE_CONNECTIONS_MAX {
            pool.push(sender);
        }
    }
}
