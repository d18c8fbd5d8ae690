//! The ops agent in the simulated world: the rules agent against a bot storm and a calm
//! opening, determinism with the agent on, and an llm run recorded then replayed.

use std::path::PathBuf;

use axum::Json;
use axum::routing::post;
use serde_json::{Value, json};
use tcore_sim::scenario::{AgentPolicy, Scenario};

use crate::world::{run, scenario};

fn json_of(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).expect("run.json is JSON")
}

fn with_policy(mut scenario: Scenario, policy: AgentPolicy) -> Scenario {
    scenario.agent.policy = policy;
    scenario
}

fn figure(run: &Value, pointer: &str) -> f64 {
    run.pointer(pointer).and_then(Value::as_f64).unwrap_or_else(|| panic!("{pointer} in {run}"))
}

/// Scalpers without sessions can no longer take places in line for other users' ids: the
/// engine refuses every join of theirs, so fans get every seat with or without the agent, and
/// the rules agent still blocks the scalpers' addresses without harming a fan.
#[test]
fn in_the_bot_storm_sessionless_scalpers_take_no_seat_and_the_rules_agent_blocks_them_harmlessly() {
    let storm = scenario("bot-storm.toml");
    let (rules, _) = run(&with_policy(storm.clone(), AgentPolicy::Rules));
    let (none, _) = run(&with_policy(storm.clone(), AgentPolicy::None));
    let (rules, none) = (json_of(&rules), json_of(&none));
    let seed = storm.seed;
    let seats: f64 =
        storm.venue.schedules.iter().flat_map(|s| &s.sections).map(|section| f64::from(section.seats)).sum();
    for run in [&rules, &none] {
        assert_eq!(figure(run, "/score/oversell"), 0.0, "seed {seed}");
        assert_eq!(figure(run, "/score/seats/sold"), seats, "seed {seed}: fans bought every seat");
    }
    assert!(figure(&rules, "/score/agent/actions_applied") > 0.0, "seed {seed}: the agent acted");
    assert_eq!(figure(&rules, "/score/agent/harm/legitimate_users_blocked"), 0.0, "seed {seed}");
    assert_eq!(rules["score"]["agent"]["caused_safety_violation"], json!(false));
    assert!(
        none["score"]["bots"]["answers"]["401"].as_f64().is_some_and(|refused| refused > 0.0),
        "seed {seed}: the scalpers' sessionless calls are refused: {}",
        none["score"]["bots"]
    );
    assert_eq!(none["agent_actions"], json!([]));
    assert_eq!(none["score"]["agent"]["time_to_detect_s"], Value::Null);
    assert!(rules["agent_actions"].as_array().is_some_and(|actions| {
        actions.iter().all(|action| action["tool"] == "block_ip" && action["outcome"] == "applied")
    }));
}

/// A scalper with two accounts of their own, spread over 40 addresses: each address is as
/// quiet as a fan, each account floods. The bots log in with their accounts' sessions, so their
/// joins are served (a sessionless bot's are refused 401), and the rules agent blocks the two
/// users, no address, harming no fan.
#[test]
fn bots_with_accounts_call_with_their_own_sessions_and_the_rules_agent_blocks_the_users() {
    let text =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scenarios/ci/calm-opening.toml"))
            .expect("scenario");
    let bot = "\n[[bots]]\nname = \"farm\"\nips = 40\nrate_per_s = 400\nstart_s = 3\nend_s = 30\naccounts = 2\n\
               targets = [\"queue-join\"]\n";
    let mut farm = Scenario::parse(&format!("{text}{bot}"), "farm.toml").unwrap_or_else(|error| panic!("{error}"));
    farm.slo.thresholds.retain(|threshold| !threshold.metric.starts_with("agent."));
    assert_eq!(farm.bots[0].accounts, 2);
    let (bytes, report) = run(&farm);
    let seed = farm.seed;
    assert!(report.passed(), "seed {seed}: {report}");
    let result = json_of(&bytes);
    let answers = &result["score"]["bots"]["answers"];
    assert!(answers.get("401").is_none(), "seed {seed}: every bot call carried a session: {answers}");
    assert!(
        figure(&result, "/score/bots/answers/201") > 0.0,
        "seed {seed}: the bots' own joins were served: {answers}"
    );
    assert!(figure(&result, "/score/bots/answers/403") > 0.0, "seed {seed}: then refused as blocked: {answers}");
    let actions = result["agent_actions"].as_array().expect("actions");
    let blocked: std::collections::BTreeSet<u64> = actions
        .iter()
        .filter(|action| action["tool"] == "block_user" && action["outcome"] == "applied")
        .filter_map(|action| action["args"]["user_id"].as_u64())
        .collect();
    // The bot's accounts come after the fans' (see `scenarios/README.md`).
    let first_bot_account = farm.users_total() + 1;
    assert_eq!(blocked, [first_bot_account, first_bot_account + 1].into(), "seed {seed}: {actions:?}");
    assert!(actions.iter().all(|action| action["tool"] != "block_ip"), "seed {seed}: no address blocked: {actions:?}");
    assert_eq!(figure(&result, "/score/agent/harm/legitimate_users_blocked"), 0.0, "seed {seed}");
    assert_eq!(figure(&result, "/score/agent/harm/legitimate_users_turned_away"), 0.0, "seed {seed}");
}

#[test]
fn without_faults_the_rules_agent_decides_but_takes_no_action() {
    let calm = scenario("calm-opening.toml");
    assert_eq!(calm.agent.policy, AgentPolicy::Rules);
    let (bytes, report) = run(&calm);
    assert!(report.passed(), "seed {}: {report}", calm.seed);
    let result = json_of(&bytes);
    assert!(figure(&result, "/score/agent/decisions") > 10.0, "the agent ran");
    assert_eq!(result["agent_actions"], json!([]));
    assert_eq!(figure(&result, "/score/agent/false_alarms"), 0.0);
}

#[test]
fn with_the_agent_acting_the_same_seed_gives_byte_identical_runs() {
    let slow = scenario("slow-store.toml");
    let (first, _) = run(&slow);
    assert!(figure(&json_of(&first), "/score/agent/actions_applied") > 0.0, "the agent acted");
    let (second, _) = run(&slow);
    assert!(first == second, "seed {}: two runs of one seed differ", slow.seed);
}

/// Blocked bots' queue joins are refused before their bodies are in: the runs stay identical
/// however fast the host runs.
#[test]
fn with_the_rules_agent_blocking_bots_the_same_seed_gives_byte_identical_runs() {
    let mut storm = scenario("bot-storm.toml");
    storm.duration_s = 20.0;
    let (first, _) = run(&storm);
    let result = json_of(&first);
    assert!(
        result["agent_actions"].as_array().is_some_and(|actions| actions.len() >= 5
            && actions.iter().all(|action| action["tool"] == "block_ip" && action["outcome"] == "applied")),
        "the agent blocked the five bot IPs: {}",
        result["agent_actions"]
    );
    let (second, _) = run(&storm);
    assert_identical(&first, &second, storm.seed);
}

/// Fails with the first line where two run results differ.
fn assert_identical(first: &[u8], second: &[u8], seed: u64) {
    if first == second {
        return;
    }
    let (first, second) = (String::from_utf8_lossy(first), String::from_utf8_lossy(second));
    let (line, (a, b)) = first
        .lines()
        .zip(second.lines())
        .enumerate()
        .find(|(_, (a, b))| a != b)
        .unwrap_or((0, ("(one is a prefix of the other)", "")));
    panic!("seed {seed}: two runs of one seed differ, first at line {}:\n  {a}\n  {b}", line + 1);
}

/// A language model stand-in over real HTTP on its own thread: blocks the busiest talker it
/// sees above 100 requests/s that is not blocked yet; otherwise calls nothing.
fn scripted_model() -> String {
    async fn answer(Json(request): Json<Value>) -> Json<Value> {
        let text = request["messages"][1]["content"].as_str().unwrap_or("");
        let seen: Value = serde_json::from_str(text.trim_start_matches("Observation: ")).unwrap_or_default();
        let blocked = seen["blocked"].as_array().cloned().unwrap_or_default();
        let target = seen["talkers"].as_array().into_iter().flatten().find(|talker| {
            talker["requests_per_s"].as_f64().unwrap_or(0.0) > 100.0 && !blocked.contains(&talker["ip"])
        });
        let message = match target {
            Some(talker) => json!({ "role": "assistant", "content": null, "tool_calls": [{
                "id": "call-1", "type": "function",
                "function": { "name": "block_ip", "arguments": json!({ "ip": talker["ip"], "ttl_s": 120 }).to_string() },
            }]}),
            None => json!({ "role": "assistant", "content": "all good" }),
        };
        Json(json!({
            "id": "chatcmpl", "object": "chat.completion", "created": 0, "model": "scripted",
            "choices": [{ "index": 0, "message": message, "finish_reason": "stop" }],
        }))
    }
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            sender.send(listener.local_addr().expect("address")).expect("send");
            let router = axum::Router::new().route("/v1/chat/completions", post(answer));
            axum::serve(listener, router).await.expect("serve");
        });
    });
    format!("http://{}/v1", receiver.recv().expect("the model's address"))
}

#[test]
fn an_llm_run_recorded_then_replayed_gives_a_byte_identical_run() {
    let text =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scenarios/ci/calm-opening.toml"))
            .expect("scenario");
    let bot = "\n[[bots]]\nname = \"scalper\"\nips = 2\nrate_per_s = 600\nstart_s = 3\nend_s = 30\ntargets = [\"queue-join\"]\n";
    let cassette = std::env::temp_dir().join(format!("tcore-cassette-{}.json", std::process::id()));
    let mut llm = Scenario::parse(&format!("{text}{bot}"), "llm.toml").unwrap_or_else(|error| panic!("{error}"));
    llm.slo.thresholds.retain(|threshold| !threshold.metric.starts_with("agent."));
    llm.agent.policy = AgentPolicy::Llm;
    llm.agent.base_url = scripted_model();
    llm.agent.cassette = Some(cassette.display().to_string());
    let world = tcore_sim::world::run(&llm, "ci", &mut |_| {}).expect("llm run");
    let recorded = world.agent.as_ref().and_then(|agent| agent.cassette.clone()).expect("a cassette");
    recorded.save(&cassette).expect("cassette written");
    let report = tcore_sim::checker::check(&world.history);
    let mut first = tcore_sim::score::run_result(&llm, "ci", "test", &world, &report);
    assert!(
        figure(&first, "/score/agent/actions_applied") >= 2.0,
        "the model blocked both scalpers: {}",
        first["agent_actions"]
    );
    assert!(recorded.answers.len() >= 5);
    let replay = with_policy(llm.clone(), AgentPolicy::Replay);
    let (second, _) = run(&replay);
    std::fs::remove_file(&cassette).ok();
    assert_eq!(first["score"]["agent"]["policy"], json!("llm"));
    assert_eq!(json_of(&second)["score"]["agent"]["policy"], json!("replay"));
    // Apart from the policy's name, the replay is the recorded run, byte for byte.
    first["score"]["agent"]["policy"] = json!("replay");
    let first = serde_json::to_vec_pretty(&first).expect("serializable");
    assert_identical(&first, &second, llm.seed);
}

#[test]
fn a_partition_cuts_the_agent_off_and_its_decisions_say_so() {
    let text =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scenarios/ci/calm-opening.toml"))
            .expect("scenario");
    let cut = "\n[[faults]]\nkind = \"partition\"\nat_s = 10\nheal_at_s = 20\na = \"agent\"\nb = \"engine-*\"\n";
    let cut_off = Scenario::parse(&format!("{text}{cut}"), "cut.toml").unwrap_or_else(|error| panic!("{error}"));
    let world = tcore_sim::world::run(&cut_off, "cut", &mut |_| {}).expect("run");
    let decisions = &world.agent.as_ref().expect("an agent ran").decisions;
    let at_s = |at_ms: u64| (at_ms - tcore_sim::world::EPOCH_MS) as f64 / 1e3;
    let unreachable = |from_s: f64, to_s: f64| {
        decisions
            .iter()
            .filter(|decision| (from_s..to_s).contains(&at_s(decision.at_ms)))
            .map(|decision| decision.nodes_unreachable.len())
            .collect::<Vec<_>>()
    };
    let during = unreachable(11.0, 19.0);
    assert!(!during.is_empty() && during.iter().all(|count| *count == 3), "cut off: {during:?}");
    let before = unreachable(0.0, 9.5);
    assert!(!before.is_empty() && before.iter().all(|count| *count == 0), "before: {before:?}");
    let after = unreachable(25.0, 60.0);
    assert!(!after.is_empty() && after.iter().all(|count| *count == 0), "after: {after:?}");
}
