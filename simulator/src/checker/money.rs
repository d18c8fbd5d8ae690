//! Points: one charge per key and per reservation, balances never below zero, ledgers that
//! sum to balances, and charges that exist exactly when a seat is sold.

use std::collections::BTreeMap;

use crate::history::{LedgerReason, LedgerRecord, ReservationStatus};

use super::context::{Context, Findings, moment};
use super::{Invariant, Moment, Subject};

fn entry_moment(entry: &LedgerRecord) -> Moment {
    let reservation = entry.reservation_id.map_or_else(String::new, |id| format!(" for reservation {id}"));
    let key = entry.idempotency_key.as_deref().map_or_else(String::new, |key| format!(" key {key:?}"));
    moment(entry.at_us, format!("{} {:+} on user {}{reservation}{key}", entry.reason, entry.delta, entry.user_id))
}

/// Operations behind some ledger entries: those on their reservations and with their keys;
/// for an entry with neither, those on its user.
fn ledger_ops<'a>(context: &Context<'_>, entries: impl IntoIterator<Item = &'a LedgerRecord>) -> Vec<usize> {
    let mut positions = Vec::new();
    for entry in entries {
        if let Some(reservation_id) = entry.reservation_id {
            positions.extend_from_slice(context.ops_for_reservation(reservation_id));
        }
        if let Some(key) = &entry.idempotency_key {
            positions.extend_from_slice(context.ops_for_key(key));
        }
        if entry.reservation_id.is_none() && entry.idempotency_key.is_none() {
            positions.extend_from_slice(context.ops_for_user(entry.user_id));
        }
    }
    positions
}

/// At most one ledger entry per idempotency key and reason (a retried top-up or payment
/// moves the balance once), and at most one charge per reservation.
pub(super) fn check_single_charge(context: &Context<'_>, findings: &mut Findings) {
    let ledger = &context.history.final_state.ledger;
    let mut keyed: Vec<(&str, LedgerReason, usize)> = ledger
        .iter()
        .enumerate()
        .filter_map(|(position, entry)| {
            let key = entry.idempotency_key.as_deref()?;
            Some((key, entry.reason, position))
        })
        .collect();
    keyed.sort_unstable();
    for group in keyed.chunk_by(|a, b| (a.0, a.1) == (b.0, b.1)) {
        if group.len() < 2 {
            continue;
        }
        let (key, reason, _) = group[0];
        findings.add(Invariant::SingleCharge, || {
            let entries: Vec<&LedgerRecord> = group.iter().map(|&(_, _, position)| &ledger[position]).collect();
            let total: i128 = entries.iter().map(|entry| i128::from(entry.delta)).sum();
            context.violation(
                Invariant::SingleCharge,
                Subject::IdempotencyKey { key: key.to_owned() },
                format!(
                    "the key moved user {}'s balance {} times ({reason}, {total:+} in all); \
                     a retried request must move it once",
                    entries[0].user_id,
                    entries.len()
                ),
                context.op_refs(ledger_ops(context, entries.iter().copied())),
                entries.iter().copied().map(entry_moment).collect(),
            )
        });
    }

    let mut charges: Vec<(u64, usize)> = ledger
        .iter()
        .enumerate()
        .filter(|(_, entry)| entry.reason == LedgerReason::Charge)
        .filter_map(|(position, entry)| Some((entry.reservation_id?, position)))
        .collect();
    charges.sort_unstable();
    for group in charges.chunk_by(|a, b| a.0 == b.0) {
        if group.len() < 2 {
            continue;
        }
        let reservation_id = group[0].0;
        findings.add(Invariant::SingleCharge, || {
            let entries: Vec<&LedgerRecord> = group.iter().map(|&(_, position)| &ledger[position]).collect();
            let total: i128 = entries.iter().map(|entry| i128::from(entry.delta)).sum();
            context.violation(
                Invariant::SingleCharge,
                Subject::Reservation { reservation_id },
                format!("the reservation was charged {} times ({total:+} in all)", entries.len()),
                context.op_refs(ledger_ops(context, entries.iter().copied())),
                entries.iter().copied().map(entry_moment).collect(),
            )
        });
    }
}

/// No balance is below zero at the end, nor at any point of its ledger replayed in time order.
pub(super) fn check_non_negative_balance(context: &Context<'_>, findings: &mut Findings) {
    let final_state = &context.history.final_state;
    let ledger = &final_state.ledger;
    let mut order: Vec<usize> = (0..ledger.len()).collect();
    order.sort_by_key(|&position| (ledger[position].user_id, ledger[position].at_us, position));
    // The first entry that took each user below zero, with the balance it left.
    let mut first_negative: BTreeMap<u64, (usize, i128)> = BTreeMap::new();
    for user in order.chunk_by(|&a, &b| ledger[a].user_id == ledger[b].user_id) {
        let mut balance: i128 = 0;
        for &position in user {
            balance += i128::from(ledger[position].delta);
            if balance < 0 {
                first_negative.insert(ledger[position].user_id, (position, balance));
                break;
            }
        }
    }
    let mut final_balances: BTreeMap<u64, i64> = BTreeMap::new();
    for user in &final_state.users {
        final_balances.entry(user.id).or_insert(user.balance);
    }
    let negative_at_end = final_balances.iter().filter(|&(_, &balance)| balance < 0).map(|(&user_id, _)| user_id);
    let mut users: Vec<u64> = first_negative.keys().copied().chain(negative_at_end).collect();
    users.sort_unstable();
    users.dedup();
    for user_id in users {
        findings.add(Invariant::NonNegativeBalance, || {
            let mut times = Vec::new();
            let mut positions = context.ops_for_user(user_id).to_vec();
            let mut problems = Vec::new();
            if let Some(&(position, balance)) = first_negative.get(&user_id) {
                let entry = &ledger[position];
                problems.push(format!(
                    "the ledger took the balance to {balance} at {} us ({} {:+})",
                    entry.at_us, entry.reason, entry.delta
                ));
                times.push(entry_moment(entry));
                positions.extend(ledger_ops(context, [entry]));
            }
            if let Some(&balance) = final_balances.get(&user_id).filter(|&&balance| balance < 0) {
                problems.push(format!("the final balance is {balance}"));
                times.push(moment(context.history.config.end_us, format!("final balance {balance}")));
            }
            context.violation(
                Invariant::NonNegativeBalance,
                Subject::User { user_id },
                problems.join("; "),
                context.op_refs(positions),
                times,
            )
        });
    }
}

/// Each user's ledger sums to their final balance, and the ledger names no unknown user.
pub(super) fn check_ledger_balances(context: &Context<'_>, findings: &mut Findings) {
    let final_state = &context.history.final_state;
    let mut sums: BTreeMap<u64, (i128, usize)> = BTreeMap::new();
    for entry in &final_state.ledger {
        let (sum, count) = sums.entry(entry.user_id).or_default();
        *sum += i128::from(entry.delta);
        *count += 1;
    }
    let mut balances: BTreeMap<u64, i64> = BTreeMap::new();
    for user in &final_state.users {
        balances.entry(user.id).or_insert(user.balance);
    }
    let mut users: Vec<u64> = balances.keys().chain(sums.keys()).copied().collect();
    users.sort_unstable();
    users.dedup();
    for user_id in users {
        let (sum, count) = sums.get(&user_id).copied().unwrap_or_default();
        let balance = balances.get(&user_id).copied();
        if balance.is_some_and(|balance| i128::from(balance) == sum) {
            continue;
        }
        findings.add(Invariant::LedgerBalances, || {
            let message = match balance {
                Some(balance) => format!(
                    "the final balance is {balance} but the user's {count} ledger entries sum to {sum} \
                     (off by {})",
                    i128::from(balance) - sum
                ),
                None => format!(
                    "the ledger has {count} entries summing to {sum} for a user the final state \
                     does not list"
                ),
            };
            context.violation(
                Invariant::LedgerBalances,
                Subject::User { user_id },
                message,
                context.op_refs(context.ops_for_user(user_id).iter().copied()),
                vec![moment(context.history.config.end_us, "final state read")],
            )
        });
    }
}

/// Charged and refunded points per reservation.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Payments {
    charged: i128,
    refunded: i128,
}

impl Payments {
    fn net(self) -> i128 {
        self.charged - self.refunded
    }
}

/// A reservation carries a net charge exactly when it is `CONFIRMED` (and was paid for);
/// otherwise whatever was charged was refunded, no more and no less.
pub(super) fn check_charge_iff_sold(context: &Context<'_>, findings: &mut Findings) {
    let ledger = &context.history.final_state.ledger;
    let mut payments: BTreeMap<u64, (Payments, Vec<usize>)> = BTreeMap::new();
    for (position, entry) in ledger.iter().enumerate() {
        let Some(reservation_id) = entry.reservation_id else {
            continue;
        };
        let (sums, positions) = payments.entry(reservation_id).or_default();
        match entry.reason {
            LedgerReason::Charge => sums.charged -= i128::from(entry.delta),
            LedgerReason::Refund => sums.refunded += i128::from(entry.delta),
            LedgerReason::TopUp => continue,
        }
        positions.push(position);
    }
    let mut reservation_ids: Vec<u64> =
        context.reservations().iter().map(|reservation| reservation.id).chain(payments.keys().copied()).collect();
    reservation_ids.sort_unstable();
    reservation_ids.dedup();
    for reservation_id in reservation_ids {
        let (sums, positions) = payments
            .get(&reservation_id)
            .map_or((Payments::default(), &[][..]), |(sums, positions)| (*sums, positions.as_slice()));
        let reservation = context.reservation(reservation_id);
        let expected_net = match reservation {
            Some(reservation) if reservation.status == ReservationStatus::Confirmed => {
                i128::from(reservation.amount_paid)
            }
            _ => 0,
        };
        if sums.net().signum() == expected_net.signum() {
            continue;
        }
        findings.add(Invariant::ChargeIffSold, || {
            let state = match reservation {
                Some(reservation) if reservation.status == ReservationStatus::Confirmed => {
                    format!("is CONFIRMED (paid {})", reservation.amount_paid)
                }
                Some(reservation) => format!("is {}", reservation.status),
                None => "does not exist at the end".to_owned(),
            };
            let seat = reservation.map_or_else(String::new, |reservation| {
                format!(" on seat {}/{}", reservation.schedule_id, reservation.seat_id)
            });
            let expectation = if expected_net > 0 {
                "a sold seat must carry a net charge"
            } else {
                "an unsold seat must be charged nothing or refunded in full"
            };
            let entries: Vec<&LedgerRecord> = positions.iter().map(|&position| &ledger[position]).collect();
            let mut ops = ledger_ops(context, entries.iter().copied());
            ops.extend_from_slice(context.ops_for_reservation(reservation_id));
            context.violation(
                Invariant::ChargeIffSold,
                Subject::Reservation { reservation_id },
                format!(
                    "the reservation{seat} {state} but its net charge is {} (charged {}, refunded {}); \
                     {expectation}",
                    sums.net(),
                    sums.charged,
                    sums.refunded
                ),
                context.op_refs(ops),
                entries.iter().copied().map(entry_moment).collect(),
            )
        });
    }
}
