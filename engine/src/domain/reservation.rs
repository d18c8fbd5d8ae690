//! Holds, fencing tokens and reservations.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ReservationId, ScheduleId, Seat, SeatId, SeatStatus, TransitionError, UserId};

/// A fencing token: grows strictly with every hold granted on one seat, so a write carrying
/// an older token can be recognised as stale and refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct FenceToken(pub u64);

impl FenceToken {
    /// The token that follows this one.
    pub fn next(self) -> FenceToken {
        FenceToken(self.0 + 1)
    }
}

/// Where a reservation is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ReservationStatus {
    Held,
    Confirmed,
    Expired,
    Cancelled,
}

impl std::fmt::Display for ReservationStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReservationStatus::Held => "HELD",
            ReservationStatus::Confirmed => "CONFIRMED",
            ReservationStatus::Expired => "EXPIRED",
            ReservationStatus::Cancelled => "CANCELLED",
        })
    }
}

/// A seat taken by a user: `HELD → CONFIRMED | EXPIRED | CANCELLED`, and `CONFIRMED →
/// CANCELLED` with a refund.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub id: ReservationId,
    pub schedule_id: ScheduleId,
    pub seat_id: SeatId,
    pub user_id: UserId,
    pub status: ReservationStatus,
    pub fence: FenceToken,
    pub price_points: u64,
    pub paid_points: u64,
    pub held_at_ms: u64,
    pub expires_at_ms: u64,
    pub confirmed_at_ms: Option<u64>,
    pub ended_at_ms: Option<u64>,
}

impl Reservation {
    /// A fresh hold on `seat` for `user_id`, valid for `hold_ttl_ms`.
    pub fn hold(
        id: ReservationId,
        seat: &Seat,
        user_id: UserId,
        fence: FenceToken,
        hold_ttl_ms: u64,
        now_ms: u64,
    ) -> Self {
        Self {
            id,
            schedule_id: seat.schedule_id,
            seat_id: seat.id,
            user_id,
            status: ReservationStatus::Held,
            fence,
            price_points: seat.price_points,
            paid_points: 0,
            held_at_ms: now_ms,
            expires_at_ms: now_ms.saturating_add(hold_ttl_ms),
            confirmed_at_ms: None,
            ended_at_ms: None,
        }
    }

    /// Whether the reservation takes one of its user's seats on the schedule at `now_ms`: bought,
    /// or held and not yet expired. Cancelled and expired reservations take none.
    pub fn takes_a_seat(&self, now_ms: u64) -> bool {
        takes_a_seat(self.status, self.expires_at_ms, now_ms)
    }

    /// Checks that the hold may be paid for now, without changing anything.
    pub fn check_confirmable(&self, now_ms: u64) -> Result<(), TransitionError> {
        match self.status {
            ReservationStatus::Held if now_ms < self.expires_at_ms => Ok(()),
            ReservationStatus::Held => Err(TransitionError::HoldExpired { expires_at_ms: self.expires_at_ms, now_ms }),
            status => Err(TransitionError::NotHeld { status }),
        }
    }

    /// `HELD → CONFIRMED`, recording what was paid.
    pub fn confirm(&mut self, paid_points: u64, now_ms: u64) -> Result<(), TransitionError> {
        self.check_confirmable(now_ms)?;
        self.status = ReservationStatus::Confirmed;
        self.paid_points = paid_points;
        self.confirmed_at_ms = Some(now_ms);
        Ok(())
    }

    /// `HELD → EXPIRED`, once the hold's time is up.
    pub fn expire(&mut self, now_ms: u64) -> Result<(), TransitionError> {
        match self.status {
            ReservationStatus::Held if now_ms >= self.expires_at_ms => {
                self.status = ReservationStatus::Expired;
                self.ended_at_ms = Some(now_ms);
                Ok(())
            }
            ReservationStatus::Held => Err(TransitionError::HoldStillValid),
            status => Err(TransitionError::AlreadyFinal { status }),
        }
    }

    /// `HELD | CONFIRMED → CANCELLED`; returns the points to refund.
    pub fn cancel(&mut self, now_ms: u64) -> Result<u64, TransitionError> {
        match self.status {
            ReservationStatus::Held | ReservationStatus::Confirmed => {
                let refund = self.paid_points;
                self.status = ReservationStatus::Cancelled;
                self.ended_at_ms = Some(now_ms);
                Ok(refund)
            }
            status => Err(TransitionError::AlreadyFinal { status }),
        }
    }
}

/// Whether a reservation in `status`, held until `expires_at_ms`, takes one of its user's seats
/// at `now_ms` (see [`Reservation::takes_a_seat`]), for stores that read only those columns.
pub fn takes_a_seat(status: ReservationStatus, expires_at_ms: u64, now_ms: u64) -> bool {
    match status {
        ReservationStatus::Confirmed => true,
        ReservationStatus::Held => now_ms < expires_at_ms,
        ReservationStatus::Expired | ReservationStatus::Cancelled => false,
    }
}

/// How many seats a user already has on a schedule, and how many they may have: what a hold
/// is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeatLimit {
    /// Seats the user holds (live holds) or bought on the schedule.
    pub taken: u32,
    pub max: u32,
}

/// How a hold write is guarded when it reaches the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteGuard {
    /// Refuse the write unless its fence is newer than every fence the seat accepted.
    Fenced(FenceToken),
    /// Write whatever the seat holds now (the known-unsafe design).
    Unfenced(FenceToken),
}

/// The store's record of one seat: who holds it, whether it is sold, and the newest fence
/// it accepted.
///
/// **Invariant:** `fence_last` never decreases under [`SeatSlot::try_hold`] and
/// [`WriteGuard::Fenced`] writes; only an unfenced write can move it backwards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeatSlot {
    pub seat: Seat,
    pub holder: Option<(ReservationId, FenceToken)>,
    pub sold: bool,
    pub hold_expires_at_ms: u64,
    pub fence_last: FenceToken,
}

impl SeatSlot {
    /// A seat no one has touched.
    pub fn new(seat: Seat) -> Self {
        Self { seat, holder: None, sold: false, hold_expires_at_ms: 0, fence_last: FenceToken(0) }
    }

    /// The status as of `now_ms`: a hold past its expiry already counts as available.
    pub fn status(&self, now_ms: u64) -> SeatStatus {
        match self.holder {
            Some(_) if self.sold => SeatStatus::Sold,
            Some(_) if now_ms < self.hold_expires_at_ms => SeatStatus::Held,
            _ => SeatStatus::Available,
        }
    }

    /// The atomic check-and-set: takes the seat if it is available and returns the new fence.
    pub fn try_hold(
        &mut self,
        reservation_id: ReservationId,
        hold_ttl_ms: u64,
        now_ms: u64,
    ) -> Result<FenceToken, TransitionError> {
        if self.status(now_ms) != SeatStatus::Available {
            return Err(TransitionError::SeatUnavailable);
        }
        let fence = self.fence_last.next();
        self.set_holder(reservation_id, fence, hold_ttl_ms, now_ms);
        Ok(fence)
    }

    /// A hold write decided elsewhere (under a lock): fenced writes refuse a fence older than
    /// the newest the seat saw (written or read with), unfenced writes overwrite whatever is
    /// there.
    pub fn write_hold(
        &mut self,
        reservation_id: ReservationId,
        guard: WriteGuard,
        hold_ttl_ms: u64,
        now_ms: u64,
    ) -> Result<FenceToken, TransitionError> {
        let fence = match guard {
            WriteGuard::Fenced(fence) if fence < self.fence_last => {
                return Err(TransitionError::StaleFence { presented: fence.0, current: self.fence_last.0 });
            }
            WriteGuard::Fenced(fence) | WriteGuard::Unfenced(fence) => fence,
        };
        self.set_holder(reservation_id, fence, hold_ttl_ms, now_ms);
        Ok(fence)
    }

    /// A hold for a user with `limit`: atomic without a guard, else written as `guard` says.
    /// The seat's own refusal comes first, then the user's seat limit; a refused hold changes
    /// nothing, so every store answers the same refusal to the same hold.
    pub fn hold_within_limit(
        &mut self,
        reservation_id: ReservationId,
        guard: Option<WriteGuard>,
        limit: SeatLimit,
        hold_ttl_ms: u64,
        now_ms: u64,
    ) -> Result<FenceToken, TransitionError> {
        let mut decided = self.clone();
        let fence = match guard {
            None => decided.try_hold(reservation_id, hold_ttl_ms, now_ms)?,
            Some(guard) => decided.write_hold(reservation_id, guard, hold_ttl_ms, now_ms)?,
        };
        if limit.taken >= limit.max {
            return Err(TransitionError::SeatLimitReached { max: limit.max });
        }
        *self = decided;
        Ok(fence)
    }

    /// Raises the seat's fence to one a lock holder read the seat with: from now on a write
    /// with an older fence is stale.
    pub fn observe_fence(&mut self, fence: FenceToken) {
        self.fence_last = self.fence_last.max(fence);
    }

    /// Checks that `reservation_id` with `fence` is the seat's current, unsold holder.
    pub fn check_holder(&self, reservation_id: ReservationId, fence: FenceToken) -> Result<(), TransitionError> {
        match self.holder {
            Some((holder, holder_fence)) if holder == reservation_id && holder_fence == fence && !self.sold => Ok(()),
            Some((holder, _)) if holder == reservation_id && self.sold => {
                Err(TransitionError::AlreadyFinal { status: ReservationStatus::Confirmed })
            }
            _ => Err(TransitionError::StaleFence { presented: fence.0, current: self.fence_last.0 }),
        }
    }

    /// Marks the seat sold to its current holder.
    pub fn mark_sold(&mut self) {
        debug_assert!(self.holder.is_some(), "a sold seat has a holder");
        self.sold = true;
    }

    /// Frees the seat if `reservation_id` still holds it.
    pub fn release(&mut self, reservation_id: ReservationId) {
        if matches!(self.holder, Some((holder, _)) if holder == reservation_id) {
            self.holder = None;
            self.sold = false;
            self.hold_expires_at_ms = 0;
        }
    }

    fn set_holder(&mut self, reservation_id: ReservationId, fence: FenceToken, hold_ttl_ms: u64, now_ms: u64) {
        self.holder = Some((reservation_id, fence));
        self.sold = false;
        self.hold_expires_at_ms = now_ms.saturating_add(hold_ttl_ms);
        self.fence_last = fence;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seat() -> Seat {
        Seat { id: 3, schedule_id: 1, section_index: 0, price_points: 100 }
    }

    fn held(now_ms: u64) -> Reservation {
        Reservation::hold(1, &seat(), 9, FenceToken(1), 1_000, now_ms)
    }

    #[test]
    fn confirm_before_expiry_succeeds_and_after_is_rejected() {
        let mut on_time = held(0);
        assert_eq!(on_time.confirm(100, 999), Ok(()));
        assert_eq!(on_time.status, ReservationStatus::Confirmed);

        let mut late = held(0);
        assert_eq!(late.confirm(100, 1_000), Err(TransitionError::HoldExpired { expires_at_ms: 1_000, now_ms: 1_000 }));
        assert_eq!(late.status, ReservationStatus::Held);
    }

    #[test]
    fn expire_only_held_reservations_after_their_ttl() {
        let mut r = held(0);
        assert_eq!(r.expire(999), Err(TransitionError::HoldStillValid));
        assert_eq!(r.expire(1_000), Ok(()));
        assert_eq!(r.confirm(100, 1_001), Err(TransitionError::NotHeld { status: ReservationStatus::Expired }));
        assert_eq!(r.cancel(1_002), Err(TransitionError::AlreadyFinal { status: ReservationStatus::Expired }));
    }

    #[test]
    fn cancel_refunds_what_was_paid() {
        let mut unpaid = held(0);
        assert_eq!(unpaid.cancel(5), Ok(0));
        let mut paid = held(0);
        paid.confirm(100, 10).expect("confirm");
        assert_eq!(paid.cancel(20), Ok(100));
        assert_eq!(paid.cancel(30), Err(TransitionError::AlreadyFinal { status: ReservationStatus::Cancelled }));
    }

    #[test]
    fn fences_grow_strictly_per_seat_across_holds_and_expiry() {
        let mut slot = SeatSlot::new(seat());
        let first = slot.try_hold(1, 1_000, 0).expect("first hold");
        assert_eq!(slot.try_hold(2, 1_000, 500), Err(TransitionError::SeatUnavailable));
        let second = slot.try_hold(2, 1_000, 1_000).expect("hold after expiry");
        assert!(second > first);
        assert_eq!(slot.check_holder(1, first), Err(TransitionError::StaleFence { presented: 1, current: 2 }));
        assert_eq!(slot.check_holder(2, second), Ok(()));
    }

    #[test]
    fn fenced_write_refuses_stale_token_but_unfenced_overwrites() {
        let mut slot = SeatSlot::new(seat());
        slot.write_hold(2, WriteGuard::Fenced(FenceToken(6)), 1_000, 0).expect("newer fence");
        assert_eq!(
            slot.write_hold(1, WriteGuard::Fenced(FenceToken(5)), 1_000, 1),
            Err(TransitionError::StaleFence { presented: 5, current: 6 })
        );
        slot.mark_sold();
        assert_eq!(slot.write_hold(1, WriteGuard::Unfenced(FenceToken(5)), 1_000, 2), Ok(FenceToken(5)));
        assert_eq!(slot.status(3), SeatStatus::Held, "the unsafe write un-sold the seat");
    }

    #[test]
    fn a_hold_past_the_seat_limit_is_refused_after_the_seat_and_changes_nothing() {
        let mut slot = SeatSlot::new(seat());
        let full = SeatLimit { taken: 4, max: 4 };
        assert_eq!(slot.hold_within_limit(1, None, full, 1_000, 0), Err(TransitionError::SeatLimitReached { max: 4 }));
        assert_eq!((slot.holder, slot.fence_last), (None, FenceToken(0)));
        let fence = slot.hold_within_limit(1, None, SeatLimit { taken: 3, max: 4 }, 1_000, 0).expect("room for one");
        assert_eq!(fence, FenceToken(1));
        assert_eq!(slot.hold_within_limit(2, None, full, 1_000, 10), Err(TransitionError::SeatUnavailable));
        let stale = Some(WriteGuard::Fenced(FenceToken(0)));
        assert_eq!(
            slot.hold_within_limit(2, stale, full, 1_000, 10),
            Err(TransitionError::StaleFence { presented: 0, current: 1 })
        );
    }

    #[test]
    fn only_bought_seats_and_live_holds_take_a_seat() {
        let mut hold = held(0);
        assert!(hold.takes_a_seat(999));
        assert!(!hold.takes_a_seat(1_000), "an expired hold, swept or not, takes none");
        hold.confirm(100, 10).expect("confirm");
        assert!(hold.takes_a_seat(5_000));
        hold.cancel(20).expect("cancel");
        assert!(!hold.takes_a_seat(20));
    }

    #[test]
    fn sold_seat_is_not_released_by_another_reservation() {
        let mut slot = SeatSlot::new(seat());
        let fence = slot.try_hold(1, 1_000, 0).expect("hold");
        slot.check_holder(1, fence).expect("holder");
        slot.mark_sold();
        slot.release(2);
        assert_eq!(slot.status(5_000), SeatStatus::Sold);
        slot.release(1);
        assert_eq!(slot.status(5_000), SeatStatus::Available);
    }
}
