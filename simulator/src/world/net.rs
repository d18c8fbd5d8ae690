//! The simulated network seen from the engine and from the clients: an `axum` listener on
//! turmoil's TCP, and a small HTTP/2 client with one connection per engine node.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioIo, TokioTimer};

/// The port every engine node serves HTTP on.
pub const ENGINE_PORT: u16 = 8080;
/// How often a connection with requests in flight pings its node.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a ping may go unanswered before the connection is given up.
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(3);
/// Streams a connection remembers having cancelled (requests that timed out).
const RESET_STREAMS_REMEMBERED_MAX: usize = 10_000;

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

pub use crate::journey::{HttpFailure, HttpReply, HttpRequest};

/// One request as a client host sent it: when, to which node, and what.
#[derive(Debug, Clone)]
pub struct SentRequest {
    /// Simulated time of the send, in µs since the start of the run.
    pub at_us: u64,
    pub node: String,
    pub request: HttpRequest,
}

/// Where a client host's requests are written down, when a run keeps them.
pub type RequestLog = Rc<RefCell<Vec<SentRequest>>>;

/// An HTTP client of one client host: one HTTP/2 connection per engine node, which carries
/// every request the host's users have in flight to that node (long polls included).
/// Single-threaded, like the host it runs on.
#[derive(Debug, Clone, Default)]
pub struct HttpClient {
    nodes: Rc<RefCell<BTreeMap<String, Rc<NodeConnection>>>>,
    log: Option<RequestLog>,
}

/// The connection to one engine node, made on first use and made again once it is closed.
#[derive(Debug, Default)]
struct NodeConnection {
    sender: RefCell<Option<SendRequest<Full<Bytes>>>>,
    /// Held while connecting, so the users who wait meanwhile share the new connection.
    connecting: tokio::sync::Mutex<()>,
}

impl NodeConnection {
    fn open(&self) -> Option<SendRequest<Full<Bytes>>> {
        self.sender.borrow().as_ref().filter(|sender| !sender.is_closed()).cloned()
    }
}

/// A header value that differs per user, sent without entering the connection's compression
/// table (where it would only push out the values every request shares).
fn per_user(value: String) -> Result<hyper::header::HeaderValue, HttpFailure> {
    let mut value = hyper::header::HeaderValue::try_from(value).map_err(|_| HttpFailure::ConnectionLost)?;
    value.set_sensitive(true);
    Ok(value)
}

/// A request ready to send: the HTTP/2 request, boxed (see [`HttpClient::send_built`]).
#[derive(Debug)]
pub struct BuiltRequest(Box<hyper::Request<Full<Bytes>>>);

impl HttpRequest {
    /// The HTTP/2 request to send to `node`.
    pub fn build(self, node: &str) -> Result<BuiltRequest, HttpFailure> {
        let mut builder = hyper::Request::builder()
            .method(self.method)
            .uri(format!("http://{node}{}", self.path))
            .header("x-forwarded-for", per_user(self.forwarded_for)?);
        if let Some(token) = self.bearer {
            builder = builder.header("authorization", per_user(format!("Bearer {token}"))?);
        }
        if let Some(token) = self.queue_token {
            builder = builder.header("x-queue-token", per_user(token)?);
        }
        if let Some(key) = self.idempotency_key {
            builder = builder.header("idempotency-key", per_user(key)?);
        }
        let body = match self.body {
            Some(body) => {
                builder = builder.header("content-type", "application/json");
                Full::new(Bytes::from(body))
            }
            None => Full::new(Bytes::new()),
        };
        builder.body(body).map(|request| BuiltRequest(Box::new(request))).map_err(|_| HttpFailure::ConnectionLost)
    }
}

/// Runs the connections' own tasks on the client host's local task set.
#[derive(Debug, Clone, Copy)]
struct LocalExecutor;

impl<F: Future + 'static> hyper::rt::Executor<F> for LocalExecutor {
    fn execute(&self, future: F) {
        tokio::task::spawn_local(future);
    }
}

impl HttpClient {
    /// A client that writes down every request it prepares in `log`, so that the same traffic
    /// can be sent again (the simulator's benchmark replays it against a bare handler).
    pub fn logging(log: RequestLog) -> Self {
        Self { log: Some(log), ..Self::default() }
    }

    /// Builds `request` for `node`, writing it down first if this client keeps a log.
    pub fn prepare(&self, node: &str, request: HttpRequest) -> Result<BuiltRequest, HttpFailure> {
        if let Some(log) = &self.log {
            log.borrow_mut().push(SentRequest {
                at_us: super::node::sim_now_us(),
                node: node.to_owned(),
                request: request.clone(),
            });
        }
        request.build(node)
    }

    /// Sends `request` to `node`, waiting at most `timeout` for the whole answer.
    pub fn send<'a>(
        &'a self,
        node: &'a str,
        request: HttpRequest,
        timeout: Duration,
    ) -> impl Future<Output = Result<HttpReply, HttpFailure>> + 'a {
        self.send_built(node, self.prepare(node, request), timeout)
    }

    /// Sends a request built with [`HttpClient::prepare`]: each request in flight (a waiting
    /// user's long poll above all) carries this future, and an async function keeps room for
    /// its arguments for as long as it runs; a built request is one box.
    pub async fn send_built(
        &self,
        node: &str,
        request: Result<BuiltRequest, HttpFailure>,
        timeout: Duration,
    ) -> Result<HttpReply, HttpFailure> {
        let BuiltRequest(request) = request?;
        match tokio::time::timeout(timeout, self.exchange(node, request)).await {
            Ok(result) => result,
            Err(_) => Err(HttpFailure::Timeout),
        }
    }

    async fn exchange(&self, node: &str, request: Box<hyper::Request<Full<Bytes>>>) -> Result<HttpReply, HttpFailure> {
        // Connecting is rare and its future large: boxed, so that every request in flight (a
        // waiting user's long poll above all) does not carry its size.
        let mut sender = match self.open_connection(node) {
            Some(sender) => sender,
            None => Box::pin(self.connection(node)).await?,
        };
        sender.ready().await.map_err(|_| HttpFailure::ConnectionLost)?;
        let response = sender.send_request(*request).await.map_err(|_| HttpFailure::ConnectionLost)?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.map_err(|_| HttpFailure::ConnectionLost)?.to_bytes();
        Ok(HttpReply { status, body })
    }

    /// The open connection to `node`, if there is one.
    fn open_connection(&self, node: &str) -> Option<SendRequest<Full<Bytes>>> {
        self.nodes.borrow().get(node).and_then(|slot| slot.open())
    }

    async fn connection(&self, node: &str) -> Result<SendRequest<Full<Bytes>>, HttpFailure> {
        let slot = Rc::clone(self.nodes.borrow_mut().entry(node.to_owned()).or_default());
        if let Some(sender) = slot.open() {
            return Ok(sender);
        }
        let _connecting = slot.connecting.lock().await;
        if let Some(sender) = slot.open() {
            return Ok(sender);
        }
        let stream =
            turmoil::net::TcpStream::connect((node, ENGINE_PORT)).await.map_err(|_| HttpFailure::ConnectionLost)?;
        // Pings find a connection whose node crashed or was cut off, so that it is closed
        // and the next request connects again.
        let (sender, connection) = hyper::client::conn::http2::Builder::new(LocalExecutor)
            .timer(TokioTimer::new())
            // Answers carry few repeated headers: no compression table to keep.
            .header_table_size(0)
            .keep_alive_interval(KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
            // h2 forgets a stream it cancelled after a while of wall-clock time, and answers a
            // frame for a forgotten stream with one more reset: the traffic would depend on how
            // fast the host runs. Remembered for good (up to a maximum), it does not.
            .reset_stream_duration(Duration::MAX)
            .max_concurrent_reset_streams(RESET_STREAMS_REMEMBERED_MAX)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|_| HttpFailure::ConnectionLost)?;
        tokio::task::spawn_local(async move {
            let _ = connection.await;
        });
        *slot.sender.borrow_mut() = Some(sender.clone());
        Ok(sender)
    }
}
