//! A TCP fault proxy for live runs: put on a link (load driver → engine node, engine node →
//! store), it forwards every connection to its upstream and applies the scenario's network
//! faults to the bytes, as a simulated run's network applies them to messages.
//!
//! Each accepted connection gets one upstream connection; bytes flow both ways through a queue
//! per direction, and a half-close (EOF) is passed on in its place in the stream. The link's
//! [`LinkMode`] applies at once to open connections and new ones:
//!
//! - `Drop` (a partition) discards what it reads, like a firewall dropping packets, and also
//!   what was queued when it began. A real TCP stream would retransmit those bytes after the
//!   heal; here they are gone, and a byte stream cannot have a hole in it, so a connection that
//!   lost bytes (or its EOF) is cut when its direction stops dropping: its client sees a reset
//!   and reconnects. A connection that lost nothing carries on.
//! - `Delay` delivers each chunk `one_way_ms` after it was read, in order; reading goes on
//!   meanwhile, so the delay is a latency, not a throughput limit.
//! - `Hold` buffers everything and delivers it at once when the mode leaves `Hold`.
//! - `Cut` resets every open connection and resets new ones as soon as they are accepted.
//!
//! Live only: it reads tokio's clock and uses `tokio::sync::watch`; no simulated run goes
//! through it.

use std::collections::VecDeque;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::WriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// Bytes queued in one direction of one connection. Beyond it a connection stops reading that
/// side (back pressure), except under `Hold`, where going beyond it cuts the connection.
pub const QUEUED_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Open connections through one proxy; one more is reset and counted as refused.
pub const CONNECTIONS_MAX: usize = 16_384;
/// The most one read takes from a socket.
const READ_CHUNK_BYTES: usize = 16 * 1024;
/// How long a connection to the upstream may take before the client is reset.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The pause after a failed accept (out of file descriptors), so the loop does not spin.
const ACCEPT_RETRY_PAUSE: Duration = Duration::from_millis(10);

/// Which way bytes go through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the client that connected to the proxy to the upstream.
    ToUpstream,
    /// From the upstream back to the client.
    ToClient,
}

/// What the link does to the bytes that cross it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkMode {
    /// Forward.
    Pass,
    /// A partition: discard the bytes of `only` that direction, or of both when `None`.
    Drop { only: Option<Direction> },
    /// Deliver each chunk `one_way_ms` after it was read, in `only` that direction or both
    /// when `None` (a slow store is `only: Some(Direction::ToClient)`).
    Delay { one_way_ms: u64, only: Option<Direction> },
    /// Buffer both directions and deliver everything when the mode changes.
    Hold,
    /// Reset every connection, and each new one, until the mode changes.
    Cut,
}

impl LinkMode {
    fn drops(self, direction: Direction) -> bool {
        matches!(self, LinkMode::Drop { only } if only.is_none_or(|only| only == direction))
    }

    fn delay(self, direction: Direction) -> Duration {
        match self {
            LinkMode::Delay { one_way_ms, only } if only.is_none_or(|only| only == direction) => {
                Duration::from_millis(one_way_ms)
            }
            _ => Duration::ZERO,
        }
    }
}

/// What a proxy did, for the run result.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ProxyCounts {
    pub connections_accepted: u64,
    /// Accepted and reset at once: under `Cut`, or beyond [`CONNECTIONS_MAX`].
    pub connections_refused: u64,
    /// Open connections the proxy reset: by `Cut`, when a partition that broke their stream
    /// healed, or when a hold overflowed.
    pub connections_cut: u64,
    /// Connections cut because a hold overflowed [`QUEUED_BYTES_MAX`] (also in `connections_cut`).
    pub hold_overflows: u64,
    /// Bytes delivered to the upstream.
    pub bytes_to_upstream: u64,
    /// Bytes delivered to clients.
    pub bytes_to_client: u64,
    /// Bytes a partition discarded, or a connection left undelivered when it ended.
    pub bytes_dropped: u64,
}

/// The link as connections see it. `cuts` counts the times the mode was set to `Cut`, so a
/// connection that missed a brief `Cut` (the watch keeps only the last value) still sees it.
#[derive(Debug, Clone, Copy)]
struct LinkState {
    mode: LinkMode,
    cuts: u64,
}

/// A TCP proxy on 127.0.0.1 in front of one upstream address. Its tasks stop when it is dropped.
#[derive(Debug)]
pub struct FaultProxy {
    local_addr: SocketAddr,
    link: watch::Sender<LinkState>,
    counts: Arc<Mutex<ProxyCounts>>,
    accept_task: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream`, in `Pass`, on the current
    /// tokio runtime (an error outside one).
    pub fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        let runtime = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        listener.set_nonblocking(true)?;
        let local_addr = listener.local_addr()?;
        let listener = {
            let _entered = runtime.enter();
            TcpListener::from_std(listener)?
        };
        let (link, link_changes) = watch::channel(LinkState { mode: LinkMode::Pass, cuts: 0 });
        let counts = Arc::new(Mutex::new(ProxyCounts::default()));
        let accept_task = runtime.spawn(accept(listener, upstream, link_changes, Arc::clone(&counts)));
        Ok(FaultProxy { local_addr, link, counts, accept_task })
    }

    /// Where clients connect.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Changes the link's behaviour, for open connections and new ones alike.
    pub fn set(&self, mode: LinkMode) {
        self.link.send_modify(|state| {
            state.mode = mode;
            if mode == LinkMode::Cut {
                state.cuts += 1;
            }
        });
    }

    pub fn counts(&self) -> ProxyCounts {
        *self.counts.lock()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // The accept task owns the connections' tasks (a `JoinSet`), which go with it.
        self.accept_task.abort();
    }
}

async fn accept(
    listener: TcpListener,
    upstream: SocketAddr,
    link: watch::Receiver<LinkState>,
    counts: Arc<Mutex<ProxyCounts>>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let client = match accepted {
                    Ok((client, _)) => client,
                    Err(error) => {
                        tracing::warn!(%error, "the fault proxy failed to accept a connection");
                        tokio::time::sleep(ACCEPT_RETRY_PAUSE).await;
                        continue;
                    }
                };
                let state = *link.borrow();
                let refused = state.mode == LinkMode::Cut || connections.len() >= CONNECTIONS_MAX;
                {
                    let mut counts = counts.lock();
                    counts.connections_accepted += 1;
                    counts.connections_refused += u64::from(refused);
                }
                if refused {
                    reset(&client);
                    continue;
                }
                connections.spawn(relay(client, upstream, link.clone(), state.cuts, Arc::clone(&counts)));
            }
        }
    }
}

/// Carries one client connection to its own upstream connection until both directions end,
/// either side fails, or the link cuts it.
async fn relay(
    mut client: TcpStream,
    upstream: SocketAddr,
    mut link: watch::Receiver<LinkState>,
    cuts_seen: u64,
    counts: Arc<Mutex<ProxyCounts>>,
) {
    let connected = tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(upstream))
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()));
    let mut upstream = match connected {
        Ok(upstream) => upstream,
        Err(error) => {
            tracing::debug!(%error, %upstream, "the fault proxy could not reach its upstream");
            reset(&client);
            return;
        }
    };
    // A proxy must not add Nagle's delay to small writes.
    for stream in [&client, &upstream] {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "the fault proxy could not set TCP_NODELAY");
        }
    }
    let end = Connection::new(&counts).run(&mut client, &mut upstream, &mut link, cuts_seen).await;
    if end == End::Finished {
        return;
    }
    reset(&client);
    reset(&upstream);
    let mut counts = counts.lock();
    match end {
        End::Cut => counts.connections_cut += 1,
        End::Overflowed => {
            counts.connections_cut += 1;
            counts.hold_overflows += 1;
        }
        End::Finished | End::Failed => {}
    }
}

/// Makes the stream's close a reset (RST) rather than an orderly FIN. It closes when dropped.
fn reset(stream: &TcpStream) {
    if let Err(error) = stream.set_zero_linger() {
        tracing::debug!(%error, "the fault proxy could not set SO_LINGER");
    }
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Both directions delivered their EOF.
    Finished,
    /// A side failed (a reset, a broken pipe).
    Failed,
    /// The link cut it.
    Cut,
    /// A hold overflowed its buffer.
    Overflowed,
}

/// Both directions of one connection.
#[derive(Debug)]
struct Connection<'a> {
    to_upstream: Pipe,
    to_client: Pipe,
    counts: &'a Mutex<ProxyCounts>,
}

impl<'a> Connection<'a> {
    fn new(counts: &'a Mutex<ProxyCounts>) -> Self {
        Connection { to_upstream: Pipe::new(Direction::ToUpstream), to_client: Pipe::new(Direction::ToClient), counts }
    }

    async fn run(
        mut self,
        client: &mut TcpStream,
        upstream: &mut TcpStream,
        link: &mut watch::Receiver<LinkState>,
        cuts_seen: u64,
    ) -> End {
        let (mut client_read, mut client_write) = client.split();
        let (mut upstream_read, mut upstream_write) = upstream.split();
        let mut client_buffer = vec![0; READ_CHUNK_BYTES];
        let mut upstream_buffer = vec![0; READ_CHUNK_BYTES];
        let mut state = *link.borrow_and_update();
        if let Err(end) = self.on_link(state, cuts_seen) {
            return self.ended(end);
        }
        loop {
            if self.to_upstream.write_ended && self.to_client.write_ended {
                return End::Finished;
            }
            let now = Instant::now();
            let upstream_due_at = self.to_upstream.due_at(state.mode);
            let client_due_at = self.to_client.due_at(state.mode);
            let due = |due_at: Option<Instant>| due_at.is_some_and(|due_at| due_at <= now);
            let wake_at = [upstream_due_at, client_due_at].into_iter().flatten().filter(|due_at| *due_at > now).min();
            let step = tokio::select! {
                biased;
                changed = link.changed() => match changed {
                    Ok(()) => {
                        state = *link.borrow_and_update();
                        self.on_link(state, cuts_seen)
                    }
                    // The proxy is gone.
                    Err(_) => Err(End::Failed),
                },
                written = self.to_upstream.write_head(&mut upstream_write), if due(upstream_due_at) => {
                    self.to_upstream.on_written(written, self.counts)
                }
                written = self.to_client.write_head(&mut client_write), if due(client_due_at) => {
                    self.to_client.on_written(written, self.counts)
                }
                read = client_read.read(&mut client_buffer), if self.to_upstream.may_read(state.mode) => {
                    self.to_upstream.on_read(read, &client_buffer, state.mode, self.counts)
                }
                read = upstream_read.read(&mut upstream_buffer), if self.to_client.may_read(state.mode) => {
                    self.to_client.on_read(read, &upstream_buffer, state.mode, self.counts)
                }
                () = tokio::time::sleep_until(wake_at.unwrap_or(now)), if wake_at.is_some() => Ok(()),
            };
            if let Err(end) = step {
                return self.ended(end);
            }
        }
    }

    fn on_link(&mut self, state: LinkState, cuts_seen: u64) -> Result<(), End> {
        if state.cuts != cuts_seen {
            return Err(End::Cut);
        }
        self.to_upstream.on_mode(state.mode, self.counts)?;
        self.to_client.on_mode(state.mode, self.counts)
    }

    /// Counts what the connection leaves undelivered.
    fn ended(mut self, end: End) -> End {
        self.to_upstream.discard(self.counts);
        self.to_client.discard(self.counts);
        end
    }
}

/// One direction of a connection: what was read from one side and is not yet written to the
/// other.
#[derive(Debug)]
struct Pipe {
    direction: Direction,
    queue: VecDeque<Chunk>,
    /// Bytes in `queue`, less what was written of its head.
    queued_bytes: usize,
    /// Bytes of the head chunk already written.
    head_written_bytes: usize,
    /// The reading side sent its EOF.
    read_ended: bool,
    /// The EOF was passed on.
    write_ended: bool,
    /// A partition discarded bytes (or the EOF) of this direction: the stream is broken.
    broken: bool,
}

#[derive(Debug)]
struct Chunk {
    due_at: Instant,
    payload: Payload,
}

#[derive(Debug)]
enum Payload {
    Bytes(Vec<u8>),
    End,
}

#[derive(Debug)]
enum Written {
    Bytes(usize),
    End,
}

impl Pipe {
    fn new(direction: Direction) -> Self {
        Pipe {
            direction,
            queue: VecDeque::new(),
            queued_bytes: 0,
            head_written_bytes: 0,
            read_ended: false,
            write_ended: false,
            broken: false,
        }
    }

    fn may_read(&self, mode: LinkMode) -> bool {
        !self.read_ended && (mode == LinkMode::Hold || self.queued_bytes < QUEUED_BYTES_MAX)
    }

    /// When the head chunk may be written: never under `Hold` or while this direction drops.
    fn due_at(&self, mode: LinkMode) -> Option<Instant> {
        if mode == LinkMode::Hold || mode.drops(self.direction) {
            return None;
        }
        self.queue.front().map(|chunk| chunk.due_at)
    }

    fn on_read(
        &mut self,
        read: io::Result<usize>,
        buffer: &[u8],
        mode: LinkMode,
        counts: &Mutex<ProxyCounts>,
    ) -> Result<(), End> {
        let read_bytes = read.map_err(|_| End::Failed)?;
        let payload = if read_bytes == 0 {
            self.read_ended = true;
            Payload::End
        } else {
            Payload::Bytes(buffer[..read_bytes].to_vec())
        };
        if mode.drops(self.direction) {
            counts.lock().bytes_dropped += read_bytes as u64;
            self.broken = true;
            return Ok(());
        }
        self.queue.push_back(Chunk { due_at: Instant::now() + mode.delay(self.direction), payload });
        self.queued_bytes += read_bytes;
        if mode == LinkMode::Hold && self.queued_bytes > QUEUED_BYTES_MAX {
            return Err(End::Overflowed);
        }
        Ok(())
    }

    /// Writes (some of) the head chunk, or passes the EOF on.
    async fn write_head(&self, writer: &mut WriteHalf<'_>) -> io::Result<Written> {
        match self.queue.front().map(|chunk| &chunk.payload) {
            Some(Payload::Bytes(bytes)) => writer.write(&bytes[self.head_written_bytes..]).await.map(Written::Bytes),
            Some(Payload::End) => writer.shutdown().await.map(|()| Written::End),
            // Not polled: the write branch runs only with a chunk due.
            None => std::future::pending().await,
        }
    }

    fn on_written(&mut self, written: io::Result<Written>, counts: &Mutex<ProxyCounts>) -> Result<(), End> {
        match written.map_err(|_| End::Failed)? {
            Written::Bytes(0) => return Err(End::Failed),
            Written::Bytes(bytes) => {
                self.head_written_bytes += bytes;
                self.queued_bytes -= bytes;
                let mut counts = counts.lock();
                match self.direction {
                    Direction::ToUpstream => counts.bytes_to_upstream += bytes as u64,
                    Direction::ToClient => counts.bytes_to_client += bytes as u64,
                }
            }
            Written::End => self.write_ended = true,
        }
        let head_done = match self.queue.front().map(|chunk| &chunk.payload) {
            Some(Payload::Bytes(bytes)) => self.head_written_bytes == bytes.len(),
            Some(Payload::End) | None => true,
        };
        if head_done {
            self.queue.pop_front();
            self.head_written_bytes = 0;
        }
        Ok(())
    }

    /// A partition starting discards what is in flight; one healing cuts a broken stream.
    fn on_mode(&mut self, mode: LinkMode, counts: &Mutex<ProxyCounts>) -> Result<(), End> {
        if mode.drops(self.direction) {
            self.broken |= self.discard(counts);
            return Ok(());
        }
        if self.broken { Err(End::Cut) } else { Ok(()) }
    }

    /// Empties the queue, counting its bytes as dropped; whether anything was in it.
    fn discard(&mut self, counts: &Mutex<ProxyCounts>) -> bool {
        if self.queue.is_empty() {
            return false;
        }
        counts.lock().bytes_dropped += self.queued_bytes as u64;
        self.queue.clear();
        self.queued_bytes = 0;
        self.head_written_bytes = 0;
        true
    }
}

#[cfg(test)]
mod tests {
    use std::io::ErrorKind;

    use super::*;

    /// Long enough for anything that should arrive on loopback; only a failing test waits it.
    const GUARD: Duration = Duration::from_secs(2);
    /// How long a test watches a socket to see that nothing arrives.
    const QUIET: Duration = Duration::from_millis(50);

    async fn within<T>(future: impl Future<Output = T>) -> T {
        tokio::time::timeout(GUARD, future).await.expect("in time")
    }

    /// An upstream that sends back what it reads, and its EOF.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("the echo server listens");
        let address = listener.local_addr().expect("the echo server's address");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = stream.split();
                    if tokio::io::copy(&mut read, &mut write).await.is_ok() {
                        let _ = write.shutdown().await;
                    }
                });
            }
        });
        address
    }

    async fn echo_proxy() -> FaultProxy {
        FaultProxy::start(echo_server().await).expect("the proxy starts")
    }

    async fn connect(proxy: &FaultProxy) -> TcpStream {
        within(TcpStream::connect(proxy.local_addr())).await.expect("the proxy accepts")
    }

    /// A proxy, a client connected through it, and the upstream's end of that connection.
    async fn linked() -> (FaultProxy, TcpStream, TcpStream) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("the upstream listens");
        let proxy =
            FaultProxy::start(listener.local_addr().expect("the upstream's address")).expect("the proxy starts");
        let client = connect(&proxy).await;
        let (upstream, _) = within(listener.accept()).await.expect("the proxy connects upstream");
        (proxy, client, upstream)
    }

    async fn read_exactly(stream: &mut TcpStream, length: usize) -> Vec<u8> {
        let mut bytes = vec![0; length];
        within(stream.read_exact(&mut bytes)).await.expect("the bytes arrive");
        bytes
    }

    async fn round_trip(stream: &mut TcpStream, bytes: &[u8]) {
        stream.write_all(bytes).await.expect("the write");
        assert_eq!(read_exactly(stream, bytes.len()).await, bytes);
    }

    async fn nothing_arrives(stream: &mut TcpStream) {
        let read = tokio::time::timeout(QUIET, stream.read(&mut [0; 64])).await;
        assert!(read.is_err(), "something arrived: {read:?}");
    }

    async fn reset_seen(stream: &mut TcpStream) {
        let read = within(stream.read(&mut [0; 64])).await;
        assert_eq!(read.map_err(|error| error.kind()), Err(ErrorKind::ConnectionReset));
    }

    #[tokio::test]
    async fn pass_forwards_both_ways_and_passes_each_end_of_stream_on() {
        let proxy = echo_proxy().await;
        let mut client = connect(&proxy).await;
        round_trip(&mut client, b"ping").await;
        // The echo server ends its side only after it read the client's EOF through the proxy.
        client.shutdown().await.expect("the half-close");
        let mut rest = Vec::new();
        within(client.read_to_end(&mut rest)).await.expect("the end of the stream");
        assert!(rest.is_empty());
        let counts = proxy.counts();
        assert_eq!(
            (counts.connections_accepted, counts.bytes_to_upstream, counts.bytes_to_client, counts.bytes_dropped),
            (1, 4, 4, 0)
        );
    }

    #[tokio::test]
    async fn a_partition_drops_bytes_and_cuts_the_connections_it_broke_when_it_heals() {
        let proxy = echo_proxy().await;
        let mut broken = connect(&proxy).await;
        round_trip(&mut broken, b"before").await;
        let mut idle = connect(&proxy).await;
        round_trip(&mut idle, b"before").await;

        proxy.set(LinkMode::Drop { only: None });
        broken.write_all(b"lost").await.expect("the write");
        nothing_arrives(&mut broken).await;
        let mut opened_during = connect(&proxy).await;
        opened_during.write_all(b"lost too").await.expect("the write");
        nothing_arrives(&mut opened_during).await;
        assert_eq!(proxy.counts().bytes_dropped, 12);

        proxy.set(LinkMode::Pass);
        reset_seen(&mut broken).await;
        reset_seen(&mut opened_during).await;
        // A connection that lost nothing carries on, and a new one works.
        round_trip(&mut idle, b"after").await;
        round_trip(&mut connect(&proxy).await, b"after").await;
        assert_eq!(proxy.counts().connections_cut, 2);
    }

    async fn check_one_way_partition(dropped: Direction) {
        let (proxy, mut client, mut upstream) = linked().await;
        proxy.set(LinkMode::Drop { only: Some(dropped) });
        client.write_all(b"up").await.expect("the client's write");
        upstream.write_all(b"down").await.expect("the upstream's write");
        match dropped {
            Direction::ToUpstream => {
                assert_eq!(read_exactly(&mut client, 4).await, b"down");
                nothing_arrives(&mut upstream).await;
            }
            Direction::ToClient => {
                assert_eq!(read_exactly(&mut upstream, 2).await, b"up");
                nothing_arrives(&mut client).await;
            }
        }
    }

    #[tokio::test]
    async fn a_one_way_partition_drops_only_its_direction() {
        check_one_way_partition(Direction::ToUpstream).await;
        check_one_way_partition(Direction::ToClient).await;
    }

    #[tokio::test]
    async fn a_delay_holds_each_chunk_for_its_time_while_the_next_ones_are_read_and_keeps_their_order() {
        const ONE_WAY: Duration = Duration::from_millis(120);
        // A proxy that stops reading while it waits would deliver later chunks up to a whole
        // delay late on each hop.
        const SLACK: Duration = Duration::from_millis(80);
        const CHUNKS: u32 = 10;
        let proxy = echo_proxy().await;
        proxy.set(LinkMode::Delay { one_way_ms: ONE_WAY.as_millis() as u64, only: None });
        let mut client = connect(&proxy).await;
        let (mut read, mut write) = client.split();
        let sending = async {
            let mut sent_at = Vec::new();
            for index in 0..CHUNKS {
                sent_at.push(Instant::now());
                write.write_all(&index.to_be_bytes()).await.expect("the write");
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            sent_at
        };
        let receiving = async {
            let mut bytes = Vec::new();
            let mut arrived_at = Vec::new();
            while bytes.len() < CHUNKS as usize * 4 {
                let mut buffer = [0; 64];
                let read_bytes = within(read.read(&mut buffer)).await.expect("the read");
                assert!(read_bytes > 0, "the stream ended early");
                bytes.extend_from_slice(&buffer[..read_bytes]);
                arrived_at.resize(bytes.len() / 4, Instant::now());
            }
            (bytes, arrived_at)
        };
        let (sent_at, (bytes, arrived_at)) = tokio::join!(sending, receiving);
        let indexes: Vec<u32> =
            bytes.chunks(4).map(|chunk| u32::from_be_bytes(chunk.try_into().expect("four bytes"))).collect();
        assert_eq!(indexes, (0..CHUNKS).collect::<Vec<_>>());
        for (index, (sent_at, arrived_at)) in sent_at.iter().zip(&arrived_at).enumerate() {
            let round_trip = *arrived_at - *sent_at;
            assert!(
                round_trip >= ONE_WAY * 2 && round_trip <= ONE_WAY * 2 + SLACK,
                "chunk {index} came back after {round_trip:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_delay_in_one_direction_leaves_the_other_alone() {
        let (proxy, mut client, mut upstream) = linked().await;
        proxy.set(LinkMode::Delay { one_way_ms: 200, only: Some(Direction::ToClient) });
        let started = Instant::now();
        client.write_all(b"query").await.expect("the client's write");
        assert_eq!(read_exactly(&mut upstream, 5).await, b"query");
        assert!(started.elapsed() < Duration::from_millis(100), "the query was delayed");
        upstream.write_all(b"answer").await.expect("the upstream's write");
        assert_eq!(read_exactly(&mut client, 6).await, b"answer");
        assert!(started.elapsed() >= Duration::from_millis(200), "the answer was not delayed");
    }

    #[tokio::test]
    async fn a_hold_delivers_nothing_until_released_then_everything_in_order() {
        let (proxy, mut client, mut upstream) = linked().await;
        proxy.set(LinkMode::Hold);
        for (up, down) in [(b"one ", b"uno "), (b"two ", b"dos "), (b"six ", b"seis")] {
            client.write_all(up).await.expect("the client's write");
            upstream.write_all(down).await.expect("the upstream's write");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        nothing_arrives(&mut upstream).await;
        nothing_arrives(&mut client).await;
        proxy.set(LinkMode::Pass);
        assert_eq!(read_exactly(&mut upstream, 12).await, b"one two six ");
        assert_eq!(read_exactly(&mut client, 12).await, b"uno dos seis");
    }

    #[tokio::test]
    async fn a_hold_beyond_its_buffer_cuts_the_connection() {
        let (proxy, mut client, mut upstream) = linked().await;
        proxy.set(LinkMode::Hold);
        // The write may fail once the proxy has cut the connection.
        let _ = within(client.write_all(&vec![7; QUEUED_BYTES_MAX + 1])).await;
        reset_seen(&mut upstream).await;
        reset_seen(&mut client).await;
        let counts = proxy.counts();
        assert_eq!((counts.connections_cut, counts.hold_overflows, counts.bytes_to_upstream), (1, 1, 0));
    }

    #[tokio::test]
    async fn a_cut_resets_open_connections_and_refuses_new_ones_until_the_link_passes_again() {
        let proxy = echo_proxy().await;
        let mut open = connect(&proxy).await;
        round_trip(&mut open, b"before").await;
        proxy.set(LinkMode::Cut);
        reset_seen(&mut open).await;
        reset_seen(&mut connect(&proxy).await).await;
        proxy.set(LinkMode::Pass);
        round_trip(&mut connect(&proxy).await, b"after").await;
        let counts = proxy.counts();
        assert_eq!((counts.connections_accepted, counts.connections_refused, counts.connections_cut), (3, 1, 1));
    }

    #[tokio::test]
    async fn a_dropped_proxy_closes_its_connections_and_its_port() {
        let proxy = echo_proxy().await;
        let address = proxy.local_addr();
        let mut open = connect(&proxy).await;
        round_trip(&mut open, b"before").await;
        drop(proxy);
        let read = within(open.read(&mut [0; 64])).await;
        assert!(matches!(read, Ok(0) | Err(_)), "the connection outlived its proxy: {read:?}");
        // The listener closes when the aborted task is dropped, at the runtime's next turn.
        within(async {
            while TcpStream::connect(address).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
    }
}
