//! `tcore`: run scenarios in the simulated world and score them.

// A command-line tool whose output is its job: it prints to stdout on purpose.
#![allow(clippy::print_stdout)]

mod cli;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use tcore_sim::checker::check;
use tcore_sim::scenario::{AgentPolicy, HoldMode, RecordReplication, Scenario};
use tcore_sim::score::{run_result, safety_passed, slo_passed};
use tcore_sim::{live, world};

/// A simulated run allocates and frees millions of small buffers (frames, headers, futures)
/// on one thread; mimalloc does that several times faster than the system allocator and keeps
/// a large heap from fragmenting; `main` sets the process up for a run first
/// ([`tcore_sim::allocator`]). The allocator changes no result: nothing reads addresses.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "tcore",
    version,
    about = "T-CORE's testbed: replay ticket openings against the engine and score them"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a scenario in the simulated world, check it and score it.
    Run(RunArgs),
    /// Replay a scenario live: goose drives real engine nodes over HTTP, then the same checks.
    Load(LoadArgs),
    /// Render run results as HTML: one, or several side by side.
    Report(cli::report::ReportArgs),
    /// Judge scenarios or run results by safety, SLOs and baselines, for CI.
    Gate(cli::gate::GateArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The scenario file (TOML).
    scenario: PathBuf,
    /// Replace the scenario's seed.
    #[arg(long, env = "TCORE_SEED")]
    seed: Option<u64>,
    /// Run a swarm: every seed of A..B, with fault parameters drawn per seed.
    #[arg(long, value_name = "A..B", conflicts_with = "seed")]
    seeds: Option<String>,
    /// Replace the scenario's hold mode.
    #[arg(long, value_enum)]
    hold_mode: Option<HoldMode>,
    /// Replace how the system of record replicates (`async` is known unsafe).
    #[arg(long, value_enum)]
    record_replication: Option<RecordReplication>,
    /// Redraw the fault parameters from the seed, as a swarm does (replays one swarm seed).
    #[arg(long, conflicts_with = "seeds")]
    perturb: bool,
    /// Where run.json goes (default: target/tcore/<scenario>/<seed>).
    #[arg(long, env = "TCORE_OUT")]
    out: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Judge by the safety invariants alone: a run that misses an [slo] threshold still passes
    /// (a swarm's perturbed faults may legitimately cost latency).
    #[arg(long)]
    safety_only: bool,
    /// Also write the full history (every operation) as history.json.
    #[arg(long)]
    save_history: bool,
    /// Replace the scenario's agent policy.
    #[arg(long, value_enum)]
    agent: Option<AgentPolicy>,
    /// Also run the same seed with this agent policy, and show both side by side.
    #[arg(long, value_enum, conflicts_with = "seeds")]
    compare_agent: Option<AgentPolicy>,
}

#[derive(Debug, clap::Args)]
struct LoadArgs {
    /// The scenario file (TOML).
    scenario: PathBuf,
    /// Start the scenario's engine nodes, and stop them at the end (the default without
    /// --target): one on the embedded memory store, or `[engine] nodes` on Redis + MariaDB
    /// with a fresh database and key prefix.
    #[arg(long, conflicts_with = "target")]
    spawn: bool,
    /// Base URL of a node that already runs; repeat (or separate with commas) for each. Its
    /// nodes must be named `engine-N`, trust this machine's `X-Forwarded-For`, and verify
    /// sessions with --session-secret.
    #[arg(long, value_delimiter = ',', requires_all = ["admin_token", "session_secret"])]
    target: Vec<String>,
    /// With --target: a bearer token of the nodes' admin API (to read the state at the end).
    #[arg(long, env = "TCORE_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// With --target: the HS256 secret the nodes verify fans' sessions with.
    #[arg(long, env = "TCORE_SESSION_SECRET", hide_env_values = true)]
    session_secret: Option<String>,
    /// Replace the scenario's seed (it draws the arrivals and the fans' choices).
    #[arg(long, env = "TCORE_SEED")]
    seed: Option<u64>,
    /// Replace the scenario's hold mode.
    #[arg(long, value_enum)]
    hold_mode: Option<HoldMode>,
    /// Where run.json, the report and the nodes' logs go (default: target/tcore/<scenario>/live-<seed>).
    #[arg(long, env = "TCORE_OUT")]
    out: Option<PathBuf>,
    /// With --spawn: the engine binary (default: `tcore-engine` beside this program).
    #[arg(long, env = "TCORE_ENGINE_BIN")]
    engine_bin: Option<PathBuf>,
    /// With --spawn and redis+mariadb: the Redis server.
    #[arg(long, env = "TCORE_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// With --spawn and redis+mariadb: the MariaDB server, without a database.
    #[arg(long, env = "TCORE_MARIADB_URL", default_value = "mysql://root@127.0.0.1:3306")]
    mariadb_url: String,
    /// With --spawn and faults on store-cache: the Redis server program the run starts for
    /// its own cache store (instead of --redis-url), to kill and stop.
    #[arg(long, env = "TCORE_REDIS_SERVER_BIN", default_value = "redis-server")]
    redis_server_bin: PathBuf,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

fn main() -> ExitCode {
    tcore_sim::allocator::configure_for_a_run();
    tcore_sim::logs::init();
    let outcome = match Cli::parse().command {
        Command::Run(args) => run(&args),
        Command::Load(args) => load(&args),
        Command::Report(args) => cli::report::report(&args).map(|path| {
            println!("report: {}", path.display());
            true
        }),
        Command::Gate(args) => cli::gate::gate(&args, &mut run_for_gate),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|output| output.status.success())
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .map_or_else(|| "unknown".to_owned(), |commit| commit.trim().to_owned())
}

fn apply_hold_mode(scenario: Scenario, hold_mode: Option<HoldMode>) -> Scenario {
    match hold_mode {
        None => scenario,
        Some(hold_mode) => scenario.with_hold_mode(hold_mode),
    }
}

/// How to run a scenario again exactly, but for the seed: the file and the flags that change
/// the run. The checker's counterexamples end with `tcore run <this> --seed N`.
fn replay_command(args: &RunArgs, perturb: bool) -> String {
    let mut command = args.scenario.display().to_string();
    if let Some(hold_mode) = args.hold_mode {
        command.push_str(" --hold-mode ");
        command.push_str(hold_mode.name());
    }
    if let Some(record_replication) = args.record_replication {
        command.push_str(" --record-replication ");
        command.push_str(record_replication.name());
    }
    if let Some(agent) = args.agent {
        command.push_str(" --agent ");
        command.push_str(agent.name());
    }
    if perturb {
        command.push_str(" --perturb");
    }
    command
}

fn with_agent(mut scenario: Scenario, policy: AgentPolicy) -> Scenario {
    scenario.agent.policy = policy;
    if matches!(policy, AgentPolicy::None | AgentPolicy::Rules) {
        scenario.agent.cassette = None;
    }
    scenario
}

fn run(args: &RunArgs) -> anyhow::Result<bool> {
    let mut scenario = apply_hold_mode(Scenario::load(&args.scenario)?, args.hold_mode);
    if let Some(record_replication) = args.record_replication {
        scenario = scenario.with_record_replication(record_replication);
    }
    if let Some(policy) = args.agent {
        scenario = with_agent(scenario, policy);
    }
    for setting in scenario.unsafe_settings() {
        println!("warning: known-unsafe configuration {setting}: the checker is expected to catch a violation");
    }
    if let Some(range) = &args.seeds {
        return swarm(&scenario, &args.scenario.display().to_string(), &replay_command(args, true), range, args);
    }
    let file = replay_command(args, args.perturb);
    let seed = args.seed.unwrap_or(scenario.seed);
    let scenario = if args.perturb { scenario.perturbed(seed).with_seed(seed) } else { scenario.with_seed(seed) };
    println!("seed: {}", scenario.seed);
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/tcore").join(&scenario.name).join(scenario.seed.to_string()));
    let path = args.scenario.display().to_string();
    let Some(other) = args.compare_agent else {
        return run_one(&scenario, &path, &file, &out, !args.quiet, args.save_history)
            .map(|verdict| verdict.passed(args.safety_only));
    };
    let mut passed = true;
    let mut results = Vec::new();
    for policy in [scenario.agent.policy, other] {
        let out = out.join(format!("agent-{}", policy.name()));
        let file = format!("{} --agent {}", args.scenario.display(), policy.name());
        passed &= run_one(&with_agent(scenario.clone(), policy), &path, &file, &out, !args.quiet, args.save_history)?
            .passed(args.safety_only);
        results.push(serde_json::from_slice(&std::fs::read(out.join("run.json"))?)?);
    }
    print_comparison(&results);
    Ok(passed)
}

/// The figures that tell the agents apart, side by side.
fn print_comparison(results: &[serde_json::Value]) {
    let rows: [(&str, &str); 14] = [
        ("verdict", "/verdict"),
        ("oversell", "/score/oversell"),
        ("seats sold", "/score/seats/sold"),
        ("goodput (confirm/s)", "/score/goodput/confirm_per_s"),
        ("fans' queue wait p50 (us)", "/score/queue_wait_fans/p50_us"),
        ("fans' queue wait p90 (us)", "/score/queue_wait_fans/p90_us"),
        ("hold p99 (us)", "/score/latency/hold/p99_us"),
        ("actions applied", "/score/agent/actions_applied"),
        ("actions rejected", "/score/agent/actions_rejected"),
        ("time to detect (s)", "/score/agent/time_to_detect_s"),
        ("time to mitigate (s)", "/score/agent/time_to_mitigate_s"),
        ("false alarms", "/score/agent/false_alarms"),
        ("legitimate users blocked", "/score/agent/harm/legitimate_users_blocked"),
        ("legitimate users turned away", "/score/agent/harm/legitimate_users_turned_away"),
    ];
    println!();
    let policies: Vec<String> = results
        .iter()
        .map(|run| format!("agent {}", run["score"]["agent"]["policy"].as_str().unwrap_or("?")))
        .collect();
    println!("{:<30} {:>18} {:>18}", "", policies[0], policies.get(1).map_or("", String::as_str));
    for (label, pointer) in rows {
        let cell =
            |run: &serde_json::Value| run.pointer(pointer).map_or_else(|| "-".to_owned(), |value| value.to_string());
        println!("{label:<30} {:>18} {:>18}", cell(&results[0]), results.get(1).map_or_else(String::new, cell));
    }
}

/// Runs a scenario as written (its own seed) for the gate, into `out`.
fn run_for_gate(scenario_file: &Path, out: &Path) -> anyhow::Result<()> {
    let scenario = Scenario::load(scenario_file)?;
    let file = scenario_file.display().to_string();
    run_one(&scenario, &file, &file, out, false, false)?;
    Ok(())
}

/// How one run was judged.
#[derive(Debug, Clone, Copy)]
struct Verdict {
    safety_passed: bool,
    slo_passed: bool,
    /// How many of the run's faults had no effect.
    faults_without_effect: usize,
}

impl Verdict {
    fn passed(self, safety_only: bool) -> bool {
        self.safety_passed && (safety_only || self.slo_passed)
    }
}

fn run_one(
    scenario: &Scenario,
    file: &str,
    replay: &str,
    out: &Path,
    show_progress: bool,
    save_history: bool,
) -> anyhow::Result<Verdict> {
    let started = Instant::now();
    let bar = if show_progress { ProgressBar::new(1_000) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:30}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let users = scenario.users_total();
    tcore_sim::allocator::size_pages_for(users);
    let world = world::run(scenario, replay, &mut |progress| {
        bar.set_length(progress.total_us.max(1));
        bar.set_position(progress.sim_us);
        bar.set_message(format!(
            "simulated {:>6.1} s of {:.0} s · {} users · {} operations",
            progress.sim_us as f64 / 1e6,
            progress.total_us as f64 / 1e6,
            users,
            progress.operations
        ));
    })?;
    bar.finish_and_clear();
    let simulated_s = started.elapsed().as_secs_f64();
    let report = check(&world.history);
    let mut result = run_result(scenario, file, &commit(), &world, &report);
    result["replay"] = serde_json::Value::String(format!("tcore run {replay} --seed {}", scenario.seed));
    let operations = world.history.operations.len() as u64;
    let wall = serde_json::json!({
        "wall_s": simulated_s,
        "simulated_s": world.history.config.end_us as f64 / 1e6,
        "operations": operations,
        "operations_per_wall_s": operations as f64 / simulated_s.max(1e-9),
    });
    let (run_path, report_path) = write_outputs(out, &result, &wall, save_history.then_some(&world.history))?;
    if let Some(cassette) = world.agent.as_ref().and_then(|agent| agent.cassette.as_ref()) {
        let path = scenario.agent.cassette.as_ref().map_or_else(|| out.join("cassette.json"), PathBuf::from);
        cassette.save(&path).map_err(anyhow::Error::msg)?;
        println!("cassette: {}", path.display());
    }
    print_summary(&result, &report, simulated_s);
    println!("run result: {}", run_path.display());
    println!("report: {}", report_path.display());
    Ok(Verdict {
        safety_passed: safety_passed(&result),
        slo_passed: slo_passed(&result),
        faults_without_effect: result["faults_without_effect"].as_array().map_or(0, Vec::len),
    })
}

/// Writes `run.json`, `wall.json`, `report.html` and, if given, `history.json` into `out`.
fn write_outputs(
    out: &Path,
    result: &serde_json::Value,
    wall: &serde_json::Value,
    history: Option<&tcore_sim::history::History>,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let run_path = out.join("run.json");
    let mut bytes = serde_json::to_vec_pretty(result)?;
    bytes.push(b'\n');
    std::fs::write(&run_path, bytes).with_context(|| format!("writing {}", run_path.display()))?;
    let report_path = cli::report::write_beside(result, out)?;
    if let Some(history) = history {
        std::fs::write(out.join("history.json"), serde_json::to_vec(history)?)?;
    }
    std::fs::write(out.join("wall.json"), serde_json::to_vec_pretty(wall)?)?;
    Ok((run_path, report_path))
}

fn load(args: &LoadArgs) -> anyhow::Result<bool> {
    let scenario = apply_hold_mode(Scenario::load_live(&args.scenario)?, args.hold_mode);
    let seed = args.seed.unwrap_or(scenario.seed);
    let scenario = scenario.with_seed(seed);
    for setting in scenario.unsafe_settings() {
        println!("warning: known-unsafe configuration {setting}: the checker is expected to catch a violation");
    }
    println!("seed: {seed}");
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/tcore").join(&scenario.name).join(format!("live-{seed}")));
    let mut replay = args.scenario.display().to_string();
    if let Some(hold_mode) = args.hold_mode {
        replay.push_str(" --hold-mode ");
        replay.push_str(hold_mode.name());
    }
    let mut deployment = if args.target.is_empty() {
        let engine_bin = match &args.engine_bin {
            Some(path) => path.clone(),
            None => std::env::current_exe()?.with_file_name("tcore-engine"),
        };
        let options = live::deploy::SpawnOptions {
            engine_bin,
            dir: out.clone(),
            redis_url: args.redis_url.clone(),
            redis_server_bin: args.redis_server_bin.clone(),
            mariadb_url: args.mariadb_url.clone(),
        };
        live::deploy::Deployment::spawn(&scenario, &options, scenario.users_total())?
    } else {
        live::deploy::Deployment::target(
            args.target.clone(),
            args.admin_token.clone().unwrap_or_default(),
            args.session_secret.clone().unwrap_or_default().into_bytes(),
        )
    };
    println!("engine: {}", deployment.description);
    let bar = if args.quiet { ProgressBar::hidden() } else { ProgressBar::new(1_000) };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:30}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let users = scenario.users_total();
    let mut last = (Instant::now(), 0_u64);
    let run = live::load(&scenario, &replay, &deployment, &mut |progress| {
        let rate = (progress.requests - last.1) as f64 / last.0.elapsed().as_secs_f64().max(1e-3);
        last = (Instant::now(), progress.requests);
        bar.set_length((progress.duration_s * 1e3) as u64);
        bar.set_position((progress.elapsed_s.max(0.0) * 1e3) as u64);
        let faults = if progress.fault_steps_total > 0 {
            format!(" · fault steps {}/{}", progress.fault_steps, progress.fault_steps_total)
        } else {
            String::new()
        };
        bar.set_message(format!(
            "{:>6.1} s of {:.0} s · arrivals {}/{users} ({} late) · {rate:.0} req/s · p99 {:.1} ms · {} errors{faults}",
            progress.elapsed_s,
            progress.duration_s,
            progress.started,
            progress.late,
            progress.p99_us as f64 / 1e3,
            progress.errors
        ));
    });
    bar.finish_and_clear();
    deployment.stop();
    let run = run?;
    let report = check(&run.world.history);
    let mut result = run_result(&scenario, &args.scenario.display().to_string(), &commit(), &run.world, &report);
    result["mode"] = serde_json::Value::String("live".into());
    result["reproducible"] = serde_json::Value::Bool(false);
    result["partial"] = serde_json::Value::Bool(run.figures.partial);
    result["live"] = serde_json::to_value(&run.figures)?;
    result["replay"] = serde_json::Value::String(format!("tcore load {replay} --seed {seed}"));
    let operations = run.world.history.operations.len() as u64;
    let wall = serde_json::json!({
        "wall_s": run.figures.wall_s,
        "operations": operations,
        "operations_per_wall_s": operations as f64 / run.figures.wall_s.max(1e-9),
    });
    let (run_path, report_path) = write_outputs(&out, &result, &wall, None)?;
    print_summary(&result, &report, run.figures.wall_s);
    let figures = &run.figures;
    println!(
        "{:<34} {} started of {} ({} late; lateness p99 {} us), pool {}",
        "journeys",
        figures.journeys_started,
        figures.arrivals,
        figures.journeys_late,
        figures.lateness_p99_us,
        figures.pool
    );
    if figures.partial {
        println!("partial: the run stopped before every arrival ran");
    }
    for error in &figures.fault_errors {
        println!("fault not applied: {error}");
    }
    println!("run result: {}", run_path.display());
    println!("report: {}", report_path.display());
    Ok(safety_passed(&result) && slo_passed(&result) && !figures.partial && figures.fault_errors.is_empty())
}

fn print_summary(result: &serde_json::Value, report: &tcore_sim::checker::CheckReport, wall_s: f64) {
    let score = &result["score"];
    println!();
    println!("{:<34} {}", "scenario", result["scenario"]["name"].as_str().unwrap_or("?"));
    println!("{:<34} {}", "hold mode", result["hold_mode"].as_str().unwrap_or("?"));
    println!("{:<34} {}", "record replication", result["record_replication"].as_str().unwrap_or("?"));
    println!("{:<34} {} users, {} operations, {:.1} s wall", "load", score["users"], score["operations"], wall_s);
    println!(
        "{:<34} {} of {} ({:.1} %)",
        "seats sold",
        score["seats"]["sold"],
        score["seats"]["total"],
        score["seats"]["sold_ratio"].as_f64().unwrap_or(0.0) * 100.0
    );
    println!(
        "{:<34} {:.1} confirmations/s (peak {})",
        "goodput",
        score["goodput"]["confirm_per_s"].as_f64().unwrap_or(0.0),
        score["goodput"]["peak_confirm_per_s"]
    );
    for step in ["queue_join", "seat_map", "hold", "confirm"] {
        let latency = &score["latency"][step];
        if latency.is_object() {
            println!("{:<34} p50 {} us, p99 {} us", format!("latency {step}"), latency["p50_us"], latency["p99_us"]);
        }
    }
    println!("{:<34} p50 {} us, p99 {} us", "queue wait", score["queue_wait"]["p50_us"], score["queue_wait"]["p99_us"]);
    for verdict in &report.verdicts {
        let mark = if verdict.passed { "PASS" } else { "FAIL" };
        println!("{:<34} {mark} ({} violations)", verdict.invariant.name(), verdict.violations);
    }
    if let Some(slo) = result["slo"].as_array() {
        for threshold in slo {
            let mark = if threshold["passed"].as_bool().unwrap_or(false) { "PASS" } else { "FAIL" };
            println!(
                "{:<34} {mark} ({} {})",
                format!("slo {}", threshold["metric"].as_str().unwrap_or("?")),
                threshold["value"],
                threshold["expression"].as_str().unwrap_or("")
            );
        }
    }
    for dodged in result["faults_without_effect"].as_array().into_iter().flatten() {
        println!(
            "{:<34} fault #{} ({}): {}",
            "fault without effect",
            dodged["fault"],
            dodged["kind"].as_str().unwrap_or("?"),
            dodged["reason"].as_str().unwrap_or("")
        );
    }
    for violation in report.violations.iter().take(3) {
        println!("\n{violation}");
    }
    println!("\nverdict: {}", if result["verdict"] == "pass" { "PASS" } else { "FAIL" });
}

fn swarm(scenario: &Scenario, file: &str, replay: &str, range: &str, args: &RunArgs) -> anyhow::Result<bool> {
    let (start, end) = range.split_once("..").context("--seeds takes A..B")?;
    let (start, end): (u64, u64) =
        (start.parse().context("--seeds: A is not a number")?, end.parse().context("--seeds: B is not a number")?);
    anyhow::ensure!(start < end, "--seeds: A must be below B");
    let mut failing = Vec::new();
    let mut dodged = Vec::new();
    for seed in start..end {
        let perturbed = scenario.perturbed(seed).with_seed(seed);
        println!("seed: {seed}");
        let out = args
            .out
            .clone()
            .unwrap_or_else(|| PathBuf::from("target/tcore").join(&scenario.name))
            .join(format!("swarm-{seed}"));
        let verdict = run_one(&perturbed, file, replay, &out, false, false)?;
        if !verdict.passed(args.safety_only) {
            failing.push(seed);
        }
        if verdict.faults_without_effect > 0 {
            dodged.push(seed);
        }
    }
    if !dodged.is_empty() {
        println!("swarm {start}..{end}: a fault had no effect in seeds {dodged:?} (see faults_without_effect)");
    }
    if failing.is_empty() {
        println!("swarm {start}..{end}: every seed passed");
        return Ok(true);
    }
    println!("swarm {start}..{end}: {} failing seeds; replay each with:", failing.len());
    for seed in &failing {
        println!("  tcore run {replay} --seed {seed}");
    }
    Ok(false)
}
