//! Store hosts over the network: every call answers as the memory store itself would, many
//! calls share one connection, a slow host times calls out, a failover loses exactly the
//! writes of its window, a host that loses its data comes back empty, bad frames break nothing,
//! and a client outlives a crashed, restarted or partitioned host (in turmoil).

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tcore_engine::domain::{
    AdmissionPolicy, Concert, FenceToken, QueueOrder, Schedule, SeatStatus, Section, StoredResponse, WriteGuard,
};
use tcore_engine::store::{
    AuditEntry, CacheStore, HoldRequest, MemoryStore, MemoryStoreConfig, RecordStore, SeatFilter, StoreError,
};
use tcore_sim::world::store_rpc::{
    Accept, FailoverError, JournalClock, RemoteStore, RemoteStoreConfig, Replication, SemiSync, StoreControl,
    StoreHostConfig, serve_store,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

const SEED: u64 = 7;
const PORT: u16 = 7000;
const HOLD_TTL_MS: u64 = 60_000;
const SEATS_PER_USER_MAX: u32 = 100;
const IDEMPOTENCY_TTL_MS: u64 = 86_400_000;
/// A computed rate that serde_json's default float parsing would bring back one ulp off.
const AWKWARD_RATE_PER_S: f64 = 3.0 * 0.37 + 0.123456789;

/// A host that answers at once (asynchronous replication): these tests are about the wire and
/// the journal; the semi-sync ones set their own.
fn host_config(clock: JournalClock) -> StoreHostConfig {
    StoreHostConfig {
        store: MemoryStoreConfig { seed: SEED, ..MemoryStoreConfig::default() },
        replication: Replication::Async,
        clock,
        ..StoreHostConfig::default()
    }
}

/// A semi-sync host whose standby is `leg` away, each way.
fn semi_sync_config(leg: Duration) -> StoreHostConfig {
    StoreHostConfig {
        replication: Replication::SemiSync(SemiSync { leg_latency: leg..=leg, seed: SEED }),
        failovers_max: 1,
        ..host_config(JournalClock::Tokio)
    }
}

fn schedule(id: u64, seats: u32) -> Schedule {
    Schedule {
        id,
        concert: Concert { id: 1, name: "Test".into() },
        opens_at_ms: 0,
        sections: vec![Section { name: "A".into(), price_points: 100, seats_count: seats }],
    }
}

fn hold(seat_id: u64, user_id: u64) -> HoldRequest {
    HoldRequest {
        schedule_id: 1,
        seat_id,
        user_id,
        hold_ttl_ms: HOLD_TTL_MS,
        node: "engine-1".into(),
        seats_per_user_max: SEATS_PER_USER_MAX,
    }
}

/// Connections handed over in memory: tokio's paused clock only moves when every task waits,
/// which real sockets would break.
struct MemoryListener {
    incoming: mpsc::UnboundedReceiver<DuplexStream>,
}

impl Accept for MemoryListener {
    type Stream = DuplexStream;

    async fn accept(&mut self) -> io::Result<DuplexStream> {
        self.incoming.recv().await.ok_or_else(|| io::Error::other("no more connections"))
    }
}

/// A store host served in memory, and a client of it.
struct Harness {
    control: StoreControl,
    store: RemoteStore,
    connections: Arc<AtomicUsize>,
}

fn in_memory(host: StoreHostConfig, client: RemoteStoreConfig) -> Harness {
    let control = StoreControl::new(host);
    let (connect, incoming) = mpsc::unbounded_channel();
    tokio::spawn(serve_store(MemoryListener { incoming }, control.clone()));
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    let store = RemoteStore::new(client, move || {
        counted.fetch_add(1, Ordering::Relaxed);
        let (client_end, server_end) = tokio::io::duplex(64 * 1024);
        let sent = connect.send(server_end).map(|()| client_end);
        async move { sent.map_err(|_| io::Error::from(io::ErrorKind::ConnectionRefused)) }
    });
    Harness { control, store, connections }
}

/// A store host on loopback TCP, and a client of it that counts its connections.
async fn on_loopback(host: StoreHostConfig) -> Harness {
    let control = StoreControl::new(host);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(serve_store(listener, control.clone()));
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    let store = RemoteStore::new(RemoteStoreConfig::default(), move || {
        counted.fetch_add(1, Ordering::Relaxed);
        tokio::net::TcpStream::connect(address)
    });
    Harness { control, store, connections }
}

/// Runs one call of every kind, the refused ones included, and writes down each answer.
async fn every_call(record: &dyn RecordStore, cache: &dyn CacheStore) -> Vec<String> {
    let mut answers = Vec::new();
    macro_rules! step {
        ($call:expr) => {
            answers.push(format!("{} => {:?}", stringify!($call), $call.await))
        };
    }
    step!(record.ping());
    step!(record.put_schedule(schedule(1, 4)));
    step!(record.put_schedule(schedule(1, 4)));
    step!(record.schedules(0));
    step!(record.schedule(1));
    step!(record.schedule(9));
    step!(record.create_user("ada".into(), 500, 0));
    step!(record.create_user("bob".into(), 50, 0));
    step!(record.top_up(1, 100, "top-up-1".into(), 1));
    step!(record.top_up(2, 100, "top-up-1".into(), 1));
    step!(record.top_up(2, 0, "top-up-2".into(), 1));
    step!(record.try_hold(hold(1, 1), 10));
    step!(record.try_hold(hold(1, 2), 11));
    step!(record.try_hold(hold(9, 2), 11));
    step!(record.seat(1, 1, None));
    step!(record.seat(1, 1, Some(FenceToken(9))));
    step!(record.seat_map(1, SeatFilter::default(), 12));
    step!(record.seat_map(
        1,
        SeatFilter { status: Some(SeatStatus::Available), limit: Some(2), ..SeatFilter::default() },
        12
    ));
    step!(record.confirm(1, 2, None, 13));
    step!(record.confirm(1, 1, Some("pay-1".into()), 14));
    step!(record.confirm(1, 1, Some("pay-1".into()), 15));
    step!(record.try_hold(hold(2, 2), 20));
    step!(record.confirm(2, 2, None, 21));
    step!(record.write_hold(hold(3, 2), WriteGuard::Fenced(FenceToken(1)), 22));
    step!(record.write_hold(hold(3, 1), WriteGuard::Fenced(FenceToken(1)), 23));
    step!(record.expire_holds(HOLD_TTL_MS + 30, 10));
    step!(record.cancel(1, 1, 100_000));
    step!(record.cancel(1, 1, 100_001));
    step!(record.reservation(1));
    step!(record.reservation(99));
    step!(record.idempotency_begin("key".into(), [1; 32], 5_000, IDEMPOTENCY_TTL_MS, 100));
    step!(record.idempotency_begin("key".into(), [1; 32], 5_000, IDEMPOTENCY_TTL_MS, 101));
    step!(record.idempotency_begin("key".into(), [2; 32], 5_000, IDEMPOTENCY_TTL_MS, 101));
    step!(record.idempotency_renew("key".into(), [1; 32], 5_000, 101));
    step!(record.idempotency_renew("key".into(), [2; 32], 5_000, 101));
    step!(record.idempotency_begin("key".into(), [1; 32], 5_000, IDEMPOTENCY_TTL_MS, 5_100));
    let response = StoredResponse { status: 201, content_type: "application/json".into(), body: b"{}".to_vec() };
    step!(record.idempotency_complete("key".into(), [1; 32], response, IDEMPOTENCY_TTL_MS, 102));
    step!(record.idempotency_begin("key".into(), [1; 32], 5_000, IDEMPOTENCY_TTL_MS, 103));
    step!(record.idempotency_renew("key".into(), [1; 32], 5_000, 104));
    step!(record.idempotency_begin("other".into(), [3; 32], 5_000, IDEMPOTENCY_TTL_MS, 103));
    step!(record.idempotency_release("other".into(), [3; 32]));
    step!(record.idempotency_begin("other".into(), [4; 32], 5_000, IDEMPOTENCY_TTL_MS, 104));
    step!(record.outbox_pending(100));
    step!(record.outbox_mark_sent(vec![1, 2]));
    step!(record.outbox_pending(2));
    let entry = AuditEntry {
        at_ms: 5,
        node: "node-1".into(),
        actor: "agent".into(),
        action: "set_admission".into(),
        target: "schedule 1".into(),
        before: serde_json::json!({ "rate_per_s": 200.0 }),
        after: serde_json::json!({ "rate_per_s": AWKWARD_RATE_PER_S, "paused": false, "steps": [-1, 2] }),
        outcome: "applied".into(),
    };
    step!(record.append_audit(entry));
    step!(record.audit(10));
    step!(record.account(1));
    step!(record.account(42));
    step!(record.dump());

    let policy = AdmissionPolicy { rate_per_s: 2.0, active_max: 10, ..AdmissionPolicy::default() };
    step!(cache.ping());
    step!(cache.create_line(1, 0, QueueOrder::Fifo, policy));
    step!(cache.create_line(2, 1_000, QueueOrder::RandomAtOpen, policy));
    for user_id in 1..=6 {
        step!(cache.join(2, user_id, 10 * user_id));
    }
    step!(cache.join(1, 1, 10));
    step!(cache.join(1, 2, 10));
    step!(cache.join(9, 1, 10));
    step!(cache.admit(1, 1_000));
    step!(cache.admit(2, 3_000));
    step!(cache.queue_status(1, 1, 1_001));
    step!(cache.queue_status(1, 99, 1_001));
    step!(cache.queue_status(2, 3, 3_001));
    step!(cache.mark_used(1, 1, 1_002));
    step!(cache.mark_used(1, 1, 1_003));
    step!(cache.admission_policy(1));
    step!(cache.set_admission_policy(1, AdmissionPolicy { rate_per_s: AWKWARD_RATE_PER_S, ..policy }));
    step!(cache.admission_policy(1));
    step!(cache.set_admission_policy(9, policy));
    step!(cache.admissions());
    step!(cache.acquire_lock("seat:1".into(), 100, 0));
    step!(cache.acquire_lock("seat:1".into(), 100, 50));
    step!(cache.release_lock("seat:1".into(), FenceToken(1)));
    step!(cache.acquire_lock("seat:1".into(), 100, 60));
    answers
}

#[tokio::test]
async fn every_call_round_trips_like_the_memory_store() {
    let direct = MemoryStore::new(host_config(JournalClock::Tokio).store);
    let expected = every_call(&direct, &direct).await;
    let harness = on_loopback(host_config(JournalClock::Tokio)).await;
    let answers = every_call(&harness.store, &harness.store).await;
    assert_eq!(answers.len(), expected.len());
    for (answer, expected) in answers.iter().zip(&expected) {
        assert_eq!(answer, expected);
    }
    assert!(expected.iter().any(|answer| answer.contains("NotOwner")), "the script covers refusals");
    assert_eq!(harness.connections.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_over_one_connection_are_matched_by_id() {
    const USERS: u64 = 2_000;
    let harness = on_loopback(host_config(JournalClock::Tokio)).await;
    for user_id in 1..=USERS {
        harness.control.create_user(format!("user-{user_id}"), user_id, 0).await.expect("seed user");
    }
    let store = Arc::new(harness.store);
    let mut calls = JoinSet::new();
    for user_id in 1..=USERS {
        let store = store.clone();
        calls.spawn(async move {
            let topped = store.top_up(user_id, 1, format!("key-{user_id}"), 1).await.expect("top up");
            let account = store.account(user_id).await.expect("account");
            (user_id, topped, account)
        });
    }
    while let Some(joined) = calls.join_next().await {
        let (user_id, topped, account) = joined.expect("call task");
        assert_eq!(topped.user_id, user_id);
        assert_eq!(account.name, format!("user-{user_id}"));
        assert_eq!(account.balance, user_id + 1);
    }
    assert_eq!(harness.connections.load(Ordering::Relaxed), 1, "every call shared one connection");
}

#[tokio::test(start_paused = true)]
async fn a_call_held_past_its_timeout_is_unavailable_and_the_next_works() {
    let client = RemoteStoreConfig { call_timeout: Duration::from_secs(2), ..RemoteStoreConfig::default() };
    let harness = in_memory(host_config(JournalClock::Tokio), client);
    RecordStore::ping(&harness.store).await.expect("a fast store answers");

    harness.control.set_extra_latency(Duration::from_secs(3));
    let started = tokio::time::Instant::now();
    let late = harness.store.create_user("late".into(), 0, 0).await;
    assert!(matches!(late, Err(StoreError::Unavailable { .. })), "{late:?}");
    assert_eq!(started.elapsed(), Duration::from_secs(2), "the call gave up at its timeout");

    harness.control.set_extra_latency(Duration::ZERO);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let account = harness.store.account(1).await.expect("the store answers again");
    assert_eq!(account.name, "late", "the timed-out call ran after all: its outcome was unknown, not failed");
}

/// Most requests are answered at once on the connection's own task; one that has to wait (here
/// a slow store) goes on in a task of its own, and the requests behind it are not held up.
#[tokio::test(start_paused = true)]
async fn a_slow_request_holds_up_no_other_on_its_connection() {
    let harness = in_memory(host_config(JournalClock::Tokio), RemoteStoreConfig::default());
    RecordStore::ping(&harness.store).await.expect("a fast store answers");
    let store = Arc::new(harness.store);
    harness.control.set_extra_latency(Duration::from_secs(1));
    let started = tokio::time::Instant::now();
    let slow = tokio::spawn({
        let store = store.clone();
        async move { store.create_user("slow".into(), 0, 0).await }
    });
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    harness.control.set_extra_latency(Duration::ZERO);
    RecordStore::ping(&*store).await.expect("the next request is answered");
    assert_eq!(started.elapsed(), Duration::ZERO, "not held up behind the slow one");
    assert!(!slow.is_finished(), "the slow request is still waiting");
    let account = slow.await.expect("no panic").expect("the slow request is answered too");
    assert_eq!(account.name, "slow");
    assert_eq!(started.elapsed(), Duration::from_secs(1));
    assert_eq!(harness.connections.load(Ordering::Relaxed), 1, "both went over one connection");
}

#[tokio::test(start_paused = true)]
async fn failover_loses_the_writes_of_the_last_window_and_keeps_older_ones() {
    let harness = in_memory(host_config(JournalClock::Tokio), RemoteStoreConfig::default());
    let store = &harness.store;
    store.put_schedule(schedule(1, 3)).await.expect("schedule");
    store.create_user("ada".into(), 1_000, 0).await.expect("user");
    store.try_hold(hold(1, 1), 0).await.expect("hold at 0 s");
    tokio::time::sleep(Duration::from_secs(5)).await;
    store.try_hold(hold(2, 1), 5_000).await.expect("hold at 5 s");
    tokio::time::sleep(Duration::from_millis(4_500)).await;
    store.try_hold(hold(3, 1), 9_500).await.expect("hold at 9.5 s");
    tokio::time::sleep(Duration::from_millis(500)).await;

    let report = harness.control.fail_over(Duration::from_secs(1)).outcome().await.expect("failover");
    assert_eq!((report.writes_replayed, report.writes_lost), (4, 1));

    let dump = store.dump().await.expect("dump");
    let reservations: Vec<_> = dump.reservations.iter().map(|r| (r.id, r.seat_id)).collect();
    assert_eq!(reservations, vec![(1, 1), (2, 2)], "the hold of 9.5 s is gone, the older ones remain");
    let again = store.try_hold(hold(3, 1), 10_000).await.expect("seat 3 is free again");
    assert_eq!(again.id, 3, "the store continues from the promoted state");
}

#[tokio::test(start_paused = true)]
async fn a_host_that_loses_its_data_comes_back_empty_and_says_what_it_held() {
    let harness = in_memory(host_config(JournalClock::Tokio), RemoteStoreConfig::default());
    let store = &harness.store;
    store.create_line(1, 0, QueueOrder::Fifo, AdmissionPolicy::default()).await.expect("line");
    let first = store.join(1, 7, 0).await.expect("user 7 joins");
    store.join(1, 8, 0).await.expect("user 8 joins");
    let mut ticket = harness.control.lose_data();
    assert!(ticket.try_outcome().is_none(), "it runs on the host, at its next request");

    let lost = store.queue_status(1, first.seq, 0).await;
    assert!(matches!(lost, Err(StoreError::NotFound { entity: "schedule", .. })), "{lost:?}");
    let report = ticket.try_outcome().expect("the loss ran before the request");
    assert_eq!((report.writes_lost, report.admissions_lost), (3, 0), "a line and two places");
    store.create_line(1, 0, QueueOrder::Fifo, AdmissionPolicy::default()).await.expect("the line again");
    let again = store.join(1, 8, 0).await.expect("user 8 joins again");
    assert_eq!(again.seq, first.seq, "the new line hands its places out anew");
}

#[tokio::test(start_paused = true)]
async fn failover_is_refused_beyond_the_journal_or_the_standbys() {
    let host = StoreHostConfig {
        replication_window: Duration::from_secs(2),
        failovers_max: 1,
        ..host_config(JournalClock::Tokio)
    };
    let harness = in_memory(host, RemoteStoreConfig::default());
    let control = &harness.control;
    control.create_user("a".into(), 0, 0).await.expect("write at 0 s");
    tokio::time::sleep(Duration::from_secs(5)).await;
    control.create_user("b".into(), 0, 5_000).await.expect("write at 5 s: the one at 0 s reaches the standby");

    let beyond = control.fail_over(Duration::from_secs(6)).outcome().await;
    assert_eq!(
        beyond,
        Err(FailoverError::BeyondJournal { lose_last: Duration::from_secs(6), journal_covers: Duration::from_secs(5) })
    );
    let nothing_lost = control.fail_over(Duration::ZERO).outcome().await.expect("a failover that loses nothing");
    assert_eq!((nothing_lost.writes_lost, nothing_lost.failovers_left), (0, 1));

    tokio::time::sleep(Duration::from_millis(500)).await;
    let first = control.fail_over(Duration::from_secs(1)).outcome().await.expect("first failover");
    assert_eq!((first.writes_lost, first.failovers_left), (1, 0));
    control.create_user("c".into(), 0, 6_000).await.expect("write after the failover");
    assert_eq!(control.dump().await.expect("dump").accounts.len(), 2, "b was lost, c took its id");
    let second = control.fail_over(Duration::from_secs(1)).outcome().await;
    assert_eq!(second, Err(FailoverError::NoStandbyLeft { failovers_max: 1 }));
    assert_eq!(control.dump().await.expect("dump").accounts.len(), 2, "a refused failover changes nothing");
}

#[tokio::test(start_paused = true)]
async fn semi_sync_answers_a_write_once_the_standby_holds_it_and_a_failover_keeps_it() {
    let harness = in_memory(semi_sync_config(Duration::from_millis(2)), RemoteStoreConfig::default());
    let started = tokio::time::Instant::now();
    harness.store.create_user("ada".into(), 1_000, 0).await.expect("user");
    assert_eq!(started.elapsed(), Duration::from_millis(4), "one round trip to the standby");
    let report = harness.control.fail_over(Duration::from_secs(1)).outcome().await.expect("failover");
    assert_eq!(report.writes_lost, 0, "the standby held the acknowledged write");
    assert_eq!(harness.store.account(1).await.expect("kept").name, "ada");
}

#[tokio::test(start_paused = true)]
async fn semi_sync_loses_only_a_write_in_flight_and_answers_it_unavailable() {
    let harness = in_memory(semi_sync_config(Duration::from_millis(2)), RemoteStoreConfig::default());
    harness.store.create_user("ada".into(), 1_000, 0).await.expect("user");
    let store = Arc::new(harness.store);
    let writing = tokio::spawn({
        let store = store.clone();
        async move { store.create_user("bob".into(), 0, 0).await }
    });
    // The primary has bob; the standby will hear of him 4 ms after.
    tokio::time::sleep(Duration::from_millis(1)).await;
    let report = harness.control.fail_over(Duration::from_secs(1)).outcome().await.expect("failover");
    assert_eq!((report.writes_replayed, report.writes_lost, report.calls_cut_off), (1, 1, 1));
    let answer = writing.await.expect("no panic");
    assert!(matches!(answer, Err(StoreError::Unavailable { .. })), "a lost write is never acknowledged: {answer:?}");
    let names: Vec<String> = store.dump().await.expect("dump").accounts.into_iter().map(|a| a.name).collect();
    assert_eq!(names, ["ada"]);
}

/// Writes one raw frame.
async fn write_raw(stream: &mut tokio::net::TcpStream, body: &[u8]) {
    let length = u32::try_from(body.len()).expect("small frame");
    stream.write_all(&length.to_be_bytes()).await.expect("write length");
    stream.write_all(body).await.expect("write body");
}

/// Reads one raw frame, `None` at the end of the stream.
async fn read_raw(stream: &mut tokio::net::TcpStream) -> Option<String> {
    let mut length = [0; 4];
    stream.read_exact(&mut length).await.ok()?;
    let mut body = vec![0; usize::try_from(u32::from_be_bytes(length)).expect("length")];
    stream.read_exact(&mut body).await.ok()?;
    Some(String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn bad_frames_are_refused_or_close_the_connection_without_a_panic() {
    let control = StoreControl::new(host_config(JournalClock::Tokio));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(serve_store(listener, control.clone()));

    let mut raw = tokio::net::TcpStream::connect(address).await.expect("connect");
    // Frames are postcard: the id as a varint (7), then the request's variant index, here 255,
    // which names no request.
    write_raw(&mut raw, &[7, 0xFF, 0x01]).await;
    let answer = read_raw(&mut raw).await.expect("an answer to a request that does not decode");
    assert_eq!(answer.as_bytes().first(), Some(&7), "the answer carries the request's id: {answer:?}");
    assert!(answer.contains("undecodable request"), "{answer:?}");
    // Eleven continuation bytes are no u64 varint: the frame has no id to answer.
    write_raw(&mut raw, &[0xFF; 11]).await;
    assert_eq!(read_raw(&mut raw).await, None, "a frame without an id closes the connection");

    let mut raw = tokio::net::TcpStream::connect(address).await.expect("connect");
    raw.write_all(&u32::MAX.to_be_bytes()).await.expect("write length");
    assert_eq!(read_raw(&mut raw).await, None, "an oversized frame closes the connection");

    // A host that answers garbage: the client's call fails, unknown outcome, no panic.
    let liar = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let liar_address = liar.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = liar.accept().await {
            let _request = read_raw(&mut stream).await;
            write_raw(&mut stream, br#"{"id":1,"response":{"Nonsense":[]}}"#).await;
        }
    });
    let client = RemoteStore::new(RemoteStoreConfig::default(), move || tokio::net::TcpStream::connect(liar_address));
    let answer = RecordStore::ping(&client).await;
    assert!(matches!(answer, Err(StoreError::Unavailable { .. })), "{answer:?}");
    assert!(RecordStore::ping(&control).await.is_ok(), "the real host still serves");
}

/// A simulation with a store host and one client; `client` runs the test's steps and
/// `between_steps` may inject faults from outside.
fn simulate<F, Fut>(control: StoreControl, client: F, mut between_steps: impl FnMut(&mut turmoil::Sim<'_>))
where
    F: FnOnce(RemoteStore) -> Fut + 'static,
    Fut: Future<Output = turmoil::Result> + 'static,
{
    let mut sim = turmoil::Builder::new()
        .rng_seed(SEED)
        .simulation_duration(Duration::from_secs(60))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(1))
        .build();
    sim.host("store", move || {
        let control = control.clone();
        async move {
            let listener = turmoil::net::TcpListener::bind(("0.0.0.0", PORT)).await?;
            serve_store(listener, control).await;
            Ok(())
        }
    });
    sim.client("engine", async move {
        let store =
            RemoteStore::new(RemoteStoreConfig::default(), || turmoil::net::TcpStream::connect(("store", PORT)));
        client(store).await
    });
    loop {
        let done = sim.step().unwrap_or_else(|error| panic!("simulation with seed {SEED} failed: {error}"));
        if done {
            break;
        }
        between_steps(&mut sim);
    }
}

async fn sleep_until_s(seconds: f64) {
    let now = turmoil::sim_elapsed().unwrap_or_default();
    tokio::time::sleep(Duration::from_secs_f64(seconds).saturating_sub(now)).await;
}

#[test]
fn failover_in_the_simulation_loses_the_last_second_of_holds() {
    let control = StoreControl::new(host_config(JournalClock::Simulation));
    let failover = control.clone();
    simulate(
        control,
        move |store| async move {
            store.put_schedule(schedule(1, 3)).await?;
            store.create_user("ada".into(), 1_000, 0).await?;
            store.try_hold(hold(1, 1), 0).await?;
            sleep_until_s(5.0).await;
            store.try_hold(hold(2, 1), 5_000).await?;
            sleep_until_s(9.5).await;
            store.try_hold(hold(3, 1), 9_500).await?;
            sleep_until_s(10.0).await;
            let report = failover.fail_over(Duration::from_secs(1)).outcome().await?;
            assert_eq!(report.writes_lost, 1, "seed {SEED}: {report:?}");
            // The failover closed the connection, whose peer was the old primary; once the
            // client has seen it close, its next call connects to the promoted standby.
            sleep_until_s(10.1).await;
            let seats: Vec<_> = store.dump().await?.reservations.iter().map(|r| r.seat_id).collect();
            assert_eq!(seats, vec![1, 2], "seed {SEED}");
            Ok(())
        },
        |_| {},
    );
}

#[test]
fn a_client_fails_fast_while_its_store_host_is_down_or_cut_off_and_reconnects_after() {
    let control = StoreControl::new(host_config(JournalClock::Simulation));
    let (mut crashed, mut restarted) = (false, false);
    simulate(
        control,
        |store| async move {
            let ada = store.create_user("ada".into(), 0, 0).await?;

            sleep_until_s(2.0).await; // the host crashed at 1 s
            let down = store.account(ada.user_id).await;
            assert!(matches!(down, Err(StoreError::Unavailable { .. })), "seed {SEED}: {down:?}");

            sleep_until_s(4.0).await; // the host restarted at 3 s, with its data
            assert_eq!(store.account(ada.user_id).await?.name, "ada", "seed {SEED}");

            turmoil::partition("engine", "store");
            let cut_off = store.account(ada.user_id).await;
            assert!(matches!(cut_off, Err(StoreError::Unavailable { .. })), "seed {SEED}: {cut_off:?}");
            turmoil::repair("engine", "store");
            sleep_until_s(8.0).await;
            assert_eq!(store.account(ada.user_id).await?.name, "ada", "seed {SEED}: reconnected after the repair");
            Ok(())
        },
        |sim| {
            let now = sim.elapsed();
            if !crashed && now >= Duration::from_secs(1) {
                sim.crash("store");
                crashed = true;
            }
            if !restarted && now >= Duration::from_secs(3) {
                sim.bounce("store");
                restarted = true;
            }
        },
    );
}
