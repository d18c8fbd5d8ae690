//! Slow, idle and surplus clients against a real server on tokio sockets: each is cut off by
//! its limit, and the server goes on serving everyone else.
//!
//! The limits are fractions of a second of real time; every wait has a generous upper bound
//! ([`PATIENCE`]) and proves only that the limit acts, never how fast.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tcore_engine::clock::ManualClock;
use tcore_engine::config::{ConnectionLimits, EngineConfig, HoldMode};
use tcore_engine::faults::NoFaults;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{START_MS, config, engine_with};

/// The limit a test exercises.
const SHORT: Duration = Duration::from_millis(300);
/// A limit a test does not exercise: long enough never to act during it.
const LONG: Duration = Duration::from_secs(30);
/// How long a test waits for anything the server should do.
const PATIENCE: Duration = Duration::from_secs(10);

fn ms(duration: Duration) -> u64 {
    duration.as_millis() as u64
}

/// A server with `limits`, on a port of its own.
async fn serve(limits: ConnectionLimits) -> SocketAddr {
    let config = EngineConfig { connections: limits, ..config(HoldMode::Atomic) };
    let engine = engine_with(config, Arc::new(ManualClock::starting_at_ms(START_MS)), Arc::new(NoFaults)).engine;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(tcore_engine::server::serve(listener, engine, std::future::pending()));
    address
}

fn limits() -> ConnectionLimits {
    ConnectionLimits {
        header_read_timeout_ms: ms(LONG),
        body_read_timeout_ms: ms(LONG),
        idle_timeout_ms: Some(ms(LONG)),
        connections_max: 100,
    }
}

/// Everything the server sends on `stream` until it closes the connection, and how long that
/// took; panics if it is still open after [`PATIENCE`].
async fn read_until_closed(stream: &mut TcpStream) -> (String, Duration) {
    let start = Instant::now();
    let mut received = Vec::new();
    let mut buffer = [0_u8; 4096];
    loop {
        match tokio::time::timeout(PATIENCE, stream.read(&mut buffer)).await {
            Err(_) => panic!("still open after {PATIENCE:?}; received {:?}", String::from_utf8_lossy(&received)),
            Ok(Ok(0) | Err(_)) => return (String::from_utf8_lossy(&received).into_owned(), start.elapsed()),
            Ok(Ok(read)) => received.extend_from_slice(&buffer[..read]),
        }
    }
}

/// Sends a whole `GET /healthz` on `stream` and reads the answer's status line.
async fn health_on(stream: &mut TcpStream) -> String {
    stream.write_all(b"GET /healthz HTTP/1.1\r\nhost: test\r\n\r\n").await.expect("write");
    let mut buffer = [0_u8; 1024];
    let read = tokio::time::timeout(PATIENCE, stream.read(&mut buffer)).await.expect("an answer").expect("read");
    String::from_utf8_lossy(&buffer[..read]).lines().next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn half_sent_headers_of_a_later_request_are_cut_off_by_the_header_read_timeout() {
    // After a first request only hyper's header-read timer can act: the idle timeout is long.
    let address = serve(ConnectionLimits { header_read_timeout_ms: ms(SHORT), ..limits() }).await;
    let mut stream = TcpStream::connect(address).await.expect("connect");
    assert_eq!(health_on(&mut stream).await, "HTTP/1.1 200 OK");
    stream.write_all(b"GET /healthz HTTP/1.1\r\nhost: test\r\nx-slow: ").await.expect("write");
    let (received, took) = read_until_closed(&mut stream).await;
    assert!(took >= SHORT / 2, "closed after {took:?}, well before the timeout");
    assert!(!received.contains("200"), "{received:?}");
}

#[tokio::test]
async fn a_connection_that_starts_no_request_is_cut_off_by_the_header_read_timeout() {
    let address = serve(ConnectionLimits { header_read_timeout_ms: ms(SHORT), ..limits() }).await;
    let mut stream = TcpStream::connect(address).await.expect("connect");
    let (received, took) = read_until_closed(&mut stream).await;
    assert!(took >= SHORT.mul_f64(0.9), "closed after {took:?}, before the timeout");
    assert_eq!(received, "");
}

#[tokio::test]
async fn a_half_sent_body_is_answered_408_and_the_connection_closed() {
    let address = serve(ConnectionLimits { body_read_timeout_ms: ms(SHORT), ..limits() }).await;
    let mut stream = TcpStream::connect(address).await.expect("connect");
    let head =
        "POST /v1/anything HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n";
    stream.write_all(format!("{head}{{\"half\":").as_bytes()).await.expect("write");
    let (received, took) = read_until_closed(&mut stream).await;
    assert!(took >= SHORT.mul_f64(0.9), "answered after {took:?}, before the timeout");
    assert!(received.starts_with("HTTP/1.1 408"), "{received:?}");
    assert!(received.contains("application/problem+json") && received.contains("\"code\":\"body_timeout\""));
}

#[tokio::test]
async fn a_slow_body_within_the_timeout_is_read_and_keeps_an_idle_limited_connection_open() {
    // The idle timeout counts only time with no request in flight: a request whose body is
    // still coming is in flight.
    let address =
        serve(ConnectionLimits { idle_timeout_ms: Some(ms(SHORT)), header_read_timeout_ms: ms(SHORT), ..limits() })
            .await;
    let mut stream = TcpStream::connect(address).await.expect("connect");
    let body = "{}";
    let head = format!("POST /nowhere HTTP/1.1\r\nhost: test\r\ncontent-length: {}\r\n\r\n", body.len());
    stream.write_all(head.as_bytes()).await.expect("write");
    tokio::time::sleep(SHORT * 3).await;
    stream.write_all(body.as_bytes()).await.expect("write");
    let mut buffer = [0_u8; 1024];
    let read = tokio::time::timeout(PATIENCE, stream.read(&mut buffer)).await.expect("an answer").expect("read");
    let answer = String::from_utf8_lossy(&buffer[..read]);
    assert!(answer.starts_with("HTTP/1.1 404"), "the request got to its route: {answer:?}");
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_after_the_idle_timeout() {
    let address = serve(ConnectionLimits { idle_timeout_ms: Some(ms(SHORT)), ..limits() }).await;
    let stream = TcpStream::connect(address).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.expect("handshake");
    let connection = tokio::spawn(connection);
    let request = hyper::Request::get("http://test/healthz").body(Empty::<Bytes>::new()).expect("request");
    let response = sender.send_request(request).await.expect("an answer");
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.expect("body");
    let start = Instant::now();
    let ended = tokio::time::timeout(PATIENCE, connection).await;
    assert!(ended.is_ok(), "the idle connection is still open after {PATIENCE:?}");
    assert!(start.elapsed() >= SHORT.mul_f64(0.9), "closed after {:?}, before the timeout", start.elapsed());
}

#[tokio::test]
async fn connections_beyond_the_maximum_are_refused_while_the_others_are_served() {
    let address = serve(ConnectionLimits { connections_max: 2, ..limits() }).await;
    let mut first = TcpStream::connect(address).await.expect("connect");
    let mut second = TcpStream::connect(address).await.expect("connect");
    // Accepted in order, so these two hold the permits before the third is looked at.
    assert_eq!(health_on(&mut first).await, "HTTP/1.1 200 OK");
    let mut third = TcpStream::connect(address).await.expect("connect");
    let (refusal, _) = read_until_closed(&mut third).await;
    assert!(refusal.starts_with("HTTP/1.1 503"), "{refusal:?}");
    assert!(refusal.to_ascii_lowercase().contains("connection: close"), "{refusal:?}");
    assert_eq!(health_on(&mut second).await, "HTTP/1.1 200 OK");

    // A connection that closes gives its permit back.
    drop(first);
    let deadline = Instant::now() + PATIENCE;
    let mut metrics = loop {
        let mut next = TcpStream::connect(address).await.expect("connect");
        next.write_all(b"GET /metrics HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n").await.expect("write");
        let (answer, _) = read_until_closed(&mut next).await;
        if answer.starts_with("HTTP/1.1 200") {
            break answer;
        }
        assert!(Instant::now() < deadline, "no permit came back within {PATIENCE:?}: {answer:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    metrics.retain(|c| c != '\r');
    let refused = metrics
        .lines()
        .find(|line| line.starts_with("tcore_connections_refused_total"))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|count| count.parse::<u64>().ok())
        .expect("the refusals are counted");
    assert!(refused >= 1, "{refused}");
}
