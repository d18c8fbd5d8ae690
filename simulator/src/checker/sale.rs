//! Seats and reservations: no double sale, capacity, durability of acknowledged
//! confirmations, and holds that expire.

use std::collections::BTreeMap;

use crate::history::{FinalReservation, OpKind, Outcome, ReportedStatus, ReservationStatus};

use super::context::{Context, Findings, list, moment};
use super::{Invariant, Subject};

/// How many reservation ids a message names before it says "and N more".
const NAMED_IN_MESSAGE_MAX: usize = 10;

fn confirmed<'h>(context: &Context<'h>) -> Vec<&'h FinalReservation> {
    context
        .reservations()
        .iter()
        .copied()
        .filter(|reservation| reservation.status == ReservationStatus::Confirmed)
        .collect()
}

fn confirmed_moment(reservation: &FinalReservation) -> Option<super::Moment> {
    reservation.confirmed_us.map(|at_us| {
        moment(
            at_us,
            format!(
                "reservation {} (user {}, fence {}) confirmed",
                reservation.id, reservation.user_id, reservation.fence
            ),
        )
    })
}

/// No seat has two `CONFIRMED` reservations at the end.
pub(super) fn check_no_double_sale(context: &Context<'_>, findings: &mut Findings) {
    let mut sold = confirmed(context);
    sold.sort_by_key(|reservation| (reservation.schedule_id, reservation.seat_id, reservation.id));
    for seat in sold.chunk_by(|a, b| (a.schedule_id, a.seat_id) == (b.schedule_id, b.seat_id)) {
        if seat.len() < 2 {
            continue;
        }
        findings.add(Invariant::NoDoubleSale, || {
            let ids: Vec<u64> = seat.iter().map(|reservation| reservation.id).collect();
            let message = format!(
                "sold {} times: reservations {} are all CONFIRMED",
                seat.len(),
                list(&ids, NAMED_IN_MESSAGE_MAX)
            );
            let operations = ids.iter().flat_map(|&id| context.ops_for_reservation(id).iter().copied());
            context.violation(
                Invariant::NoDoubleSale,
                Subject::Seat { schedule_id: seat[0].schedule_id, seat_id: seat[0].seat_id },
                message,
                context.op_refs(operations),
                seat.iter().copied().filter_map(confirmed_moment).collect(),
            )
        });
    }
}

/// No schedule has more `CONFIRMED` reservations than seats.
pub(super) fn check_capacity(context: &Context<'_>, findings: &mut Findings) {
    let mut capacities: BTreeMap<u64, u64> = BTreeMap::new();
    for schedule in &context.history.final_state.schedules {
        capacities.entry(schedule.id).or_insert(schedule.capacity);
    }
    let mut sold = confirmed(context);
    sold.sort_by_key(|reservation| {
        (reservation.schedule_id, reservation.confirmed_us.unwrap_or(u64::MAX), reservation.id)
    });
    for schedule in sold.chunk_by(|a, b| a.schedule_id == b.schedule_id) {
        let schedule_id = schedule[0].schedule_id;
        let capacity = capacities.get(&schedule_id).copied();
        let allowed = capacity.unwrap_or(0);
        if schedule.len() as u64 <= allowed {
            continue;
        }
        findings.add(Invariant::Capacity, || {
            let over = &schedule[usize::try_from(allowed).unwrap_or(usize::MAX)..];
            let over_ids: Vec<u64> = over.iter().map(|reservation| reservation.id).collect();
            let message = match capacity {
                Some(capacity) => format!(
                    "{} reservations are CONFIRMED but the schedule has {capacity} seats; \
                     confirmed beyond capacity: reservations {}",
                    schedule.len(),
                    list(&over_ids, NAMED_IN_MESSAGE_MAX)
                ),
                None => format!(
                    "{} reservations are CONFIRMED for a schedule the final state does not \
                     list: reservations {}",
                    schedule.len(),
                    list(&over_ids, NAMED_IN_MESSAGE_MAX)
                ),
            };
            let operations = over_ids.iter().flat_map(|&id| context.ops_for_reservation(id).iter().copied());
            context.violation(
                Invariant::Capacity,
                Subject::Schedule { schedule_id },
                message,
                context.op_refs(operations),
                over.iter().copied().filter_map(confirmed_moment).collect(),
            )
        });
    }
}

/// Every confirmation a client was told of (a successful confirm, or a read that answered
/// `CONFIRMED`) is `CONFIRMED` at the end, unless the client that was told sent a cancel for
/// it that may have taken effect and the reservation is `CANCELLED`.
pub(super) fn check_acknowledged_confirmations_durable(context: &Context<'_>, findings: &mut Findings) {
    let operations = &context.history.operations;
    let mut acknowledgements: Vec<(u64, usize)> = Vec::new();
    let mut cancels: Vec<(u64, u64)> = Vec::new();
    // The seat each client was given each reservation id for: a store that lost writes can
    // hand the same id out again for another seat, which must not pass for the lost one.
    let mut held_seats: Vec<((u64, u64), (u64, u64))> = Vec::new();
    for (position, operation) in operations.iter().enumerate() {
        match (&operation.kind, &operation.outcome) {
            (OpKind::Hold { schedule_id, seat_id }, Outcome::Ok(response)) => {
                if let Some(reservation_id) = response.reservation_id {
                    held_seats.push(((operation.client, reservation_id), (*schedule_id, *seat_id)));
                }
            }
            (OpKind::Confirm { reservation_id }, Outcome::Ok(_)) => {
                acknowledgements.push((*reservation_id, position));
            }
            (OpKind::ReadReservation { reservation_id }, Outcome::Ok(response))
                if response.status == Some(ReportedStatus::Confirmed) =>
            {
                acknowledgements.push((*reservation_id, position));
            }
            (OpKind::Cancel { reservation_id }, outcome) if outcome.may_have_taken_effect() => {
                cancels.push((*reservation_id, operation.client));
            }
            _ => {}
        }
    }
    acknowledgements.sort_unstable();
    cancels.sort_unstable();
    held_seats.sort_unstable();
    let seat_told = |client: u64, reservation_id: u64| {
        let at = held_seats.partition_point(|(key, _)| *key < (client, reservation_id));
        held_seats.get(at).filter(|(key, _)| *key == (client, reservation_id)).map(|(_, seat)| *seat)
    };
    for acknowledged in acknowledgements.chunk_by(|a, b| a.0 == b.0) {
        let reservation_id = acknowledged[0].0;
        let reservation = context.reservation(reservation_id);
        let status = reservation.map(|reservation| reservation.status);
        let cancelled_by_a_told_client = status == Some(ReservationStatus::Cancelled)
            && acknowledged
                .iter()
                .any(|&(_, position)| cancels.binary_search(&(reservation_id, operations[position].client)).is_ok());
        let same_seat = reservation.is_none_or(|reservation| {
            acknowledged.iter().all(|&(_, position)| {
                seat_told(operations[position].client, reservation_id)
                    .is_none_or(|seat| seat == (reservation.schedule_id, reservation.seat_id))
            })
        });
        if (status == Some(ReservationStatus::Confirmed) && same_seat) || cancelled_by_a_told_client {
            continue;
        }
        findings.add(Invariant::AcknowledgedConfirmationsDurable, || {
            let first = &operations[acknowledged[0].1];
            let end = match reservation {
                Some(reservation) if !same_seat => format!(
                    "at the end that id names seat {}/{}, not the seat the client held: the \
                     confirmation was lost and the id given out again",
                    reservation.schedule_id, reservation.seat_id
                ),
                Some(reservation) => format!(
                    "at the end it is {} (seat {}/{})",
                    reservation.status, reservation.schedule_id, reservation.seat_id
                ),
                None => "at the end it does not exist".to_owned(),
            };
            let message = format!(
                "client {} was told reservation {reservation_id} is CONFIRMED ({} acknowledgement(s)), \
                 but {end}, and no client that was told cancelled it",
                first.client,
                acknowledged.len()
            );
            let times = acknowledged
                .iter()
                .map(|&(_, position)| {
                    let operation = &operations[position];
                    moment(
                        operation.complete_us.unwrap_or(operation.invoke_us),
                        format!(
                            "client {} told reservation {reservation_id} is CONFIRMED (op #{})",
                            operation.client, operation.op_id
                        ),
                    )
                })
                .collect();
            let positions = acknowledged
                .iter()
                .map(|&(_, position)| position)
                .chain(context.ops_for_reservation(reservation_id).iter().copied());
            context.violation(
                Invariant::AcknowledgedConfirmationsDurable,
                Subject::Reservation { reservation_id },
                message,
                context.op_refs(positions),
                times,
            )
        });
    }
}

/// No hold outlives its TTL: no hold is granted for longer than the longest TTL in force, no
/// hold is confirmed after it expired once the faults healed, and none is still `HELD` at the
/// end after its expiry, the heal and the grace have passed. An operation whose outcome is
/// unknown is resolved by the final state; only a hold left `HELD` leaves it unresolved.
pub(super) fn check_holds_expire(context: &Context<'_>, findings: &mut Findings) {
    let config = &context.history.config;
    let hold_ttl_us_max =
        context.history.hold_ttl_changes.iter().map(|change| change.hold_ttl_us).fold(config.hold_ttl_us, u64::max);
    for &reservation in context.reservations() {
        let granted_us = reservation.expires_us.saturating_sub(reservation.held_us);
        if granted_us > hold_ttl_us_max {
            report_hold(
                context,
                findings,
                reservation,
                format!(
                    "hold granted for {granted_us} us, longer than any TTL in force \
                     ({hold_ttl_us_max} us)"
                ),
            );
        }
        if let Some(confirmed_us) = reservation.confirmed_us
            && confirmed_us >= reservation.expires_us
            && confirmed_us >= config.heal_us
        {
            report_hold(
                context,
                findings,
                reservation,
                format!(
                    "confirmed at {confirmed_us} us, after its hold expired at {} us \
                     (faults healed at {} us)",
                    reservation.expires_us, config.heal_us
                ),
            );
        }
        let settled_us = reservation.expires_us.max(config.heal_us).saturating_add(config.hold_expiry_grace_us);
        if reservation.status == ReservationStatus::Held && settled_us <= config.end_us {
            report_hold(
                context,
                findings,
                reservation,
                format!(
                    "still HELD at the end ({} us): it expired at {} us, faults healed at {} us, \
                     grace {} us",
                    config.end_us, reservation.expires_us, config.heal_us, config.hold_expiry_grace_us
                ),
            );
        }
    }
}

fn report_hold(context: &Context<'_>, findings: &mut Findings, reservation: &FinalReservation, problem: String) {
    findings.add(Invariant::HoldsExpire, || {
        let config = &context.history.config;
        let operations = &context.history.operations;
        // Holds on the seat whose outcome is unknown may be the ones that made this
        // reservation: quote them, since they are what the final state has to resolve.
        let unresolved_holds = context
            .holds_on_seat(reservation.schedule_id, reservation.seat_id)
            .iter()
            .copied()
            .filter(|&position| operations[position].outcome.may_have_taken_effect())
            .filter(|&position| !matches!(operations[position].outcome, Outcome::Ok(_)));
        let positions = context.ops_for_reservation(reservation.id).iter().copied().chain(unresolved_holds);
        let mut times = vec![
            moment(reservation.held_us, format!("reservation {} held", reservation.id)),
            moment(reservation.expires_us, format!("reservation {} expires", reservation.id)),
            moment(config.heal_us, "faults healed"),
            moment(config.end_us, "final state read"),
        ];
        times.extend(confirmed_moment(reservation));
        context.violation(
            Invariant::HoldsExpire,
            Subject::Reservation { reservation_id: reservation.id },
            format!(
                "reservation {} on seat {}/{} (user {}, {}): {problem}",
                reservation.id, reservation.schedule_id, reservation.seat_id, reservation.user_id, reservation.status
            ),
            context.op_refs(positions),
            times,
        )
    });
}
