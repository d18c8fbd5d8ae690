//! The gate: safety verdicts, `[slo]` thresholds and baselines, judged on real run results and
//! doctored copies of them; JUnit and Markdown output; the `tcore gate` command end to end.

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};
use tcore_sim::gate::{
    Baseline, CheckKind, GateError, ScenarioGate, Status, Tolerances, judge, junit_xml, markdown, record, thresholds_of,
};
use tcore_sim::scenario::Scenario;

use crate::runs::{failing, passing, temp_dir};

/// Judges `run` by the thresholds it carries, against `baseline`.
fn gate(run: &Value, baseline: &Baseline) -> ScenarioGate {
    let thresholds = thresholds_of(run, "run.json").expect("valid thresholds");
    judge(run, "run.json", &thresholds, Some(Ok(baseline)), None, &Tolerances::default()).expect("a run result")
}

fn baseline_of(run: &Value) -> Baseline {
    record(run, None, &thresholds_of(run, "run.json").expect("valid thresholds"))
}

fn failed(gate: &ScenarioGate) -> Vec<(CheckKind, String)> {
    gate.checks
        .iter()
        .filter(|check| check.status == Status::Fail)
        .map(|check| (check.kind, check.name.clone()))
        .collect()
}

#[test]
fn a_run_equal_to_its_baseline_passes_with_nothing_changed() {
    let run = passing();
    let judged = gate(run, &baseline_of(run));
    assert!(judged.passed(), "{:#?}", judged.checks);
    assert!(judged.count(CheckKind::Safety, Status::Pass) >= 11);
    assert_eq!(judged.count(CheckKind::Slo, Status::Pass), 6, "the six [slo] thresholds of ci/concert-open.toml");
    assert!(judged.checks.iter().all(|check| check.change.is_none()), "{:#?}", judged.checks);
    assert!(judged.checks.iter().any(|check| check.name == "latency.hold.p99_us"));
}

#[test]
fn gate_expressions_evaluate_against_the_score() {
    let mut run = passing().clone();
    let p99 = run["score"]["latency"]["hold"]["p99_us"].as_f64().expect("a hold p99");
    run["slo"] = json!([
        { "metric": "latency.hold.p99_us", "expression": format!("< {}", p99 + 1.0) },
        { "metric": "latency.hold.p99_us", "expression": format!("< {p99}") },
        { "metric": "seats.sold_ratio", "expression": ">= 0.99" },
        { "metric": "goodput.confirm_per_s", "expression": "> 1_000_000" },
        { "metric": "no.such.metric", "expression": "== 0" },
    ]);
    let thresholds = thresholds_of(&run, "run.json").expect("valid thresholds");
    let judged = judge(&run, "run.json", &thresholds, None, None, &Tolerances::default()).expect("a run result");
    let slo: Vec<(String, Status)> = judged
        .checks
        .iter()
        .filter(|check| check.kind == CheckKind::Slo)
        .map(|check| (check.name.clone(), check.status))
        .collect();
    assert_eq!(
        slo,
        [
            (format!("latency.hold.p99_us < {}", p99 + 1.0), Status::Pass),
            (format!("latency.hold.p99_us < {p99}"), Status::Fail),
            ("seats.sold_ratio >= 0.99".to_owned(), Status::Pass),
            ("goodput.confirm_per_s > 1000000".to_owned(), Status::Fail),
            ("no.such.metric == 0".to_owned(), Status::Fail),
        ]
    );
}

#[test]
fn a_bad_expression_names_the_file_and_the_key() {
    let mut run = passing().clone();
    run["slo"] = json!([{ "metric": "latency.hold.p99_us", "expression": "fast" }]);
    let error = thresholds_of(&run, "target/x/run.json").expect_err("a bad expression");
    assert!(matches!(error, GateError::Threshold { .. }));
    assert_eq!(
        error.to_string(),
        "target/x/run.json: key `slo.latency.hold.p99_us`: invalid SLO expression \"fast\": expected an operator \
         (<, <=, ==, >=, >) and a number, as in \"< 50000\""
    );
    let text = "name = \"x\"\nseed = 1\nduration_s = 10\n[venue]\n[[venue.schedules]]\nid = 1\nconcert = \"c\"\n\
                opens_at_s = 1\n[[venue.schedules.sections]]\nname = \"A\"\nseats = 1\nprice_points = 1\npopularity = 1\n\
                [[arrivals]]\nshape = \"constant\"\nusers = 1\nduration_s = 5\n[slo]\noversell = \"=< 0\"\n";
    let error = Scenario::parse(text, "scenarios/ci/x.toml").expect_err("a bad expression").to_string();
    assert!(error.starts_with("scenarios/ci/x.toml:19:"), "{error}");
    assert!(error.contains("key `slo.oversell`: invalid SLO expression \"=< 0\""), "{error}");
}

#[test]
fn a_run_whose_p99_regressed_beyond_the_tolerance_fails_the_gate() {
    let run = passing();
    let baseline = baseline_of(run);
    let mut doctored = run.clone();
    let p99 = run["score"]["latency"]["hold"]["p99_us"].as_f64().expect("a hold p99");
    doctored["score"]["latency"]["hold"]["p99_us"] = json!(p99 * 1.5);
    let judged = gate(&doctored, &baseline);
    assert!(!judged.passed());
    assert_eq!(failed(&judged), [(CheckKind::Baseline, "latency.hold.p99_us".to_owned())]);
    let check = judged.checks.iter().find(|check| check.name == "latency.hold.p99_us").expect("compared");
    assert!(check.message.starts_with("regressed: "), "{}", check.message);
    assert_eq!(check.change, Some((Some(p99), Some(p99 * 1.5))));

    // Within the tolerance, the change is reported exactly and passes.
    doctored["score"]["latency"]["hold"]["p99_us"] = json!(p99 * 1.05);
    let judged = gate(&doctored, &baseline);
    assert!(judged.passed(), "{:#?}", failed(&judged));
    let check = judged.checks.iter().find(|check| check.name == "latency.hold.p99_us").expect("compared");
    assert_eq!(check.change, Some((Some(p99), Some(p99 * 1.05))));
    assert!(markdown(std::slice::from_ref(&judged)).contains("`latency.hold.p99_us`"));

    // An improvement passes.
    doctored["score"]["latency"]["hold"]["p99_us"] = json!(p99 / 2.0);
    assert!(gate(&doctored, &baseline).passed());
}

#[test]
fn a_run_with_an_oversell_fails_the_gate_on_safety_slo_and_baseline() {
    let run = passing();
    let baseline = baseline_of(run);
    let mut doctored = run.clone();
    doctored["score"]["oversell"] = json!(1);
    doctored["safety"]["passed"] = json!(false);
    for invariant in doctored["safety"]["invariants"].as_array_mut().expect("invariants") {
        if invariant["invariant"] == "no-double-sale" {
            invariant["passed"] = json!(false);
            invariant["violations"] = json!(1);
        }
    }
    let judged = gate(&doctored, &baseline);
    assert_eq!(
        failed(&judged),
        [
            (CheckKind::Safety, "no-double-sale".to_owned()),
            (CheckKind::Slo, "oversell == 0".to_owned()),
            (CheckKind::Baseline, "oversell".to_owned()),
        ]
    );
    // Only the score doctored: the SLO and the baseline (no tolerance for safety counts) still
    // catch it.
    let mut doctored = run.clone();
    doctored["score"]["oversell"] = json!(1);
    let judged = gate(&doctored, &baseline);
    assert_eq!(
        failed(&judged),
        [(CheckKind::Slo, "oversell == 0".to_owned()), (CheckKind::Baseline, "oversell".to_owned())]
    );
}

#[test]
fn the_real_unsafe_run_fails_with_its_counterexample() {
    let run = failing();
    let judged = gate(run, &baseline_of(passing()));
    let failures = failed(&judged);
    assert!(failures.contains(&(CheckKind::Safety, "no-double-sale".to_owned())), "{failures:?}");
    assert!(failures.contains(&(CheckKind::Slo, "oversell == 0".to_owned())), "{failures:?}");
    // Another scenario's baseline has another seed: not comparable, and said so.
    assert!(failures.contains(&(CheckKind::Baseline, "baseline".to_owned())), "{failures:?}");
    let double_sale = judged.checks.iter().find(|check| check.name == "no-double-sale").expect("judged");
    let counterexample = run["safety"]["violations"][0]["message"].as_str().expect("a counterexample");
    assert!(double_sale.message.ends_with(counterexample), "{}", double_sale.message);
}

#[test]
fn a_missing_baseline_fails() {
    let run = passing();
    let thresholds = thresholds_of(run, "run.json").expect("valid");
    let judged = judge(run, "run.json", &thresholds, Some(Err("no baseline".to_owned())), None, &Tolerances::default())
        .expect("a run result");
    assert_eq!(failed(&judged), [(CheckKind::Baseline, "baseline".to_owned())]);
}

#[test]
fn junit_output_is_valid_xml_with_one_case_per_check() {
    let mut hostile = passing().clone();
    hostile["scenario"]["name"] = json!("a<b>&\"c\"");
    hostile["score"]["oversell"] = json!(1);
    let gates = [gate(passing(), &baseline_of(passing())), gate(&hostile, &baseline_of(passing()))];
    let xml = junit_xml(&gates);
    let document = roxmltree::Document::parse(&xml).unwrap_or_else(|error| panic!("{error}\n{xml}"));
    let root = document.root_element();
    assert_eq!(root.tag_name().name(), "testsuites");
    let suites: Vec<_> = root.children().filter(|node| node.has_tag_name("testsuite")).collect();
    assert_eq!(suites.len(), 2);
    assert_eq!(suites[1].attribute("name"), Some("a<b>&\"c\""));
    for (suite, judged) in suites.iter().zip(&gates) {
        let cases: Vec<_> = suite.children().filter(|node| node.has_tag_name("testcase")).collect();
        assert_eq!(cases.len(), judged.checks.len());
        assert_eq!(suite.attribute("tests"), Some(judged.checks.len().to_string().as_str()));
        let failures = cases.iter().filter(|case| case.children().any(|node| node.has_tag_name("failure"))).count();
        assert_eq!(suite.attribute("failures"), Some(failures.to_string().as_str()));
    }
    assert_eq!(root.attribute("failures"), Some("2"), "the SLO and the baseline of the doctored run");
    let summary = markdown(&gates);
    assert!(summary.starts_with("## tcore gate: 2 scenarios, 1 passed, 1 failed"), "{summary}");
    assert!(summary.contains("| ci-concert-open | ✅ pass |"), "{summary}");
    assert!(summary.contains("❌ **fail**"), "{summary}");
}

fn tcore(arguments: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tcore")).args(arguments).output().expect("tcore runs")
}

#[test]
fn the_gate_command_judges_run_results_and_writes_junit_and_markdown() {
    let dir = temp_dir("gate-command");
    let run_dir = dir.join("run");
    std::fs::create_dir_all(&run_dir).expect("run directory");
    let write = |path: &Path, value: &Value| {
        std::fs::write(path, serde_json::to_vec_pretty(value).expect("JSON")).expect("written");
    };
    write(&run_dir.join("run.json"), passing());
    let (baselines, junit, summary) = (dir.join("baselines"), dir.join("junit.xml"), dir.join("summary.md"));
    let path = |path: &Path| path.display().to_string();
    let update = tcore(&["gate", &path(&run_dir), "--update-baseline", "--baselines", &path(&baselines)]);
    assert!(update.status.success(), "{}", String::from_utf8_lossy(&update.stderr));
    assert!(baselines.join("ci-concert-open.json").exists());

    let pass = tcore(&["gate", &path(&run_dir), "--baselines", &path(&baselines), "--junit", &path(&junit)]);
    let stdout = String::from_utf8_lossy(&pass.stdout);
    assert!(pass.status.success(), "{stdout}");
    assert!(stdout.trim_end().ends_with("gate: 1 scenarios, 1 passed, 0 failed"), "{stdout}");

    // Thresholds given on the command line, k6-style, judge every input too.
    let extra = tcore(&["gate", &path(&run_dir), "--baselines", &path(&baselines), "--slo", "latency.hold.p99_us < 1"]);
    let stdout = String::from_utf8_lossy(&extra.stdout);
    assert_eq!(extra.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("slo `latency.hold.p99_us < 1`"), "{stdout}");
    let bad = tcore(&["gate", &path(&run_dir), "--slo", "latency.hold.p99_us fast"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid threshold \"latency.hold.p99_us fast\""));

    let mut regressed = passing().clone();
    let p99 = regressed["score"]["latency"]["hold"]["p99_us"].as_f64().expect("a hold p99");
    // Past the baseline's tolerance, still inside the scenario's own [slo] bound.
    regressed["score"]["latency"]["hold"]["p99_us"] = json!(p99 * 1.5);
    write(&run_dir.join("run.json"), &regressed);
    let fail = tcore(&[
        "gate",
        &path(&run_dir),
        "--baselines",
        &path(&baselines),
        "--junit",
        &path(&junit),
        "--markdown",
        &path(&summary),
    ]);
    assert_eq!(fail.status.code(), Some(1), "{}", String::from_utf8_lossy(&fail.stdout));
    let xml = std::fs::read_to_string(&junit).expect("junit written");
    let document = roxmltree::Document::parse(&xml).expect("valid XML");
    assert_eq!(document.root_element().attribute("failures"), Some("1"));
    let markdown = std::fs::read_to_string(&summary).expect("markdown written");
    assert!(markdown.contains("latency.hold.p99_us"), "{markdown}");

    let bad = dir.join("bad.toml");
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/ci/concert-open.toml"))
        .expect("scenario")
        .replace("\"latency.hold.p99_us\" = \"< 50_000\"", "\"latency.hold.p99_us\" = \"fast\"");
    std::fs::write(&bad, text).expect("written");
    let error = tcore(&["gate", &path(&bad), "--baselines", &path(&baselines)]);
    assert_eq!(error.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&error.stderr);
    assert!(
        stderr.contains(&format!("{}:", bad.display())) && stderr.contains("key `slo.\"latency.hold.p99_us\"`"),
        "{stderr}"
    );
}
