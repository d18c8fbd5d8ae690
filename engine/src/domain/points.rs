//! Prepaid points: a balance that only moves through ledger entries.

use serde::{Deserialize, Serialize};

use super::{ReservationId, TransitionError, UserId};

/// The most points one charge may add, so a typo cannot mint a fortune.
pub const CHARGE_POINTS_MAX: u64 = 10_000_000;

/// Why the balance moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LedgerReason {
    TopUp,
    Charge,
    Refund,
}

impl std::fmt::Display for LedgerReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LedgerReason::TopUp => "top-up",
            LedgerReason::Charge => "charge",
            LedgerReason::Refund => "refund",
        })
    }
}

/// One movement of a user's balance: positive for top-ups and refunds, negative for charges.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub user_id: UserId,
    pub delta: i64,
    pub reason: LedgerReason,
    pub reservation_id: Option<ReservationId>,
    pub idempotency_key: Option<String>,
    pub at_ms: u64,
}

/// A user's point account.
///
/// **Invariant:** the balance never goes negative and always equals the sum of the ledger
/// entries the account produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub user_id: UserId,
    pub name: String,
    pub balance: u64,
}

impl Account {
    /// Adds points bought by the user.
    pub fn top_up(
        &mut self,
        amount: u64,
        idempotency_key: Option<String>,
        now_ms: u64,
    ) -> Result<LedgerEntry, TransitionError> {
        if amount == 0 || amount > CHARGE_POINTS_MAX {
            return Err(TransitionError::InvalidAmount { max: CHARGE_POINTS_MAX });
        }
        self.balance =
            self.balance.checked_add(amount).ok_or(TransitionError::InvalidAmount { max: CHARGE_POINTS_MAX })?;
        Ok(self.entry(signed(amount), LedgerReason::TopUp, None, idempotency_key, now_ms))
    }

    /// Takes the price of a reservation; refuses rather than going negative.
    pub fn debit(
        &mut self,
        amount: u64,
        reservation_id: ReservationId,
        idempotency_key: Option<String>,
        now_ms: u64,
    ) -> Result<LedgerEntry, TransitionError> {
        if amount > self.balance {
            return Err(TransitionError::InsufficientPoints { balance: self.balance, needed: amount });
        }
        self.balance -= amount;
        Ok(self.entry(-signed(amount), LedgerReason::Charge, Some(reservation_id), idempotency_key, now_ms))
    }

    /// Gives back what a reservation was charged.
    pub fn refund(&mut self, amount: u64, reservation_id: ReservationId, now_ms: u64) -> LedgerEntry {
        self.balance = self.balance.saturating_add(amount);
        self.entry(signed(amount), LedgerReason::Refund, Some(reservation_id), None, now_ms)
    }

    fn entry(
        &self,
        delta: i64,
        reason: LedgerReason,
        reservation_id: Option<ReservationId>,
        idempotency_key: Option<String>,
        at_ms: u64,
    ) -> LedgerEntry {
        LedgerEntry { user_id: self.user_id, delta, reason, reservation_id, idempotency_key, at_ms }
    }
}

fn signed(amount: u64) -> i64 {
    i64::try_from(amount).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(balance: u64) -> Account {
        Account { user_id: 1, name: "ada".into(), balance }
    }

    #[test]
    fn debit_beyond_balance_is_refused_and_changes_nothing() {
        let mut a = account(50);
        assert_eq!(a.debit(60, 9, None, 0), Err(TransitionError::InsufficientPoints { balance: 50, needed: 60 }));
        assert_eq!(a.balance, 50);
    }

    #[test]
    fn ledger_entries_sum_to_the_balance() {
        let mut a = account(0);
        let entries = [
            a.top_up(100, Some("k1".into()), 1).expect("top up"),
            a.debit(30, 4, None, 2).expect("debit"),
            a.refund(30, 4, 3),
            a.debit(70, 5, None, 4).expect("debit"),
        ];
        let sum: i64 = entries.iter().map(|entry| entry.delta).sum();
        assert_eq!(sum, i64::try_from(a.balance).expect("fits"));
        assert_eq!(a.balance, 30);
    }

    #[test]
    fn zero_and_huge_top_ups_are_refused() {
        let mut a = account(0);
        assert!(a.top_up(0, None, 0).is_err());
        assert!(a.top_up(CHARGE_POINTS_MAX + 1, None, 0).is_err());
        assert_eq!(a.balance, 0);
    }
}
