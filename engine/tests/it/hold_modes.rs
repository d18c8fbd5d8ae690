//! The unsafe mode is caught, the safe modes are not: a lock holder pauses at a fault point
//! past the lock's TTL while another user takes the same seat.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use tcore_engine::clock::TokioClock;
use tcore_engine::config::HoldMode;
use tcore_engine::domain::{FenceToken, ReservationStatus};
use tcore_engine::faults::{FaultContext, FaultHook, FaultPoint, NoFaults};
use tcore_engine::store::{MemoryStore, MemoryStoreConfig, RecordStore};
use tcore_engine::{Engine, EngineError, EngineParts};

use crate::support::{RecordTap, START_MS, Tapped, config, engine_with, session_of, two_admitted_for_one_seat};

/// Pauses the first `holders` holds that reach `hold.after_check` (lock taken, seat seen
/// available).
#[derive(Debug)]
pub struct PauseFirstHolders {
    pub pause: Duration,
    pub holders: AtomicU32,
}

impl FaultHook for PauseFirstHolders {
    fn pause_at(&self, point: FaultPoint, _context: &FaultContext) -> Option<Duration> {
        let take = |left: u32| left.checked_sub(1);
        (point == FaultPoint::HoldAfterCheck
            && self.holders.fetch_update(Ordering::SeqCst, Ordering::SeqCst, take).is_ok())
        .then_some(self.pause)
    }
}

struct Race {
    confirmed: usize,
    fences: Vec<FenceToken>,
}

/// User A takes seat 1 and pauses 3 s (the lock lives 1 s); 1.5 s in, user B takes seat 1
/// (and pauses 3 s too when `paused_holders` is 2) and pays; A wakes, writes and pays.
/// Returns what the store holds at the end.
async fn race(mode: HoldMode, paused_holders: u32) -> Race {
    let clock = Arc::new(TokioClock::new(START_MS));
    let faults = Arc::new(PauseFirstHolders { pause: Duration::from_secs(3), holders: AtomicU32::new(paused_holders) });
    let test = engine_with(config(mode), clock, faults);
    let engine = Arc::clone(&test.engine);
    let (token_a, token_b) = two_admitted_for_one_seat(&engine, Duration::from_secs(1)).await;

    let slow_engine = Arc::clone(&engine);
    let slow = tokio::spawn(async move {
        let reservation = slow_engine.hold(session_of(&token_a), Some(&token_a), 1, 1).await?;
        slow_engine.confirm(session_of(&token_a), Some(&token_a), reservation.id, None).await
    });
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    if let Ok(reservation) = engine.hold(session_of(&token_b), Some(&token_b), 1, 1).await {
        let _ = engine.confirm(session_of(&token_b), Some(&token_b), reservation.id, None).await;
    }
    let _ = slow.await.expect("task");

    let dump = test.store.dump().await.expect("dump");
    Race {
        confirmed: dump
            .reservations
            .iter()
            .filter(|r| r.seat_id == 1 && r.status == ReservationStatus::Confirmed)
            .count(),
        fences: dump.fences.iter().filter(|f| f.seat_id == 1).map(|f| f.fence).collect(),
    }
}

#[tokio::test(start_paused = true)]
async fn unfenced_lock_sells_one_seat_twice_when_the_holder_pauses_past_its_ttl() {
    let race = race(HoldMode::UnfencedLock, 1).await;
    assert_eq!(race.confirmed, 2, "the known-unsafe mode oversells");
    assert_eq!(race.fences, vec![FenceToken(2), FenceToken(1)], "the stale writer's fence went backwards");
}

#[tokio::test(start_paused = true)]
async fn fenced_lock_refuses_the_paused_holders_stale_write() {
    let race = race(HoldMode::FencedLock, 1).await;
    assert_eq!(race.confirmed, 1);
    assert_eq!(race.fences, vec![FenceToken(2)]);
}

#[tokio::test(start_paused = true)]
async fn atomic_holds_never_sell_a_seat_twice() {
    let race = race(HoldMode::Atomic, 1).await;
    assert_eq!(race.confirmed, 1);
    assert_eq!(race.fences, vec![FenceToken(1)]);
}

#[tokio::test(start_paused = true)]
async fn two_paused_lock_holders_oversell_unfenced() {
    let race = race(HoldMode::UnfencedLock, 2).await;
    assert_eq!(race.confirmed, 2);
}

#[tokio::test(start_paused = true)]
async fn a_fenced_read_stops_an_older_holder_whose_lock_ran_out() {
    // B read the seat with fence 2 while A slept on fence 1: A's later write is stale, even
    // though B has not written yet.
    let race = race(HoldMode::FencedLock, 2).await;
    assert_eq!(race.confirmed, 1);
    assert_eq!(race.fences, vec![FenceToken(2)]);
}

/// The first seat read under a lock takes `delay`: a slow store call, while the node itself
/// keeps running.
#[derive(Debug)]
struct SlowFirstLockedRead {
    delay: Duration,
    slowed: AtomicBool,
}

#[async_trait::async_trait]
impl RecordTap for SlowFirstLockedRead {
    async fn before_seat(&self) {
        if !self.slowed.swap(true, Ordering::SeqCst) {
            tokio::time::sleep(self.delay).await;
        }
    }
}

/// A holds seat 1 under its lock (TTL 1 s) while its seat read takes 3 s; 1.5 s in, B tries
/// the same seat. The watchdog keeps A's lock alive through the slow call, so B meets the
/// lock and A's write stands.
#[tokio::test(start_paused = true)]
async fn the_lock_watchdog_keeps_a_slow_holders_lock() {
    let clock = Arc::new(TokioClock::new(START_MS));
    let inner = Arc::new(MemoryStore::new(MemoryStoreConfig { seed: 7, ..MemoryStoreConfig::default() }));
    let record = Arc::new(Tapped {
        inner: Arc::clone(&inner) as Arc<dyn RecordStore>,
        tap: SlowFirstLockedRead { delay: Duration::from_secs(3), slowed: AtomicBool::new(false) },
    });
    let engine = Engine::new(EngineParts {
        config: config(HoldMode::FencedLock),
        clock,
        record,
        cache: inner.clone(),
        faults: Arc::new(NoFaults),
    })
    .expect("config");
    let (token_a, token_b) = two_admitted_for_one_seat(&engine, Duration::from_secs(1)).await;

    let slow_engine = Arc::clone(&engine);
    let slow = tokio::spawn(async move { slow_engine.hold(session_of(&token_a), Some(&token_a), 1, 1).await });
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let second = engine.hold(session_of(&token_b), Some(&token_b), 1, 1).await;
    assert!(matches!(second, Err(EngineError::SeatLocked)), "the renewed lock is still held: {second:?}");
    let first = slow.await.expect("task").expect("the slow holder keeps its lock and its write stands");
    assert_eq!(first.fence, FenceToken(1));
    let dump = inner.dump().await.expect("dump");
    let fences: Vec<FenceToken> = dump.fences.iter().map(|fence| fence.fence).collect();
    assert_eq!(fences, vec![FenceToken(1)]);
}
