//! The unsafe mode is caught, the safe modes are not: a lock holder pauses at a fault point
//! past the lock's TTL while another user takes the same seat.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tcore_engine::clock::TokioClock;
use tcore_engine::config::HoldMode;
use tcore_engine::domain::{FenceToken, ReservationStatus};
use tcore_engine::faults::{FaultContext, FaultHook, FaultPoint};
use tcore_engine::store::RecordStore;

use crate::support::{START_MS, config, engine_with, queued_user, schedule};

/// Pauses the first hold that reaches `hold.after_check` (lock taken, seat seen available).
#[derive(Debug)]
struct PauseFirstHolder {
    pause: Duration,
    fired: AtomicBool,
}

impl FaultHook for PauseFirstHolder {
    fn pause_at(&self, point: FaultPoint, _context: &FaultContext) -> Option<Duration> {
        (point == FaultPoint::HoldAfterCheck && !self.fired.swap(true, Ordering::SeqCst)).then_some(self.pause)
    }
}

struct Race {
    confirmed: usize,
    fences: Vec<FenceToken>,
}

/// User A takes seat 1 and pauses 3 s (the lock lives 1 s); 1.5 s in, user B takes seat 1
/// and pays; then A wakes, writes and pays. Returns what the store holds at the end.
async fn race(mode: HoldMode) -> Race {
    let clock = Arc::new(TokioClock::new(START_MS));
    let faults = Arc::new(PauseFirstHolder { pause: Duration::from_secs(3), fired: AtomicBool::new(false) });
    let test = engine_with(config(mode), clock, faults);
    let engine = Arc::clone(&test.engine);
    engine.add_schedule(schedule(START_MS, 1)).await.expect("schedule");
    let (_, token_a) = queued_user(&engine, "a", 1_000).await;
    let (_, token_b) = queued_user(&engine, "b", 1_000).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    engine.tick_admission().await.expect("tick");

    let slow_engine = Arc::clone(&engine);
    let slow = tokio::spawn(async move {
        let reservation = slow_engine.hold(Some(&token_a), 1, 1).await?;
        slow_engine.confirm(Some(&token_a), reservation.id, None).await
    });
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    if let Ok(reservation) = engine.hold(Some(&token_b), 1, 1).await {
        engine.confirm(Some(&token_b), reservation.id, None).await.expect("B pays for the seat it holds");
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
    let race = race(HoldMode::UnfencedLock).await;
    assert_eq!(race.confirmed, 2, "the known-unsafe mode oversells");
    assert_eq!(race.fences, vec![FenceToken(2), FenceToken(1)], "the stale writer's fence went backwards");
}

#[tokio::test(start_paused = true)]
async fn fenced_lock_refuses_the_paused_holders_stale_write() {
    let race = race(HoldMode::FencedLock).await;
    assert_eq!(race.confirmed, 1);
    assert_eq!(race.fences, vec![FenceToken(2)]);
}

#[tokio::test(start_paused = true)]
async fn atomic_holds_never_sell_a_seat_twice() {
    let race = race(HoldMode::Atomic).await;
    assert_eq!(race.confirmed, 1);
    assert_eq!(race.fences, vec![FenceToken(1)]);
}
