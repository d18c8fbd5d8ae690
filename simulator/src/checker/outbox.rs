//! The transactional outbox: every change of a reservation the final state holds (its hold,
//! its confirmation and the charge that paid for it, its cancellation and the refund, its
//! expiry) has exactly one outbox event, stamped with the time of the change it records (a
//! store writes both in one atomic step, with one reading of the clock, so an event written
//! apart from its change would carry another time), and the events of one reservation come in
//! the order of its changes; and every event was relayed at least once.
//!
//! The order is judged by the stages of a reservation's life (held, then paid, then ended), not
//! by the times: the record store stamps a change with its caller's clock, and a skewed node may
//! stamp a later change earlier. Within a stage (a charge and its confirmation, a refund and
//! its cancellation) the store's own order is not judged. Top-ups belong to no reservation and
//! are judged only for being relayed.

use std::collections::BTreeMap;

use tcore_engine::store::outbox_kind_name;

use crate::history::{LedgerReason, OutboxKind, OutboxRecord, ReservationStatus};

use super::context::{Context, Findings, list, moment};
use super::{Invariant, Moment, Subject};

/// How many problems of one reservation a message names.
const PROBLEMS_NAMED_MAX: usize = 5;

/// An event a change in the final state calls for: its kind, and the time it must carry
/// (`None` when the final state does not say when the change happened).
type Expected = (OutboxKind, Option<u64>);

/// The stage of a reservation's life an event records: events of a later stage never come
/// before those of an earlier one.
fn stage(kind: OutboxKind) -> u8 {
    match kind {
        OutboxKind::ReservationHeld => 0,
        OutboxKind::PointsCharged | OutboxKind::ReservationConfirmed => 1,
        OutboxKind::PointsRefunded | OutboxKind::ReservationCancelled | OutboxKind::ReservationExpired => 2,
    }
}

/// Compares, reservation by reservation, the events the final state's changes call for with
/// the events the outbox holds (in the outbox's order), and reports each reservation whose
/// events are missing, doubled, stamped with another time, out of order or never relayed, once,
/// with every such problem named. An unrelayed top-up is reported for its user.
pub(super) fn check_outbox_faithful(context: &Context<'_>, findings: &mut Findings) {
    let final_state = &context.history.final_state;
    let mut expected: BTreeMap<u64, Vec<Expected>> = BTreeMap::new();
    for reservation in context.reservations() {
        let changes = expected.entry(reservation.id).or_default();
        changes.push((OutboxKind::ReservationHeld, Some(reservation.held_us)));
        if let Some(confirmed_us) = reservation.confirmed_us {
            changes.push((OutboxKind::ReservationConfirmed, Some(confirmed_us)));
        }
        match reservation.status {
            ReservationStatus::Cancelled => changes.push((OutboxKind::ReservationCancelled, reservation.ended_us)),
            ReservationStatus::Expired => changes.push((OutboxKind::ReservationExpired, reservation.ended_us)),
            ReservationStatus::Held | ReservationStatus::Confirmed => {}
        }
    }
    for entry in &final_state.ledger {
        let kind = match entry.reason {
            LedgerReason::Charge => OutboxKind::PointsCharged,
            LedgerReason::Refund => OutboxKind::PointsRefunded,
            LedgerReason::TopUp => continue,
        };
        if let Some(reservation_id) = entry.reservation_id {
            expected.entry(reservation_id).or_default().push((kind, Some(entry.at_us)));
        }
    }
    let mut events: BTreeMap<u64, Vec<&OutboxRecord>> = BTreeMap::new();
    let mut unsent_top_ups: BTreeMap<u64, Vec<&OutboxRecord>> = BTreeMap::new();
    let mut in_order: Vec<&OutboxRecord> = final_state.outbox.iter().collect();
    in_order.sort_by_key(|event| event.id);
    for event in in_order {
        match event.reservation_id {
            Some(reservation_id) => events.entry(reservation_id).or_default().push(event),
            None if !event.sent => unsent_top_ups.entry(event.user_id).or_default().push(event),
            None => {}
        }
    }
    for reservation_id in expected.keys().chain(events.keys()).copied().collect::<std::collections::BTreeSet<u64>>() {
        let wanted = expected.get(&reservation_id).map_or(&[][..], Vec::as_slice);
        let written = events.get(&reservation_id).map_or(&[][..], Vec::as_slice);
        let problems = problems_of(wanted, written);
        if problems.is_empty() {
            continue;
        }
        findings.add(Invariant::OutboxFaithful, || {
            let mut times: Vec<Moment> = written.iter().map(|event| event_moment(event)).collect();
            times.extend(wanted.iter().filter_map(|&(kind, at_us)| {
                at_us.map(|at_us| moment(at_us, format!("the change the {} event records", outbox_kind_name(kind))))
            }));
            context.violation(
                Invariant::OutboxFaithful,
                Subject::Reservation { reservation_id },
                format!(
                    "{} problem(s) with the outbox events of this reservation: {}",
                    problems.len(),
                    list(&problems, PROBLEMS_NAMED_MAX)
                ),
                context.op_refs(context.ops_for_reservation(reservation_id).iter().copied()),
                times,
            )
        });
    }
    for (user_id, unsent) in unsent_top_ups {
        findings.add(Invariant::OutboxFaithful, || {
            let ids: Vec<u64> = unsent.iter().map(|event| event.id).collect();
            context.violation(
                Invariant::OutboxFaithful,
                Subject::User { user_id },
                format!("{} top-up event(s) were never relayed (ids {})", ids.len(), list(&ids, PROBLEMS_NAMED_MAX)),
                context.op_refs(context.ops_for_user(user_id).iter().copied()),
                unsent.iter().map(|event| event_moment(event)).collect(),
            )
        });
    }
}

/// What is wrong with the events `written` (in outbox order) of one reservation whose changes
/// call for `wanted`.
fn problems_of(wanted: &[Expected], written: &[&OutboxRecord]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut kinds: Vec<OutboxKind> =
        wanted.iter().map(|&(kind, _)| kind).chain(written.iter().map(|e| e.kind)).collect();
    kinds.sort_by_key(|&kind| (stage(kind), outbox_kind_name(kind)));
    kinds.dedup();
    for kind in kinds {
        let mut times_wanted: Vec<Option<u64>> =
            wanted.iter().filter(|&&(wanted_kind, _)| wanted_kind == kind).map(|&(_, at_us)| at_us).collect();
        let mut times_written: Vec<u64> =
            written.iter().filter(|event| event.kind == kind).map(|event| event.at_us).collect();
        let name = outbox_kind_name(kind);
        match times_written.len().cmp(&times_wanted.len()) {
            std::cmp::Ordering::Less => problems.push(format!(
                "{} change(s) call for a {name} event and {} such event(s) were written",
                times_wanted.len(),
                times_written.len()
            )),
            std::cmp::Ordering::Greater => problems.push(format!(
                "{} {name} event(s) were written for {} such change(s)",
                times_written.len(),
                times_wanted.len()
            )),
            std::cmp::Ordering::Equal => {
                // Each change takes one event of its time; a change whose time the final state
                // does not know takes whichever event is left.
                times_wanted.sort_unstable();
                times_written.sort_unstable();
                let timed: Vec<u64> = times_wanted.iter().flatten().copied().collect();
                let mut left = times_written.clone();
                let unmatched = timed
                    .iter()
                    .filter(|at_us| match left.iter().position(|written_us| written_us == *at_us) {
                        Some(position) => {
                            left.remove(position);
                            false
                        }
                        None => true,
                    })
                    .count();
                if unmatched > 0 {
                    problems.push(format!(
                        "{unmatched} {name} event(s) carry another time than their change's (changes at {} us, \
                         events at {} us): not written with the change",
                        list(&timed, PROBLEMS_NAMED_MAX),
                        list(&times_written, PROBLEMS_NAMED_MAX)
                    ));
                }
            }
        }
    }
    for pair in written.windows(2) {
        if stage(pair[1].kind) < stage(pair[0].kind) {
            problems.push(format!(
                "event #{} ({}) comes after event #{} ({}), out of the order of the changes",
                pair[1].id,
                outbox_kind_name(pair[1].kind),
                pair[0].id,
                outbox_kind_name(pair[0].kind)
            ));
        }
    }
    let unsent: Vec<u64> = written.iter().filter(|event| !event.sent).map(|event| event.id).collect();
    if !unsent.is_empty() {
        problems.push(format!("{} event(s) never relayed (ids {})", unsent.len(), list(&unsent, PROBLEMS_NAMED_MAX)));
    }
    problems
}

fn event_moment(event: &OutboxRecord) -> Moment {
    let relayed = if event.sent { "relayed" } else { "never relayed" };
    moment(event.at_us, format!("outbox event #{} {} ({relayed})", event.id, outbox_kind_name(event.kind)))
}
