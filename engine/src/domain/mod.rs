//! The ticketing domain: catalogue, seats, holds with fencing tokens, reservations, points,
//! queue tokens, idempotency records and outbox events.
//!
//! **Invariant:** this module does no IO, reads no clock and draws no randomness: every
//! function that depends on time takes `now_ms`, and every random choice takes an RNG.
//! Illegal transitions are rejected with a typed [`TransitionError`].

mod catalog;
mod points;
mod queue;
mod rate;
mod reservation;

pub use catalog::{Concert, Schedule, ScheduleSummary, Seat, SeatStatus, SeatView, Section};
pub use points::{Account, CHARGE_POINTS_MAX, LedgerEntry, LedgerReason};
pub use queue::{AdmissionPolicy, Admitted, QueueEntry, QueueOrder, QueueStatus, TokenStatus, WaitingLine};
pub use rate::RateLimit;
pub use reservation::{FenceToken, Reservation, ReservationStatus, SeatLimit, SeatSlot, WriteGuard, takes_a_seat};

use serde::{Deserialize, Serialize};

/// Identifies a schedule (one performance of a concert).
pub type ScheduleId = u64;
/// Identifies a seat; unique across schedules.
pub type SeatId = u64;
/// Identifies a user.
pub type UserId = u64;
/// Identifies a reservation.
pub type ReservationId = u64;

/// A transition the domain refuses, with the state it was refused in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    #[error("reservation is {status:?}, not HELD")]
    NotHeld { status: ReservationStatus },
    #[error("the hold expired at {expires_at_ms} ms (now {now_ms} ms)")]
    HoldExpired { expires_at_ms: u64, now_ms: u64 },
    #[error("the hold has not expired yet")]
    HoldStillValid,
    #[error("reservation is already {status:?}")]
    AlreadyFinal { status: ReservationStatus },
    #[error("fence {presented} is stale: the seat's current fence is {current}")]
    StaleFence { presented: u64, current: u64 },
    #[error("not enough points: balance {balance}, needed {needed}")]
    InsufficientPoints { balance: u64, needed: u64 },
    #[error("queue token is {status:?}")]
    TokenNotAdmitted { status: TokenStatus },
    #[error("seat is not available")]
    SeatUnavailable,
    #[error("amount must be positive and at most {max}")]
    InvalidAmount { max: u64 },
    #[error("at most {max} seats per user per schedule, held or bought")]
    SeatLimitReached { max: u32 },
    #[error("this top-up's key (a payment event's id) was already used for another account")]
    TopUpKeyReused,
}

/// The kinds of change the outbox carries to the outside world.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutboxKind {
    ReservationHeld,
    ReservationConfirmed,
    ReservationCancelled,
    ReservationExpired,
    PointsCharged,
    PointsRefunded,
}

/// An event written in the same atomic step as the change it records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEvent {
    pub id: u64,
    pub kind: OutboxKind,
    pub reservation_id: Option<ReservationId>,
    pub user_id: UserId,
    pub at_ms: u64,
    pub sent: bool,
}

/// A stored HTTP response for an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredResponse {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
}

/// What an idempotency key currently stands for. Every record expires at `expires_at_ms`:
/// from then on its key is treated as never seen, and stores purge it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum IdempotencyRecord {
    /// A request with this key is being processed; the lease lets a crashed holder be replaced.
    InProgress { fingerprint: [u8; 32], lease_until_ms: u64, expires_at_ms: u64 },
    /// The request completed; replays return exactly this response.
    Completed { fingerprint: [u8; 32], response: StoredResponse, completed_at_ms: u64, expires_at_ms: u64 },
}

impl IdempotencyRecord {
    /// When the record stops counting.
    pub fn expires_at_ms(&self) -> u64 {
        match self {
            IdempotencyRecord::InProgress { expires_at_ms, .. }
            | IdempotencyRecord::Completed { expires_at_ms, .. } => *expires_at_ms,
        }
    }
}

/// Decides what a new request carrying an idempotency key may do, given the key's record.
/// An expired record counts as none.
pub fn idempotency_decision(
    record: Option<&IdempotencyRecord>,
    fingerprint: &[u8; 32],
    now_ms: u64,
) -> IdempotencyDecision {
    match record.filter(|record| record.expires_at_ms() > now_ms) {
        None => IdempotencyDecision::Proceed,
        Some(IdempotencyRecord::InProgress { fingerprint: held, lease_until_ms, .. }) => {
            if held != fingerprint {
                IdempotencyDecision::Mismatch
            } else if *lease_until_ms <= now_ms {
                IdempotencyDecision::Proceed
            } else {
                IdempotencyDecision::InProgress
            }
        }
        Some(IdempotencyRecord::Completed { fingerprint: held, response, .. }) => {
            if held == fingerprint {
                IdempotencyDecision::Replay(response.clone())
            } else {
                IdempotencyDecision::Mismatch
            }
        }
    }
}

/// The outcome of [`idempotency_decision`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum IdempotencyDecision {
    /// No usable record: run the request (the caller now holds the lease).
    Proceed,
    /// The same request already completed: answer with its response.
    Replay(StoredResponse),
    /// The same request is running elsewhere right now.
    InProgress,
    /// The key was used with a different request.
    Mismatch,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completed(fingerprint: [u8; 32]) -> IdempotencyRecord {
        IdempotencyRecord::Completed {
            fingerprint,
            response: StoredResponse { status: 201, content_type: "application/json".into(), body: b"{}".to_vec() },
            completed_at_ms: 5,
            expires_at_ms: 1_000,
        }
    }

    #[test]
    fn same_key_same_request_replays_and_other_request_mismatches() {
        let record = completed([1; 32]);
        assert!(matches!(idempotency_decision(Some(&record), &[1; 32], 10), IdempotencyDecision::Replay(_)));
        assert_eq!(idempotency_decision(Some(&record), &[2; 32], 10), IdempotencyDecision::Mismatch);
        assert_eq!(idempotency_decision(None, &[2; 32], 10), IdempotencyDecision::Proceed);
    }

    #[test]
    fn an_expired_record_counts_as_never_seen() {
        let record = completed([1; 32]);
        assert!(matches!(idempotency_decision(Some(&record), &[1; 32], 999), IdempotencyDecision::Replay(_)));
        assert_eq!(idempotency_decision(Some(&record), &[1; 32], 1_000), IdempotencyDecision::Proceed);
        assert_eq!(idempotency_decision(Some(&record), &[2; 32], 1_000), IdempotencyDecision::Proceed);
    }

    #[test]
    fn in_progress_lease_blocks_until_it_lapses() {
        let record = IdempotencyRecord::InProgress { fingerprint: [1; 32], lease_until_ms: 100, expires_at_ms: 1_000 };
        assert_eq!(idempotency_decision(Some(&record), &[1; 32], 99), IdempotencyDecision::InProgress);
        assert_eq!(idempotency_decision(Some(&record), &[1; 32], 100), IdempotencyDecision::Proceed);
        assert_eq!(idempotency_decision(Some(&record), &[3; 32], 50), IdempotencyDecision::Mismatch);
    }
}
