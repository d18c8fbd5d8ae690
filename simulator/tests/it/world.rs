//! Whole simulated runs: the same seed gives the same bytes, the checker catches the
//! known-unsafe hold mode with a counterexample while the safe modes pass, and a cache store
//! that comes back empty costs fans their places but neither the sale nor its safety.

use std::path::Path;

use tcore_sim::checker::{CheckReport, Invariant, check};
use tcore_sim::history::{OutboxKind, Outcome, ReservationStatus};
use tcore_sim::scenario::{Fault, HoldMode, RecordReplication, Scenario};
use tcore_sim::score::run_result;
use tcore_sim::world;

pub(crate) fn scenario(name: &str) -> Scenario {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/ci").join(name);
    Scenario::load(&path).unwrap_or_else(|error| panic!("{error}"))
}

/// Runs a scenario; returns the run result's bytes and the checker's report.
pub(crate) fn run(scenario: &Scenario) -> (Vec<u8>, CheckReport) {
    let world =
        world::run(scenario, "ci", &mut |_| {}).unwrap_or_else(|error| panic!("seed {}: {error:#}", scenario.seed));
    result_bytes(scenario, &world)
}

/// The run result's bytes of a finished world, and the checker's report.
fn result_bytes(scenario: &Scenario, world: &world::WorldRun) -> (Vec<u8>, CheckReport) {
    let report = check(&world.history);
    let result = run_result(scenario, "ci", "test", world, &report);
    (serde_json::to_vec_pretty(&result).expect("serializable"), report)
}

#[test]
fn the_same_seed_gives_a_byte_identical_run_and_another_seed_a_different_one() {
    let base = scenario("concert-open.toml");
    let (first, report) = run(&base);
    assert!(report.passed(), "seed {}: {report}", base.seed);
    let (second, _) = run(&base);
    assert!(first == second, "seed {}: two runs of one seed differ", base.seed);
    let (other, _) = run(&base.clone().with_seed(base.seed + 1));
    assert!(first != other, "seeds {} and {} gave the same run", base.seed, base.seed + 1);
}

#[test]
fn a_run_that_logs_its_requests_runs_the_same_and_logs_each_request_once() {
    let base = scenario("concert-open.toml");
    let unlogged = world::run(&base, "ci", &mut |_| {}).expect("run");
    assert!(unlogged.requests.is_empty(), "nothing is logged unless asked");
    let logged = world::run_with(&base, "ci", &mut |_| {}, world::RunOptions { log_requests: true })
        .unwrap_or_else(|error| panic!("seed {}: {error:#}", base.seed));
    assert!(result_bytes(&base, &unlogged).0 == result_bytes(&base, &logged).0, "logging changed the run");
    assert_eq!(logged.requests.len(), base.clients as usize, "one log per client host");
    let mut sent: Vec<u64> = logged.requests.iter().flatten().map(|request| request.at_us).collect();
    let mut invoked: Vec<u64> = logged.history.operations.iter().map(|operation| operation.invoke_us).collect();
    sent.sort_unstable();
    invoked.sort_unstable();
    assert!(!sent.is_empty());
    assert_eq!(sent, invoked, "every operation's request is logged once, at its invoke time");
}

/// The history keeps a digest of an answer exactly when its call carried an idempotency key:
/// those are the answers the checker compares for replays.
#[test]
fn answers_to_keyed_calls_carry_a_digest_and_only_those() {
    let base = scenario("concert-open.toml");
    let world = world::run(&base, "ci", &mut |_| {}).unwrap_or_else(|error| panic!("seed {}: {error:#}", base.seed));
    let answered: Vec<(bool, bool)> = world
        .history
        .operations
        .iter()
        .filter_map(|operation| match &operation.outcome {
            Outcome::Ok(response) => Some((operation.idempotency_key.is_some(), response.digest.is_some())),
            _ => None,
        })
        .collect();
    assert!(answered.iter().any(|&(keyed, _)| keyed) && answered.iter().any(|&(keyed, _)| !keyed));
    assert!(answered.iter().all(|&(keyed, digested)| keyed == digested));
}

#[test]
fn a_lock_holder_paused_past_its_ttl_oversells_with_unfenced_lock_and_is_caught() {
    let unsafe_run = scenario("lock-holder-pause.toml").with_hold_mode(HoldMode::UnfencedLock);
    let (_, report) = run(&unsafe_run);
    let failed = report.failed_invariants();
    assert!(failed.contains(&Invariant::NoDoubleSale), "seed {}: {report}", unsafe_run.seed);
    let counterexample = report
        .violations
        .iter()
        .find(|violation| violation.invariant == Invariant::NoDoubleSale)
        .expect("a counterexample for the double sale");
    assert!(counterexample.operations.len() >= 2, "the conflicting holds are quoted: {counterexample}");
    assert_eq!(counterexample.seed, unsafe_run.seed);
}

#[test]
fn the_same_pause_is_harmless_with_fenced_lock_and_atomic_holds() {
    for mode in [HoldMode::FencedLock, HoldMode::Atomic] {
        let safe_run = scenario("lock-holder-pause.toml").with_hold_mode(mode);
        let (_, report) = run(&safe_run);
        assert!(report.passed(), "{mode:?}, seed {}: {report}", safe_run.seed);
    }
}

/// The record store's failover of `store-failover.toml`, as the run result reports it.
fn record_failover(result: &serde_json::Value) -> &serde_json::Value {
    result["store_failovers"]
        .as_array()
        .and_then(|failovers| failovers.iter().find(|failover| failover["host"] == "store-record"))
        .expect("the record store failed over")
}

#[test]
fn the_store_failover_comes_while_users_pay_and_async_replication_loses_confirmations_and_is_caught() {
    let unsafe_run = scenario("store-failover.toml").with_record_replication(RecordReplication::Async);
    assert!(unsafe_run.is_unsafe());
    let (bytes, report) = run(&unsafe_run);
    let result: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON");
    let lost = record_failover(&result)["writes_lost"].as_u64().expect("writes_lost");
    assert!(lost > 0, "the failover must not dodge the payments: {}", record_failover(&result));
    assert!(
        report.failed_invariants().contains(&Invariant::AcknowledgedConfirmationsDurable),
        "seed {}: {report}",
        unsafe_run.seed
    );
    let counterexample = report
        .violations
        .iter()
        .find(|violation| violation.invariant == Invariant::AcknowledgedConfirmationsDurable)
        .expect("a counterexample for the lost confirmation");
    assert!(!counterexample.operations.is_empty(), "the acknowledged confirm is quoted: {counterexample}");
    assert_eq!(counterexample.seed, unsafe_run.seed);
}

#[test]
fn the_same_failover_loses_no_acknowledged_confirmation_with_semi_sync_replication() {
    let safe_run = scenario("store-failover.toml");
    assert_eq!(safe_run.engine.record_replication, RecordReplication::SemiSync, "safe without asking");
    let (bytes, report) = run(&safe_run);
    assert!(report.passed(), "seed {}: {report}", safe_run.seed);
    let result: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON");
    let failover = record_failover(&result);
    assert!(failover["writes_kept_by_standby"].as_u64() > Some(0), "writes were at stake: {failover}");
    assert_eq!(result["faults_without_effect"], serde_json::json!([]), "every fault bit");
}

#[test]
fn a_fault_that_never_bites_is_listed_as_without_effect_in_the_run_result_and_the_report() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/ci/concert-open.toml");
    let text = std::fs::read_to_string(&path).expect("scenario");
    // Atomic holds take no lock, so `hold.after_lock` is never reached.
    let dodging = format!(
        "{text}\n[[faults]]\nkind = \"pause-at\"\npoint = \"hold.after_lock\"\nhost = \"engine-1\"\npause_ms = 5_000\n"
    );
    let dodging = Scenario::parse(&dodging, "dodging.toml").unwrap_or_else(|error| panic!("{error}"));
    assert_eq!(dodging.engine.hold_mode, HoldMode::Atomic);
    let (bytes, report) = run(&dodging);
    assert!(report.passed(), "seed {}: {report}", dodging.seed);
    let result: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON");
    let dodged = result["faults_without_effect"].as_array().expect("a list");
    assert_eq!(dodged.len(), 1, "{dodged:?}");
    assert_eq!((dodged[0]["fault"].as_u64(), dodged[0]["kind"].as_str()), (Some(0), Some("pause-at")));
    assert!(dodged[0]["reason"].as_str().is_some_and(|reason| reason.starts_with("nothing paused")), "{dodged:?}");
    let html = tcore_reports::render(&[result]).unwrap_or_else(|error| panic!("{error}"));
    assert!(html.contains("Faults without effect") && html.contains("nothing paused"));
}

/// Runs `scenario` and returns the world (for its history) and the run result.
fn run_world(scenario: &Scenario) -> (world::WorldRun, Vec<u8>, CheckReport) {
    let world =
        world::run(scenario, "ci", &mut |_| {}).unwrap_or_else(|error| panic!("seed {}: {error:#}", scenario.seed));
    let (bytes, report) = result_bytes(scenario, &world);
    (world, bytes, report)
}

/// How many answers in a run result carried the problem `code`.
fn answered(result: &serde_json::Value, code: &str) -> u64 {
    result["score"]["errors"]["by_code"][code].as_u64().unwrap_or(0)
}

#[test]
fn a_cache_store_that_comes_back_empty_loses_places_and_the_sale_goes_on() {
    let lossy = scenario("cache-loss.toml");
    let Some(Fault::Crash(crash)) = lossy.faults.first() else { panic!("cache-loss.toml crashes a host first") };
    assert!(crash.lose_data && crash.host == "store-cache", "{crash:?}");
    let (crash_us, restart_us) = ((crash.at_s * 1e6) as u64, (crash.restart_at_s.expect("a restart") * 1e6) as u64);

    let (world, bytes, report) = run_world(&lossy);
    assert!(report.passed(), "seed {}: {report}", lossy.seed);
    let result: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON");
    assert_eq!(result["faults_without_effect"], serde_json::json!([]), "the loss bit");
    let loss = &result["store_data_losses"][0];
    assert_eq!((loss["fault"].as_u64(), loss["host"].as_str()), (Some(0), Some("store-cache")), "{loss}");
    assert!(loss["lost"]["writes_lost"].as_u64() > Some(0), "the store held data when it crashed: {loss}");
    assert!(answered(&result, "queue_place_lost") > 0, "fans met the loss: {}", result["score"]["errors"]);
    let sold_after_restart = world
        .history
        .final_state
        .reservations
        .iter()
        .filter(|reservation| reservation.status == ReservationStatus::Confirmed)
        .filter(|reservation| reservation.confirmed_us.is_some_and(|at_us| at_us > restart_us))
        .count();
    assert!(sold_after_restart > 0, "the sale went on after the cache store came back");
    // The store forgot every admission it made before the crash; the history reads them from it.
    assert!(world.history.admissions.iter().all(|admission| admission.admitted_us >= crash_us));

    // The same run with a store that keeps its data: nobody's place is lost.
    let mut keeping = lossy.clone();
    if let Some(Fault::Crash(crash)) = keeping.faults.first_mut() {
        crash.lose_data = false;
    }
    let (kept, kept_bytes, kept_report) = run_world(&keeping);
    assert!(kept_report.passed(), "seed {}: {kept_report}", keeping.seed);
    let kept_result: serde_json::Value = serde_json::from_slice(&kept_bytes).expect("JSON");
    assert_eq!(answered(&kept_result, "queue_place_lost"), 0, "{}", kept_result["score"]["errors"]);
    assert_eq!(kept_result["store_data_losses"], serde_json::json!([]));
    assert!(kept.history.admissions.iter().any(|admission| admission.admitted_us < crash_us));

    let (again, _) = run(&lossy);
    assert!(bytes == again, "seed {}: two runs of one seed differ", lossy.seed);
}

#[test]
fn a_real_run_writes_and_relays_one_outbox_event_for_each_change() {
    let base = scenario("concert-open.toml");
    let (world, _, report) = run_world(&base);
    let verdict = report.verdicts.iter().find(|verdict| verdict.invariant == Invariant::OutboxFaithful);
    assert!(verdict.is_some_and(|verdict| verdict.passed), "seed {}: {report}", base.seed);
    let final_state = &world.history.final_state;
    assert!(final_state.outbox.iter().all(|event| event.sent), "the relay drained the outbox");
    let confirmed = final_state.reservations.iter().filter(|reservation| reservation.confirmed_us.is_some()).count();
    let confirmations =
        final_state.outbox.iter().filter(|event| event.kind == OutboxKind::ReservationConfirmed).count();
    assert!(confirmed > 0 && confirmations == confirmed, "{confirmations} events for {confirmed} confirmations");
}

#[test]
fn a_paused_engine_node_answers_nothing_until_it_goes_on_and_the_sale_stays_safe() {
    let base = scenario("concert-open.toml");
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/ci/concert-open.toml"))
        .expect("scenario");
    // Longer than a request's timeout (2 s), while fans pour in.
    let paused = format!("{text}\n[[faults]]\nkind = \"pause\"\nhost = \"engine-1\"\nat_s = 8\npause_ms = 4_000\n");
    let paused = Scenario::parse(&paused, "paused.toml").unwrap_or_else(|error| panic!("{error}"));
    let (start_us, end_us) = (8_000_000, 12_000_000);
    let timed_out_in_window = |world: &world::WorldRun| {
        world
            .history
            .operations
            .iter()
            .filter(|operation| (start_us..end_us).contains(&operation.invoke_us))
            .filter(|operation| matches!(operation.outcome, Outcome::Unknown { .. }))
            .count()
    };

    let (world, bytes, report) = run_world(&paused);
    assert!(report.passed(), "seed {}: {report}", paused.seed);
    let result: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON");
    assert_eq!(result["faults_without_effect"], serde_json::json!([]), "the pause bit");
    let window = &result["faults"][0];
    assert_eq!(
        (window["kind"].as_str(), window["start_us"].as_u64(), window["end_us"].as_u64()),
        (Some("pause"), Some(start_us), Some(end_us))
    );
    let (calm, _, _) = run_world(&base);
    assert!(
        timed_out_in_window(&world) > timed_out_in_window(&calm),
        "calls to the paused node went unanswered: {} against {} without the pause",
        timed_out_in_window(&world),
        timed_out_in_window(&calm)
    );
    let (again, _) = run(&paused);
    assert!(bytes == again, "seed {}: two runs of one seed differ", paused.seed);
}
