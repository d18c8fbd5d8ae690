//! The checker against hand-made histories: a clean run passes every invariant, and for each
//! invariant a run doctored to break exactly that one fails exactly that one, with a
//! counterexample that names the right seat, key, user or reservation and operations.

use std::net::{IpAddr, Ipv4Addr};

use tcore_sim::checker::{self, CheckReport, Invariant, Subject, Violation};
use tcore_sim::history::{
    AcceptedFence, Admission, AdmissionChange, CheckConfig, Digest, FinalReservation, FinalSchedule, FinalState,
    FinalUser, History, HistoryRecorder, HoldTtlChange, LedgerReason, LedgerRecord, OkResponse, OpId, OpKind,
    OutboxKind, OutboxRecord, Outcome, ReportedStatus, ReservationStatus, UnknownReason,
};

const SEED: u64 = 42;
const SCHEDULE: u64 = 1;
const MS: u64 = 1_000;
const S: u64 = 1_000_000;
/// Every answer in the fixture arrives this long after its call.
const ROUND_TRIP_US: u64 = 5 * MS;

/// Checks `history` and asserts that exactly `expected` invariants failed, each with at least
/// one counterexample carrying the run's seed. Unless the outbox is what is judged, the outbox
/// is first written again for the final state as a faithful store would have written it: a test
/// that doctors a reservation or the ledger doctors its events with it.
#[track_caller]
fn check(history: &History, expected: &[Invariant]) -> CheckReport {
    let mut history = history.clone();
    if !expected.contains(&Invariant::OutboxFaithful) {
        history.final_state.outbox = faithful_outbox(&history.final_state);
    }
    let report = checker::check(&history);
    assert_eq!(report.failed_invariants(), expected, "\n{report}");
    for invariant in expected {
        assert!(
            report.violations.iter().any(|violation| violation.invariant == *invariant),
            "no counterexample for {invariant}\n{report}"
        );
    }
    assert!(report.violations.iter().all(|violation| violation.seed == SEED));
    report
}

/// The only counterexample of `invariant` in `report`.
#[track_caller]
fn only_violation(report: &CheckReport, invariant: Invariant) -> &Violation {
    let found: Vec<&Violation> =
        report.violations.iter().filter(|violation| violation.invariant == invariant).collect();
    assert_eq!(found.len(), 1, "\n{report}");
    found[0]
}

fn op_ids(violation: &Violation) -> Vec<OpId> {
    violation.operations.iter().map(|operation| operation.op_id).collect()
}

/// The outbox a store that writes each change's event with the change holds for `final_state`:
/// in time order, a reservation's stages in order at one time, every event relayed.
fn faithful_outbox(final_state: &FinalState) -> Vec<OutboxRecord> {
    let event =
        |kind, reservation_id, user_id, at_us| OutboxRecord { id: 0, kind, reservation_id, user_id, at_us, sent: true };
    let mut events = Vec::new();
    for reservation in &final_state.reservations {
        let (id, user_id) = (Some(reservation.id), reservation.user_id);
        events.push(event(OutboxKind::ReservationHeld, id, user_id, reservation.held_us));
        if let Some(confirmed_us) = reservation.confirmed_us {
            events.push(event(OutboxKind::ReservationConfirmed, id, user_id, confirmed_us));
        }
        let ended_us = reservation.ended_us.unwrap_or(reservation.expires_us);
        match reservation.status {
            ReservationStatus::Cancelled => events.push(event(OutboxKind::ReservationCancelled, id, user_id, ended_us)),
            ReservationStatus::Expired => events.push(event(OutboxKind::ReservationExpired, id, user_id, ended_us)),
            ReservationStatus::Held | ReservationStatus::Confirmed => {}
        }
    }
    for entry in &final_state.ledger {
        let kind = match entry.reason {
            LedgerReason::TopUp | LedgerReason::Charge => OutboxKind::PointsCharged,
            LedgerReason::Refund => OutboxKind::PointsRefunded,
        };
        events.push(event(kind, entry.reservation_id, entry.user_id, entry.at_us));
    }
    let stage = |kind| match kind {
        OutboxKind::ReservationHeld => 0,
        OutboxKind::PointsCharged | OutboxKind::ReservationConfirmed => 1,
        _ => 2,
    };
    events.sort_by_key(|event| (event.at_us, stage(event.kind)));
    for (id, event) in (1..).zip(&mut events) {
        event.id = id;
    }
    events
}

fn ip(client: u64) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, u8::try_from(client % 256).unwrap_or(0)))
}

fn ok(http_status: u16, body: &str) -> OkResponse {
    OkResponse { http_status, digest: Some(Digest::of(body.as_bytes())), ..OkResponse::default() }
}

fn reservation_answer(reservation_id: u64, fence: u64, status: ReportedStatus) -> Outcome {
    let body = format!(r#"{{"reservation_id":{reservation_id},"fence":{fence},"status":"{status}"}}"#);
    Outcome::Ok(OkResponse {
        reservation_id: Some(reservation_id),
        fence: Some(fence),
        status: Some(status),
        ..ok(200, &body)
    })
}

fn unknown(reason: UnknownReason) -> Outcome {
    Outcome::Unknown { reason }
}

/// The operations of the clean fixture that the tests name.
#[derive(Debug, Clone, Copy)]
struct Ops {
    hold_1001: OpId,
    hold_1001_replay: OpId,
    confirm_1001: OpId,
    read_1001: OpId,
    hold_1002: OpId,
    confirm_1002: OpId,
    cancel_1002: OpId,
    hold_1003_unknown: OpId,
    hold_1004: OpId,
    confirm_1004_unknown: OpId,
    topup_2: OpId,
}

/// A small, clean run of schedule 1 (3 seats, 100 points each) by two clients:
/// - client 101 (user 1) holds seat 11 after a timeout and a rate-limited retry with the same
///   key, replays the hold, confirms it (reservation 1001) and reads it back;
/// - client 102 (user 2) is refused seat 11 (stored refusal), holds seat 12 (1002), confirms
///   and cancels it with a refund, and loses the answer to a hold on seat 13, which the
///   engine made (1003) and later expired;
/// - client 101 holds seat 12 again with a newer fence (1004); its confirm times out and the
///   hold expires.
///
/// Both users were admitted, the later joiner first: one FIFO inversion.
fn clean() -> (History, Ops) {
    let config = CheckConfig {
        hold_ttl_us: 5 * S,
        hold_expiry_grace_us: S,
        admission_rate_per_s: 10.0,
        admission_burst: 10,
        heal_us: 20 * S,
        end_us: 60 * S,
    };
    let mut recorder = HistoryRecorder::new("scenarios/spike.toml", SEED, config);
    let mut call = |client: u64, kind: OpKind, key: Option<&str>, invoke_us: u64, outcome: Outcome| {
        let op_id = recorder.invoke(client, ip(client), kind, key.map(str::to_owned), invoke_us);
        let never_answered = outcome == unknown(UnknownReason::RunEnded);
        if !never_answered {
            recorder.complete(op_id, outcome, invoke_us + ROUND_TRIP_US);
        }
        op_id
    };
    let user = |user_id: u64, points: u64| {
        Outcome::Ok(OkResponse {
            user_id: Some(user_id),
            points: Some(points),
            ..ok(201, &format!(r#"{{"id":{user_id},"points":{points}}}"#))
        })
    };
    call(101, OpKind::CreateUser, None, 100 * MS, user(1, 0));
    call(102, OpKind::CreateUser, None, 200 * MS, user(2, 0));
    call(101, OpKind::ChargePoints { user_id: 1, amount: 500 }, Some("topup-1"), 300 * MS, user(1, 500));
    let topup_2 = call(102, OpKind::ChargePoints { user_id: 2, amount: 300 }, Some("topup-2"), 400 * MS, user(2, 300));
    for (client, token) in [(101, "t1"), (102, "t2")] {
        let joined =
            Outcome::Ok(OkResponse { token: Some(token.to_owned()), ..ok(200, &format!(r#"{{"token":"{token}"}}"#)) });
        call(client, OpKind::JoinQueue { schedule_id: SCHEDULE }, None, 500 * MS, joined);
        let admitted =
            Outcome::Ok(OkResponse { status: Some(ReportedStatus::Admitted), ..ok(200, r#"{"status":"ADMITTED"}"#) });
        call(client, OpKind::QueueStatus { token: token.to_owned() }, None, 1_200 * MS, admitted);
    }
    call(101, OpKind::SeatMap { schedule_id: SCHEDULE }, None, 1_300 * MS, Outcome::Ok(ok(200, "{}")));

    let seat = |seat_id: u64| OpKind::Hold { schedule_id: SCHEDULE, seat_id };
    call(101, seat(11), Some("hold-1"), 2 * S, unknown(UnknownReason::Timeout));
    let rate_limited = Outcome::Fail { http_status: 429, code: "rate_limited".into(), digest: None };
    call(101, seat(11), Some("hold-1"), 2_600 * MS, rate_limited);
    let held_1001 = reservation_answer(1001, 1, ReportedStatus::Held);
    let hold_1001 = call(101, seat(11), Some("hold-1"), 2_800 * MS, held_1001.clone());
    let hold_1001_replay = call(101, seat(11), Some("hold-1"), 3 * S, held_1001);
    let seat_taken = Outcome::Fail {
        http_status: 409,
        code: "seat_taken".into(),
        digest: Some(Digest::of(br#"{"code":"seat_taken"}"#)),
    };
    call(102, seat(11), Some("hold-2a"), 3_100 * MS, seat_taken);
    let hold_1002 = call(102, seat(12), Some("hold-2"), 3_200 * MS, reservation_answer(1002, 1, ReportedStatus::Held));
    let confirm_1001 = call(
        101,
        OpKind::Confirm { reservation_id: 1001 },
        Some("confirm-1001"),
        4 * S,
        reservation_answer(1001, 1, ReportedStatus::Confirmed),
    );
    let confirm_1002 = call(
        102,
        OpKind::Confirm { reservation_id: 1002 },
        Some("confirm-1002"),
        4_100 * MS,
        reservation_answer(1002, 1, ReportedStatus::Confirmed),
    );
    let read_1001 = call(
        101,
        OpKind::ReadReservation { reservation_id: 1001 },
        None,
        4_500 * MS,
        reservation_answer(1001, 1, ReportedStatus::Confirmed),
    );
    let cancel_1002 = call(
        102,
        OpKind::Cancel { reservation_id: 1002 },
        Some("cancel-1002"),
        5 * S,
        reservation_answer(1002, 1, ReportedStatus::Cancelled),
    );
    let hold_1003_unknown = call(102, seat(13), Some("hold-3"), 5_500 * MS, unknown(UnknownReason::ConnectionLost));
    let hold_1004 = call(101, seat(12), Some("hold-4"), 6 * S, reservation_answer(1004, 2, ReportedStatus::Held));
    let confirm_1004_unknown = call(
        101,
        OpKind::Confirm { reservation_id: 1004 },
        Some("confirm-1004"),
        7 * S,
        unknown(UnknownReason::RunEnded),
    );

    for (seat_id, fence, reservation_id, node, at_us) in
        [(11, 1, 1001, 0, 2 * S), (12, 1, 1002, 1, 3_200 * MS), (13, 1, 1003, 0, 5_500 * MS), (12, 2, 1004, 1, 6 * S)]
    {
        recorder.fence(AcceptedFence { schedule_id: SCHEDULE, seat_id, fence, reservation_id, node, at_us });
    }
    recorder.admission(Admission {
        schedule_id: SCHEDULE,
        user_id: 2,
        join_seq: 2,
        joined_us: 500 * MS,
        admitted_us: S,
    });
    recorder.admission(Admission {
        schedule_id: SCHEDULE,
        user_id: 1,
        join_seq: 1,
        joined_us: 500 * MS,
        admitted_us: 1_100 * MS,
    });

    let reservation = |id: u64, seat_id: u64, user_id: u64, status, fence: u64, held_us: u64| FinalReservation {
        id,
        schedule_id: SCHEDULE,
        seat_id,
        user_id,
        status,
        fence,
        held_us,
        expires_us: held_us + 5 * S,
        confirmed_us: None,
        ended_us: (status == ReservationStatus::Expired).then_some(held_us + 5 * S),
        amount_paid: 0,
    };
    let paid = |reservation: FinalReservation, confirmed_us: u64| FinalReservation {
        confirmed_us: Some(confirmed_us),
        amount_paid: 100,
        ..reservation
    };
    let entry = |user_id: u64, delta: i64, reason, reservation_id: Option<u64>, key: Option<&str>, at_us: u64| {
        LedgerRecord { user_id, delta, reason, reservation_id, idempotency_key: key.map(str::to_owned), at_us }
    };
    let outbox = |id: u64, kind, reservation_id: Option<u64>, user_id: u64, at_us: u64| OutboxRecord {
        id,
        kind,
        reservation_id,
        user_id,
        at_us,
        sent: true,
    };
    let final_state = FinalState {
        reservations: vec![
            paid(reservation(1001, 11, 1, ReservationStatus::Confirmed, 1, 2 * S), 4 * S),
            FinalReservation {
                ended_us: Some(5 * S),
                ..paid(reservation(1002, 12, 2, ReservationStatus::Cancelled, 1, 3_200 * MS), 4_100 * MS)
            },
            reservation(1003, 13, 2, ReservationStatus::Expired, 1, 5_500 * MS),
            reservation(1004, 12, 1, ReservationStatus::Expired, 2, 6 * S),
        ],
        users: vec![FinalUser { id: 1, balance: 400 }, FinalUser { id: 2, balance: 300 }],
        ledger: vec![
            entry(1, 500, LedgerReason::TopUp, None, Some("topup-1"), 300 * MS),
            entry(2, 300, LedgerReason::TopUp, None, Some("topup-2"), 400 * MS),
            entry(1, -100, LedgerReason::Charge, Some(1001), Some("confirm-1001"), 4 * S),
            entry(2, -100, LedgerReason::Charge, Some(1002), Some("confirm-1002"), 4_100 * MS),
            entry(2, 100, LedgerReason::Refund, Some(1002), None, 5 * S),
        ],
        schedules: vec![FinalSchedule { id: SCHEDULE, capacity: 3 }],
        // Every change's event, in the order the store wrote them, and all relayed.
        outbox: vec![
            outbox(1, OutboxKind::PointsCharged, None, 1, 300 * MS),
            outbox(2, OutboxKind::PointsCharged, None, 2, 400 * MS),
            outbox(3, OutboxKind::ReservationHeld, Some(1001), 1, 2 * S),
            outbox(4, OutboxKind::ReservationHeld, Some(1002), 2, 3_200 * MS),
            outbox(5, OutboxKind::PointsCharged, Some(1001), 1, 4 * S),
            outbox(6, OutboxKind::ReservationConfirmed, Some(1001), 1, 4 * S),
            outbox(7, OutboxKind::PointsCharged, Some(1002), 2, 4_100 * MS),
            outbox(8, OutboxKind::ReservationConfirmed, Some(1002), 2, 4_100 * MS),
            outbox(9, OutboxKind::PointsRefunded, Some(1002), 2, 5 * S),
            outbox(10, OutboxKind::ReservationCancelled, Some(1002), 2, 5 * S),
            outbox(11, OutboxKind::ReservationHeld, Some(1003), 2, 5_500 * MS),
            outbox(12, OutboxKind::ReservationHeld, Some(1004), 1, 6 * S),
            outbox(13, OutboxKind::ReservationExpired, Some(1003), 2, 10_500 * MS),
            outbox(14, OutboxKind::ReservationExpired, Some(1004), 1, 11 * S),
        ],
    };
    let ops = Ops {
        hold_1001,
        hold_1001_replay,
        confirm_1001,
        read_1001,
        hold_1002,
        confirm_1002,
        cancel_1002,
        hold_1003_unknown,
        hold_1004,
        confirm_1004_unknown,
        topup_2,
    };
    (recorder.finish(final_state), ops)
}

#[track_caller]
fn reservation_mut(history: &mut History, reservation_id: u64) -> &mut FinalReservation {
    history
        .final_state
        .reservations
        .iter_mut()
        .find(|reservation| reservation.id == reservation_id)
        .expect("the fixture has this reservation")
}

#[track_caller]
fn user_mut(history: &mut History, user_id: u64) -> &mut FinalUser {
    history.final_state.users.iter_mut().find(|user| user.id == user_id).expect("the fixture has this user")
}

/// Appends an operation answered `ROUND_TRIP_US` after `invoke_us`.
fn push_op(
    history: &mut History,
    client: u64,
    kind: OpKind,
    key: Option<&str>,
    invoke_us: u64,
    outcome: Outcome,
) -> OpId {
    let op_id = history.operations.len() as OpId;
    history.operations.push(tcore_sim::history::Operation {
        op_id,
        client,
        ip: ip(client),
        kind,
        idempotency_key: key.map(str::to_owned),
        invoke_us,
        complete_us: Some(invoke_us + ROUND_TRIP_US),
        outcome,
    });
    op_id
}

fn charge(user_id: u64, reservation_id: u64, key: &str, at_us: u64) -> LedgerRecord {
    LedgerRecord {
        user_id,
        delta: -100,
        reason: LedgerReason::Charge,
        reservation_id: Some(reservation_id),
        idempotency_key: Some(key.to_owned()),
        at_us,
    }
}

#[test]
fn a_clean_run_passes_every_invariant_and_counts_its_fifo_inversion() {
    let (history, _) = clean();
    assert!(checker::check(&history).passed(), "the fixture's own outbox is faithful");
    let report = check(&history, &[]);
    assert!(report.passed());
    assert_eq!(report.verdicts.len(), Invariant::ALL.len());
    assert!(report.violations.is_empty());
    assert_eq!(report.fifo_inversions, 1, "user 2 joined second and was admitted first");
    assert!(report.history_overflow.is_empty());
}

#[test]
fn two_confirmed_reservations_on_one_seat_are_a_double_sale() {
    let (mut history, ops) = clean();
    // Client 102 takes seat 11 again, as an unfenced lock would let it, and pays for it.
    let hold = push_op(
        &mut history,
        102,
        OpKind::Hold { schedule_id: SCHEDULE, seat_id: 11 },
        Some("hold-5"),
        8 * S,
        reservation_answer(1005, 2, ReportedStatus::Held),
    );
    let confirm = push_op(
        &mut history,
        102,
        OpKind::Confirm { reservation_id: 1005 },
        Some("confirm-1005"),
        9 * S,
        reservation_answer(1005, 2, ReportedStatus::Confirmed),
    );
    history.fences.push(AcceptedFence {
        schedule_id: SCHEDULE,
        seat_id: 11,
        fence: 2,
        reservation_id: 1005,
        node: 1,
        at_us: 8 * S,
    });
    history.final_state.reservations.push(FinalReservation {
        id: 1005,
        schedule_id: SCHEDULE,
        seat_id: 11,
        user_id: 2,
        status: ReservationStatus::Confirmed,
        fence: 2,
        held_us: 8 * S,
        expires_us: 13 * S,
        confirmed_us: Some(9 * S),
        ended_us: None,
        amount_paid: 100,
    });
    history.final_state.ledger.push(charge(2, 1005, "confirm-1005", 9 * S));
    user_mut(&mut history, 2).balance = 200;

    let report = check(&history, &[Invariant::NoDoubleSale]);
    let violation = only_violation(&report, Invariant::NoDoubleSale);
    assert_eq!(violation.subject, Subject::Seat { schedule_id: SCHEDULE, seat_id: 11 });
    assert!(violation.message.contains("reservations 1001, 1005"), "{violation}");
    let quoted = op_ids(violation);
    for op in [ops.hold_1001, ops.confirm_1001, ops.read_1001, hold, confirm] {
        assert!(quoted.contains(&op), "op #{op} missing from\n{violation}");
    }
    let confirmed_at: Vec<u64> = violation.times_us.iter().map(|moment| moment.at_us).collect();
    assert_eq!(confirmed_at, vec![4 * S, 9 * S]);
}

#[test]
fn more_confirmed_reservations_than_seats_break_capacity() {
    let (mut history, ops) = clean();
    history.final_state.schedules[0].capacity = 1;
    // Reservation 1004's unknown confirm did go through, on another seat than 1001.
    let reservation = reservation_mut(&mut history, 1004);
    reservation.status = ReservationStatus::Confirmed;
    reservation.confirmed_us = Some(7 * S);
    reservation.amount_paid = 100;
    history.final_state.ledger.push(charge(1, 1004, "confirm-1004", 7 * S));
    user_mut(&mut history, 1).balance = 300;

    let report = check(&history, &[Invariant::Capacity]);
    let violation = only_violation(&report, Invariant::Capacity);
    assert_eq!(violation.subject, Subject::Schedule { schedule_id: SCHEDULE });
    assert!(violation.message.contains("2 reservations are CONFIRMED but the schedule has 1 seats"), "{violation}");
    assert!(violation.message.contains("beyond capacity: reservations 1004"), "{violation}");
    let quoted = op_ids(violation);
    assert!(quoted.contains(&ops.hold_1004) && quoted.contains(&ops.confirm_1004_unknown), "{violation}");
    assert!(!quoted.contains(&ops.confirm_1001), "only the confirmations beyond capacity are quoted");
}

#[test]
fn a_confirmation_lost_in_a_failover_breaks_durability() {
    let (mut history, ops) = clean();
    // The store lost the confirmation and its charge; the hold then expired.
    let reservation = reservation_mut(&mut history, 1001);
    reservation.status = ReservationStatus::Expired;
    reservation.confirmed_us = None;
    reservation.amount_paid = 0;
    history.final_state.ledger.retain(|entry| entry.reservation_id != Some(1001));
    user_mut(&mut history, 1).balance = 500;

    let report = check(&history, &[Invariant::AcknowledgedConfirmationsDurable]);
    let violation = only_violation(&report, Invariant::AcknowledgedConfirmationsDurable);
    assert_eq!(violation.subject, Subject::Reservation { reservation_id: 1001 });
    assert!(violation.message.contains("2 acknowledgement(s)"), "{violation}");
    assert!(violation.message.contains("at the end it is EXPIRED (seat 1/11)"), "{violation}");
    let quoted = op_ids(violation);
    assert!(quoted.contains(&ops.confirm_1001) && quoted.contains(&ops.read_1001), "{violation}");
    let told_at: Vec<u64> = violation.times_us.iter().map(|moment| moment.at_us).collect();
    assert_eq!(told_at, vec![4 * S + ROUND_TRIP_US, 4_500 * MS + ROUND_TRIP_US]);
}

#[test]
fn a_lost_confirmation_whose_id_was_given_out_again_breaks_durability() {
    let (mut history, _) = clean();
    // The store lost reservation 1001 and handed its id out again, for another seat, which
    // was then sold: the id is CONFIRMED at the end, but not for the seat the client held.
    let reservation = reservation_mut(&mut history, 1001);
    let told_seat = reservation.seat_id;
    reservation.seat_id = told_seat + 100;

    let report = check(&history, &[Invariant::AcknowledgedConfirmationsDurable]);
    let violation = only_violation(&report, Invariant::AcknowledgedConfirmationsDurable);
    assert_eq!(violation.subject, Subject::Reservation { reservation_id: 1001 });
    assert!(violation.message.contains("given out again"), "{violation}");
}

#[test]
fn a_confirmation_cancelled_by_another_client_is_not_excused() {
    let (mut history, _) = clean();
    // Client 101 cancels client 102's reservation instead of client 102.
    let cancel = history
        .operations
        .iter_mut()
        .find(|operation| operation.kind == OpKind::Cancel { reservation_id: 1002 })
        .expect("the fixture cancels 1002");
    cancel.client = 101;

    let report = check(&history, &[Invariant::AcknowledgedConfirmationsDurable]);
    let violation = only_violation(&report, Invariant::AcknowledgedConfirmationsDurable);
    assert_eq!(violation.subject, Subject::Reservation { reservation_id: 1002 });
}

#[test]
fn a_retried_confirm_charged_twice_breaks_single_charge_by_key_and_by_reservation() {
    let (mut history, ops) = clean();
    history.final_state.ledger.push(charge(1, 1001, "confirm-1001", 4_010 * MS));
    user_mut(&mut history, 1).balance = 300;

    let report = check(&history, &[Invariant::SingleCharge]);
    let subjects: Vec<&Subject> = report.violations.iter().map(|violation| &violation.subject).collect();
    assert_eq!(
        subjects,
        vec![&Subject::Reservation { reservation_id: 1001 }, &Subject::IdempotencyKey { key: "confirm-1001".into() },]
    );
    for violation in &report.violations {
        assert!(op_ids(violation).contains(&ops.confirm_1001), "{violation}");
        let charged_at: Vec<u64> = violation.times_us.iter().map(|moment| moment.at_us).collect();
        assert_eq!(charged_at, vec![4 * S, 4_010 * MS]);
    }
}

#[test]
fn a_top_up_applied_twice_for_one_key_breaks_single_charge() {
    let (mut history, ops) = clean();
    let mut again = history.final_state.ledger[1].clone();
    again.at_us += 10 * MS;
    history.final_state.ledger.push(again);
    user_mut(&mut history, 2).balance = 600;

    let report = check(&history, &[Invariant::SingleCharge]);
    let violation = only_violation(&report, Invariant::SingleCharge);
    assert_eq!(violation.subject, Subject::IdempotencyKey { key: "topup-2".into() });
    assert!(violation.message.contains("user 2's balance 2 times (top-up, +600 in all)"), "{violation}");
    assert_eq!(op_ids(violation), vec![ops.topup_2]);
}

#[test]
fn a_charge_beyond_the_balance_breaks_non_negative_balance() {
    let (mut history, ops) = clean();
    // User 1 only topped up 50 but was charged 100 anyway.
    history.final_state.ledger[0].delta = 50;
    user_mut(&mut history, 1).balance = -50;

    let report = check(&history, &[Invariant::NonNegativeBalance]);
    let violation = only_violation(&report, Invariant::NonNegativeBalance);
    assert_eq!(violation.subject, Subject::User { user_id: 1 });
    assert!(
        violation.message.contains("the ledger took the balance to -50 at 4000000 us (charge -100)"),
        "{violation}"
    );
    assert!(violation.message.contains("the final balance is -50"), "{violation}");
    assert!(op_ids(violation).contains(&ops.confirm_1001), "{violation}");
}

#[test]
fn a_balance_that_dips_below_zero_and_recovers_still_breaks_non_negative_balance() {
    let (mut history, _) = clean();
    // User 2 was charged before the top-up landed.
    history.final_state.ledger[1].at_us = 4_500 * MS;

    let report = check(&history, &[Invariant::NonNegativeBalance]);
    let violation = only_violation(&report, Invariant::NonNegativeBalance);
    assert_eq!(violation.subject, Subject::User { user_id: 2 });
    assert!(!violation.message.contains("final balance"), "{violation}");
}

#[test]
fn a_balance_that_disagrees_with_its_ledger_breaks_ledger_balances() {
    let (mut history, ops) = clean();
    user_mut(&mut history, 2).balance = 350;

    let report = check(&history, &[Invariant::LedgerBalances]);
    let violation = only_violation(&report, Invariant::LedgerBalances);
    assert_eq!(violation.subject, Subject::User { user_id: 2 });
    assert!(
        violation.message.contains("the final balance is 350 but the user's 3 ledger entries sum to 300 (off by 50)"),
        "{violation}"
    );
    assert_eq!(op_ids(violation)[1], ops.topup_2);
}

#[test]
fn a_cancellation_without_refund_breaks_charge_iff_sold() {
    let (mut history, ops) = clean();
    history.final_state.ledger.retain(|entry| entry.reason != LedgerReason::Refund);
    user_mut(&mut history, 2).balance = 200;

    let report = check(&history, &[Invariant::ChargeIffSold]);
    let violation = only_violation(&report, Invariant::ChargeIffSold);
    assert_eq!(violation.subject, Subject::Reservation { reservation_id: 1002 });
    assert!(
        violation.message.contains("on seat 1/12 is CANCELLED but its net charge is 100 (charged 100, refunded 0)"),
        "{violation}"
    );
    let quoted = op_ids(violation);
    for op in [ops.hold_1002, ops.confirm_1002, ops.cancel_1002] {
        assert!(quoted.contains(&op), "op #{op} missing from\n{violation}");
    }
}

#[test]
fn a_confirmation_never_charged_breaks_charge_iff_sold() {
    let (mut history, _) = clean();
    history.final_state.ledger.retain(|entry| entry.reservation_id != Some(1001));
    user_mut(&mut history, 1).balance = 500;

    let report = check(&history, &[Invariant::ChargeIffSold]);
    let violation = only_violation(&report, Invariant::ChargeIffSold);
    assert_eq!(violation.subject, Subject::Reservation { reservation_id: 1001 });
    assert!(violation.message.contains("is CONFIRMED (paid 100) but its net charge is 0"), "{violation}");
}

#[test]
fn a_replay_with_another_body_breaks_idempotent_replay() {
    let (mut history, ops) = clean();
    let replay = &mut history.operations[usize::try_from(ops.hold_1001_replay).expect("small")];
    replay.outcome = reservation_answer(1001, 9, ReportedStatus::Held);

    let report = check(&history, &[Invariant::IdempotentReplay]);
    let violation = only_violation(&report, Invariant::IdempotentReplay);
    assert_eq!(violation.subject, Subject::IdempotencyKey { key: "hold-1".into() });
    assert!(violation.message.contains("2 answers to the same key carry 2 different responses"), "{violation}");
    assert_eq!(op_ids(violation), vec![ops.hold_1001, ops.hold_1001_replay]);
}

#[test]
fn a_stored_refusal_replayed_as_success_breaks_idempotent_replay() {
    let (mut history, _) = clean();
    let refused = history
        .operations
        .iter()
        .find(|operation| operation.idempotency_key.as_deref() == Some("hold-2a"))
        .expect("the fixture's refused hold")
        .clone();
    let retry = push_op(
        &mut history,
        refused.client,
        refused.kind,
        Some("hold-2a"),
        9 * S,
        reservation_answer(1006, 3, ReportedStatus::Held),
    );

    let report = check(&history, &[Invariant::IdempotentReplay]);
    let violation = only_violation(&report, Invariant::IdempotentReplay);
    assert_eq!(violation.subject, Subject::IdempotencyKey { key: "hold-2a".into() });
    assert_eq!(op_ids(violation), vec![refused.op_id, retry]);
}

#[test]
fn a_stale_fence_accepted_after_a_newer_one_breaks_fences_monotonic() {
    let (mut history, ops) = clean();
    // Reservation 1004's write went through with the stale fence 1, as an unfenced lock allows.
    let stale = history.fences.iter_mut().find(|fence| fence.reservation_id == 1004).expect("fence of 1004");
    stale.fence = 1;
    reservation_mut(&mut history, 1004).fence = 1;

    let report = check(&history, &[Invariant::FencesMonotonic]);
    let violation = only_violation(&report, Invariant::FencesMonotonic);
    assert_eq!(violation.subject, Subject::Seat { schedule_id: SCHEDULE, seat_id: 12 });
    assert!(
        violation.message.starts_with(
            "fence 1 (reservation 1004, node 1) was accepted at 6000000 us after fence 1 (reservation 1002, node 1)"
        ),
        "{violation}"
    );
    let quoted = op_ids(violation);
    assert!(quoted.contains(&ops.hold_1002) && quoted.contains(&ops.hold_1004), "{violation}");
}

#[test]
fn a_hold_still_held_after_expiry_heal_and_grace_breaks_holds_expire_and_quotes_the_unknown_hold() {
    let (mut history, ops) = clean();
    reservation_mut(&mut history, 1003).status = ReservationStatus::Held;

    let report = check(&history, &[Invariant::HoldsExpire]);
    let violation = only_violation(&report, Invariant::HoldsExpire);
    assert_eq!(violation.subject, Subject::Reservation { reservation_id: 1003 });
    assert!(violation.message.contains("seat 1/13"), "{violation}");
    assert!(violation.message.contains("still HELD at the end (60000000 us)"), "{violation}");
    assert_eq!(op_ids(violation), vec![ops.hold_1003_unknown]);
}

#[test]
fn a_hold_still_held_within_the_grace_after_healing_passes() {
    let (mut history, _) = clean();
    reservation_mut(&mut history, 1003).status = ReservationStatus::Held;
    // The faults healed so late that the sweeper is still within its grace at the end.
    history.config.heal_us = history.config.end_us - history.config.hold_expiry_grace_us + 1;
    check(&history, &[]);
}

#[test]
fn a_confirmation_after_the_hold_expired_breaks_holds_expire() {
    let (mut history, _) = clean();
    history.config.heal_us = 0;
    let reservation = reservation_mut(&mut history, 1001);
    reservation.confirmed_us = Some(reservation.expires_us);

    let report = check(&history, &[Invariant::HoldsExpire]);
    let violation = only_violation(&report, Invariant::HoldsExpire);
    assert_eq!(violation.subject, Subject::Reservation { reservation_id: 1001 });
    assert!(violation.message.contains("confirmed at 7000000 us, after its hold expired at 7000000 us"), "{violation}");
}

#[test]
fn a_hold_granted_longer_than_any_ttl_breaks_holds_expire_unless_the_ttl_was_raised() {
    let (mut history, _) = clean();
    // A unit slip: the 5 s TTL multiplied by 1000 once too often.
    reservation_mut(&mut history, 1004).expires_us = 6 * S + 5 * S * 1_000;
    let mut raised = history.clone();

    let report = check(&history, &[Invariant::HoldsExpire]);
    let violation = only_violation(&report, Invariant::HoldsExpire);
    assert_eq!(violation.subject, Subject::Reservation { reservation_id: 1004 });
    assert!(
        violation.message.contains("hold granted for 5000000000 us, longer than any TTL in force (5000000 us)"),
        "{violation}"
    );

    raised.hold_ttl_changes.push(HoldTtlChange { at_us: S, hold_ttl_us: 5 * S * 1_000 });
    // Raised that far, the hold is legitimate and still within its TTL at the end.
    reservation_mut(&mut raised, 1004).status = ReservationStatus::Held;
    check(&raised, &[]);
}

/// The outbox event of `kind` for `reservation_id` in the clean fixture.
#[track_caller]
fn event_mut(history: &mut History, kind: OutboxKind, reservation_id: u64) -> &mut OutboxRecord {
    history
        .final_state
        .outbox
        .iter_mut()
        .find(|event| event.kind == kind && event.reservation_id == Some(reservation_id))
        .expect("the fixture has this event")
}

/// Checks a history whose outbox alone was doctored: the outbox invariant, and only it, fails,
/// once, for `reservation_id`, with a message that contains `says`.
#[track_caller]
fn check_outbox(history: &History, reservation_id: u64, says: &str) -> Violation {
    let report = check(history, &[Invariant::OutboxFaithful]);
    let violation = only_violation(&report, Invariant::OutboxFaithful).clone();
    assert_eq!(violation.subject, Subject::Reservation { reservation_id });
    assert!(violation.message.contains(says), "{violation}");
    violation
}

#[test]
fn a_confirmation_without_its_outbox_event_breaks_outbox_faithful() {
    let (mut history, ops) = clean();
    history
        .final_state
        .outbox
        .retain(|event| !(event.kind == OutboxKind::ReservationConfirmed && event.reservation_id == Some(1001)));

    let violation = check_outbox(
        &history,
        1001,
        "1 change(s) call for a reservation_confirmed event and 0 such event(s) were written",
    );
    assert!(op_ids(&violation).contains(&ops.confirm_1001), "{violation}");
    assert!(violation.to_string().contains("the change the reservation_confirmed event records"), "{violation}");
}

#[test]
fn a_refund_with_two_outbox_events_breaks_outbox_faithful() {
    let (mut history, ops) = clean();
    let mut again = event_mut(&mut history, OutboxKind::PointsRefunded, 1002).clone();
    again.id = 15;
    history.final_state.outbox.push(again);

    let violation = check_outbox(&history, 1002, "2 points_refunded event(s) were written for 1 such change(s)");
    assert!(op_ids(&violation).contains(&ops.cancel_1002), "{violation}");
}

#[test]
fn an_expiry_written_before_its_hold_breaks_outbox_faithful() {
    let (mut history, _) = clean();
    // The store wrote the expiry of 1003 (event 13) before its hold (event 11).
    event_mut(&mut history, OutboxKind::ReservationHeld, 1003).id = 13;
    event_mut(&mut history, OutboxKind::ReservationExpired, 1003).id = 11;

    check_outbox(&history, 1003, "event #13 (reservation_held) comes after event #11 (reservation_expired)");
}

#[test]
fn a_cancellation_event_written_apart_from_its_change_breaks_outbox_faithful() {
    let (mut history, _) = clean();
    event_mut(&mut history, OutboxKind::ReservationCancelled, 1002).at_us = 5_200 * MS;

    check_outbox(&history, 1002, "1 reservation_cancelled event(s) carry another time than their change's");
}

#[test]
fn an_event_never_relayed_breaks_outbox_faithful() {
    let (mut history, _) = clean();
    event_mut(&mut history, OutboxKind::ReservationConfirmed, 1001).sent = false;

    check_outbox(&history, 1001, "1 event(s) never relayed (ids 6)");
}

fn admissions(schedule_id: u64, first_join_seq: u64, count: u64, admitted_us: u64) -> Vec<Admission> {
    (0..count)
        .map(|index| Admission {
            schedule_id,
            user_id: 100 + first_join_seq + index,
            join_seq: first_join_seq + index,
            joined_us: 500 * MS,
            admitted_us,
        })
        .collect()
}

#[test]
fn admitting_more_than_the_burst_at_once_breaks_admission_rate() {
    let (mut history, _) = clean();
    // By 3 s the line has banked its whole burst of 10; admitting 12 at once is 2 too many.
    history.admissions.extend(admissions(SCHEDULE, 3, 12, 3 * S));

    let report = check(&history, &[Invariant::AdmissionRate]);
    let violation = only_violation(&report, Invariant::AdmissionRate);
    assert_eq!(violation.subject, Subject::Schedule { schedule_id: SCHEDULE });
    assert!(
        violation
            .message
            .starts_with("12 users were admitted in 0 us (3000000 us to 3000000 us), more than the 10.000 allowed"),
        "{violation}"
    );
    assert!(violation.message.contains("2 admissions ended a window over the bound"), "{violation}");
    assert_eq!(violation.times_us.len(), 2);
    assert!(violation.times_us[0].event.contains("join #3"), "{violation}");
    assert!(violation.times_us[1].event.contains("join #14"), "{violation}");
}

#[test]
fn a_raised_admission_rate_allows_more_and_a_paused_line_allows_none() {
    let (mut history, _) = clean();
    history.admissions.extend(admissions(SCHEDULE, 3, 12, 3 * S));
    history.admission_changes.push(AdmissionChange {
        at_us: 2 * S,
        schedule_id: SCHEDULE,
        rate_per_s: 100.0,
        burst: 100,
        paused: false,
    });
    check(&history, &[]);

    let (mut paused, _) = clean();
    paused.admission_changes.push(AdmissionChange {
        at_us: 2 * S,
        schedule_id: SCHEDULE,
        rate_per_s: 10.0,
        burst: 10,
        paused: true,
    });
    // Paused at 2 s, the line may still spend its banked burst of 10, but not admit an 11th.
    paused.admissions.extend((0..11).flat_map(|second| admissions(SCHEDULE, 3 + second, 1, 5 * S + second * 100 * MS)));
    let report = check(&paused, &[Invariant::AdmissionRate]);
    let violation = only_violation(&report, Invariant::AdmissionRate);
    assert!(violation.times_us.iter().any(|moment| moment.event.contains("paused")), "{violation}");
}

#[test]
fn a_violation_prints_the_seed_the_replay_command_the_times_and_the_operations() {
    let (mut history, ops) = clean();
    let replay = &mut history.operations[usize::try_from(ops.hold_1001_replay).expect("small")];
    replay.outcome = reservation_answer(1001, 9, ReportedStatus::Held);
    let report = check(&history, &[Invariant::IdempotentReplay]);
    let first = Digest::of(br#"{"reservation_id":1001,"fence":1,"status":"HELD"}"#);
    let second = Digest::of(br#"{"reservation_id":1001,"fence":9,"status":"HELD"}"#);
    let (low, high) = if first < second { (first, second) } else { (second, first) };
    let expected = format!(
        "idempotent-replay violated for idempotency key \"hold-1\": 2 answers to the same key carry 2 different \
         responses (digests {low}, {high})\n  \
         seed 42; replay with: tcore run scenarios/spike.toml --seed 42\n  \
         at      2805000 us: op #{hold} answered with digest {first}\n  \
         at      3005000 us: op #{replay} answered with digest {second}\n  \
         op #{hold} client 101 [2800000 us -> 2805000 us] hold seat 1/11 key \"hold-1\" => ok 200 reservation 1001 fence 1 HELD digest {first}\n  \
         op #{replay} client 101 [3000000 us -> 3005000 us] hold seat 1/11 key \"hold-1\" => ok 200 reservation 1001 fence 9 HELD digest {second}\n",
        hold = ops.hold_1001,
        replay = ops.hold_1001_replay,
    );
    assert_eq!(report.violations[0].to_string(), expected);
    let summary = report.to_string();
    assert!(
        summary.starts_with("check of scenarios/spike.toml with seed 42: FAIL (1 of 12 invariants violated)\n"),
        "{summary}"
    );
    assert!(summary.contains("  FAIL idempotent-replay (1 violations)\n"), "{summary}");
    assert!(summary.contains("  FIFO inversions: 1\n"), "{summary}");
}

#[test]
fn the_report_is_deterministic_and_round_trips_through_json() {
    let (mut history, _) = clean();
    user_mut(&mut history, 2).balance = 350;
    reservation_mut(&mut history, 1003).status = ReservationStatus::Held;
    let report = checker::check(&history);
    assert_eq!(checker::check(&history), report);
    let json = serde_json::to_string(&report).expect("serialise");
    assert!(json.contains(r#""invariant":"ledger-balances""#), "{json}");
    assert!(json.contains(r#""subject":{"type":"user","user_id":2}"#), "{json}");
    let back: CheckReport = serde_json::from_str(&json).expect("parse");
    assert_eq!(back, report);

    let history_json = serde_json::to_string(&history).expect("serialise history");
    let history_back: History = serde_json::from_str(&history_json).expect("parse history");
    assert_eq!(checker::check(&history_back), report);
}

#[test]
fn a_thousand_oversold_seats_keep_a_bounded_number_of_counterexamples() {
    let (mut history, _) = clean();
    let oversold = 1_000_u64;
    history.final_state.schedules[0].capacity = 2 * oversold + 1;
    for seat_id in 0..oversold {
        for copy in 0..2 {
            let id = 10_000 + 2 * seat_id + copy;
            history.final_state.reservations.push(FinalReservation {
                id,
                schedule_id: SCHEDULE,
                seat_id: 100 + seat_id,
                user_id: 1,
                status: ReservationStatus::Confirmed,
                fence: 1 + copy,
                held_us: 8 * S,
                expires_us: 13 * S,
                confirmed_us: Some(9 * S),
                ended_us: None,
                amount_paid: 0,
            });
        }
    }
    let report = check(&history, &[Invariant::NoDoubleSale]);
    assert_eq!(report.verdicts[0].violations, oversold);
    assert_eq!(report.violations.len(), checker::VIOLATIONS_PER_INVARIANT_MAX);
    assert_eq!(report.violations_omitted, oversold - checker::VIOLATIONS_PER_INVARIANT_MAX as u64);
    assert_eq!(report.violations[0].subject, Subject::Seat { schedule_id: SCHEDULE, seat_id: 100 });
}

#[test]
fn every_invariant_has_a_stable_kebab_case_name() {
    let names: Vec<String> =
        Invariant::ALL.iter().map(|invariant| serde_json::to_string(invariant).expect("serialise")).collect();
    assert_eq!(
        names,
        [
            "\"no-double-sale\"",
            "\"capacity\"",
            "\"acknowledged-confirmations-durable\"",
            "\"single-charge\"",
            "\"non-negative-balance\"",
            "\"ledger-balances\"",
            "\"charge-iff-sold\"",
            "\"idempotent-replay\"",
            "\"fences-monotonic\"",
            "\"holds-expire\"",
            "\"admission-rate\"",
            "\"outbox-faithful\"",
        ]
    );
    for invariant in Invariant::ALL {
        assert_eq!(format!("\"{invariant}\""), serde_json::to_string(&invariant).expect("serialise"));
    }
}
