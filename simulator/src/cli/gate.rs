//! `tcore gate INPUT...`: judges scenarios (run first) or run results for CI, by their safety
//! verdicts, `[slo]` thresholds and baselines; prints a Markdown summary and writes JUnit XML.

use std::path::{Path, PathBuf};

use anyhow::Context;
use tcore_sim::gate::{
    Baseline, Check, CheckKind, ScenarioGate, Status, Tolerances, judge, junit_xml, markdown, record, thresholds_of,
};
use tcore_sim::scenario::{Scenario, SloThreshold};

use super::{read_json, run_json_path, write_file};

#[derive(Debug, clap::Args)]
pub struct GateArgs {
    /// Scenario files (`.toml`, each run in the simulated world first) or run results
    /// (`run.json`, or the directory holding it, judged by the thresholds they carry).
    #[arg(required = true, value_name = "SCENARIO.toml|RUN.json")]
    pub inputs: Vec<PathBuf>,
    /// Where the baselines are, one `<scenario name>.json` each.
    #[arg(long, default_value = "scenarios/baselines")]
    pub baselines: PathBuf,
    /// Record each run as its scenario's baseline instead of comparing (refused for a run
    /// that violates a safety invariant).
    #[arg(long)]
    pub update_baseline: bool,
    /// Where scenario runs go, one directory per scenario.
    #[arg(long, default_value = "target/tcore/gate")]
    pub out: PathBuf,
    /// Also write the outcome as JUnit XML.
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// Also write the Markdown summary (it is always printed).
    #[arg(long, value_name = "FILE")]
    pub markdown: Option<PathBuf>,
    /// An extra threshold for every input, k6-style: `--slo "latency.hold.p99_us < 50000"`.
    #[arg(long = "slo", value_name = "EXPRESSION", value_parser = SloThreshold::parse_statement)]
    pub extra_thresholds: Vec<SloThreshold>,
    /// How far (percent of the baseline) a latency, goodput or time may regress.
    #[arg(long, default_value_t = 10.0)]
    pub tolerance_pct: f64,
    /// How far (percent) a wall-clock figure may regress before it warns.
    #[arg(long, default_value_t = 50.0)]
    pub wall_tolerance_pct: f64,
    /// How far (percent of the baseline) a live run's latency, goodput or time may regress.
    #[arg(long, default_value_t = tcore_sim::gate::LIVE_TOLERANCE_PCT_DEFAULT)]
    pub live_tolerance_pct: f64,
}

/// Runs the gate; `run_scenario(scenario_file, out_dir)` runs one scenario and writes its
/// `run.json` and `wall.json` into `out_dir`. Returns whether every scenario passed.
pub fn gate(args: &GateArgs, run_scenario: &mut dyn FnMut(&Path, &Path) -> anyhow::Result<()>) -> anyhow::Result<bool> {
    for (name, value) in [
        ("--tolerance-pct", args.tolerance_pct),
        ("--wall-tolerance-pct", args.wall_tolerance_pct),
        ("--live-tolerance-pct", args.live_tolerance_pct),
    ] {
        anyhow::ensure!(value.is_finite() && value >= 0.0, "{name} must be a number >= 0 (got {value})");
    }
    let tolerances = Tolerances {
        relative_pct: args.tolerance_pct,
        wall_pct: args.wall_tolerance_pct,
        live_pct: args.live_tolerance_pct,
    };
    let mut gates = Vec::with_capacity(args.inputs.len());
    for input in &args.inputs {
        gates.push(gate_one(args, input, &tolerances, run_scenario)?);
    }
    let summary = markdown(&gates);
    println!("\n{summary}");
    if let Some(path) = &args.markdown {
        write_file(path, summary.as_bytes())?;
    }
    if let Some(path) = &args.junit {
        write_file(path, junit_xml(&gates).as_bytes())?;
    }
    let failed = gates.iter().filter(|gate| !gate.passed()).count();
    println!("gate: {} scenarios, {} passed, {failed} failed", gates.len(), gates.len() - failed);
    Ok(failed == 0)
}

fn gate_one(
    args: &GateArgs,
    input: &Path,
    tolerances: &Tolerances,
    run_scenario: &mut dyn FnMut(&Path, &Path) -> anyhow::Result<()>,
) -> anyhow::Result<ScenarioGate> {
    let is_scenario = input.extension().is_some_and(|extension| extension == "toml");
    let (run_path, scenario_thresholds) = if is_scenario {
        let scenario = Scenario::load(input)?;
        let out = args.out.join(&scenario.name);
        run_scenario(input, &out)?;
        (out.join("run.json"), Some(scenario.slo.thresholds))
    } else {
        (run_json_path(input), None)
    };
    let run_file = run_path.display().to_string();
    let run = read_json(&run_path)?;
    let mut thresholds = match scenario_thresholds {
        Some(thresholds) => thresholds,
        None => thresholds_of(&run, &run_file)?,
    };
    thresholds.extend(args.extra_thresholds.iter().cloned());
    let wall = run_path.parent().map(|dir| dir.join("wall.json")).filter(|path| path.exists());
    let wall = wall.map(|path| read_json(&path)).transpose()?;
    let name =
        run["scenario"]["name"].as_str().with_context(|| format!("{run_file}: not a run result: no scenario.name"))?;
    let baseline_path = args.baselines.join(format!("{name}.json"));
    if args.update_baseline {
        let mut gate = judge(&run, &run_file, &thresholds, None, wall.as_ref(), tolerances)?;
        let safe = gate.count(CheckKind::Safety, Status::Fail) == 0;
        let baseline = record(&run, wall.as_ref(), &thresholds);
        // A baseline whose simulated figures did not move is left alone, so commits that
        // re-record baselines only touch the scenarios that changed.
        let unchanged = load_baseline(&baseline_path)?.is_some_and(|old| {
            (old.seed, &old.hold_mode, &old.metrics) == (baseline.seed, &baseline.hold_mode, &baseline.metrics)
        });
        let message = if !safe {
            format!("not recorded in {}: the run violates a safety invariant", baseline_path.display())
        } else if unchanged {
            format!("{} unchanged", baseline_path.display())
        } else {
            let mut bytes = serde_json::to_vec_pretty(&baseline)?;
            bytes.push(b'\n');
            write_file(&baseline_path, &bytes)?;
            format!("recorded {}", baseline_path.display())
        };
        gate.checks.push(Check {
            kind: CheckKind::Baseline,
            name: "baseline".to_owned(),
            status: if safe { Status::Pass } else { Status::Fail },
            message,
            change: None,
        });
        return Ok(gate);
    }
    let baseline = load_baseline(&baseline_path)?;
    let baseline = baseline.as_ref().ok_or_else(|| {
        format!("no baseline at {}; record one with tcore gate --update-baseline", baseline_path.display())
    });
    Ok(judge(&run, &run_file, &thresholds, Some(baseline), wall.as_ref(), tolerances)?)
}

fn load_baseline(path: &Path) -> anyhow::Result<Option<Baseline>> {
    if !path.exists() {
        return Ok(None);
    }
    let value = read_json(path)?;
    let baseline: Baseline =
        serde_json::from_value(value).with_context(|| format!("{}: not a baseline", path.display()))?;
    anyhow::ensure!(
        baseline.schema == tcore_sim::gate::BASELINE_SCHEMA,
        "{}: schema is {:?}, expected {:?}",
        path.display(),
        baseline.schema,
        tcore_sim::gate::BASELINE_SCHEMA
    );
    Ok(Some(baseline))
}
