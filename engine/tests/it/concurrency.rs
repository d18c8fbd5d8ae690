//! Many tasks at once against one engine: holds on contended seats, confirms racing expiry,
//! and points that must never go negative.

use std::sync::Arc;
use std::time::Duration;

use tcore_engine::clock::ManualClock;
use tcore_engine::config::{EngineConfig, HoldMode};
use tcore_engine::domain::ReservationStatus;
use tcore_engine::faults::NoFaults;
use tcore_engine::store::RecordStore;
use tcore_engine::{Engine, EngineError};

use crate::support::{START_MS, config, engine_with, manual_engine, queued_user, schedule, session_of};

async fn admitted_users(
    engine: &Engine,
    clock: &tcore_engine::clock::ManualClock,
    count: u32,
    points: u64,
) -> Vec<(u64, String)> {
    let mut users = Vec::new();
    for index in 0..count {
        users.push(queued_user(engine, &format!("user-{index}"), points).await);
    }
    clock.advance(Duration::from_secs(1));
    engine.tick_admission().await.expect("tick");
    users
}

async fn ten_thousand_holds_on_a_hundred_seats(mode: HoldMode) {
    let (test, clock) = manual_engine(mode);
    let engine = Arc::clone(&test.engine);
    engine.add_schedule(schedule(START_MS, 100)).await.expect("schedule");
    let users = admitted_users(&engine, &clock, 10_000, 0).await;
    let attempts: Vec<_> = users
        .into_iter()
        .enumerate()
        .map(|(index, (_, token))| {
            let engine = Arc::clone(&engine);
            tokio::spawn(
                async move { engine.hold(session_of(&token), Some(&token), 1, (index % 100) as u64 + 1).await },
            )
        })
        .collect();
    let mut granted = 0;
    for attempt in attempts {
        match attempt.await.expect("task") {
            Ok(_) => granted += 1,
            Err(EngineError::SeatTaken | EngineError::SeatLocked) => {}
            Err(other) => panic!("unexpected refusal: {other}"),
        }
    }
    assert_eq!(granted, 100, "exactly one hold per seat");
    let dump = test.store.dump().await.expect("dump");
    let mut held_seats: Vec<u64> =
        dump.reservations.iter().filter(|r| r.status == ReservationStatus::Held).map(|r| r.seat_id).collect();
    held_seats.sort_unstable();
    assert_eq!(held_seats, (1..=100).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_concurrent_atomic_holds_on_a_hundred_seats_grant_exactly_a_hundred() {
    ten_thousand_holds_on_a_hundred_seats(HoldMode::Atomic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_concurrent_fenced_lock_holds_on_a_hundred_seats_grant_exactly_a_hundred() {
    ten_thousand_holds_on_a_hundred_seats(HoldMode::FencedLock).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn confirm_racing_hold_expiry_never_confirms_an_expired_hold() {
    let (test, clock) = manual_engine(HoldMode::Atomic);
    let engine = Arc::clone(&test.engine);
    engine.add_schedule(schedule(START_MS, 300)).await.expect("schedule");
    let users = admitted_users(&engine, &clock, 300, 1_000).await;
    let mut holds = Vec::new();
    for (index, (_, token)) in users.iter().enumerate() {
        holds.push(engine.hold(session_of(token), Some(token), 1, index as u64 + 1).await.expect("hold"));
    }
    // Every hold expires 60 s from now; stand 2 ms before that and let confirms race the
    // clock and the sweeper.
    clock.advance(Duration::from_millis(60_000 - 2));
    let confirms: Vec<_> = users
        .iter()
        .zip(&holds)
        .map(|((_, token), hold)| {
            let (engine, token, id) = (Arc::clone(&engine), token.clone(), hold.id);
            tokio::spawn(async move { engine.confirm(session_of(&token), Some(&token), id, None).await })
        })
        .collect();
    for _ in 0..4 {
        clock.advance(Duration::from_millis(1));
        engine.sweep().await.expect("sweep");
        tokio::task::yield_now().await;
    }
    for confirm in confirms {
        let _ = confirm.await.expect("task");
    }
    engine.sweep().await.expect("sweep");
    let dump = test.store.dump().await.expect("dump");
    let mut confirmed = 0;
    for reservation in &dump.reservations {
        let account = dump.accounts.iter().find(|a| a.user_id == reservation.user_id).expect("account");
        match reservation.status {
            ReservationStatus::Confirmed => {
                confirmed += 1;
                let at = reservation.confirmed_at_ms.expect("confirmed at");
                assert!(at < reservation.expires_at_ms, "confirmed at {at}, expired at {}", reservation.expires_at_ms);
                assert_eq!(account.balance, 900);
            }
            ReservationStatus::Expired => assert_eq!(account.balance, 1_000, "an expired hold takes no points"),
            other => panic!("reservation {} ended {other:?}", reservation.id),
        }
    }
    let sold = engine.schedules().await.expect("schedules")[0].seats_total
        - engine.schedules().await.expect("schedules")[0].seats_available;
    assert_eq!(sold, confirmed, "seats sold match confirmations");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_confirms_never_take_points_below_zero() {
    // One user holds all twenty seats: the seat limit is not what this is about.
    let clock = ManualClock::starting_at_ms(START_MS);
    let config = EngineConfig { seats_per_user_max: 20, ..config(HoldMode::Atomic) };
    let test = engine_with(config, Arc::new(clock.clone()), Arc::new(NoFaults));
    let engine = Arc::clone(&test.engine);
    engine.add_schedule(schedule(START_MS, 20)).await.expect("schedule");
    let users = admitted_users(&engine, &clock, 1, 250).await;
    let token = users[0].1.clone();
    let mut holds = Vec::new();
    for seat in 1..=20 {
        holds.push(engine.hold(session_of(&token), Some(&token), 1, seat).await.expect("hold"));
    }
    let confirms: Vec<_> = holds
        .iter()
        .map(|hold| {
            let (engine, token, id) = (Arc::clone(&engine), token.clone(), hold.id);
            tokio::spawn(async move { engine.confirm(session_of(&token), Some(&token), id, None).await })
        })
        .collect();
    let mut paid = 0;
    for confirm in confirms {
        if confirm.await.expect("task").is_ok() {
            paid += 1;
        }
    }
    assert_eq!(paid, 2, "250 points buy two 100-point seats");
    let dump = test.store.dump().await.expect("dump");
    assert_eq!(dump.accounts[0].balance, 50);
    let ledger_sum: i64 = dump.ledger.iter().map(|entry| entry.delta).sum();
    assert_eq!(ledger_sum, 50, "the ledger sums to the balance");
}
