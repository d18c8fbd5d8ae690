//! The HTML report of real run results: its structure for a passing run, a failing run, a
//! comparison and a run with agent actions; escaping; and the page in a headless browser.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

use crate::runs::{failing, passing, temp_dir};

fn render(runs: &[Value]) -> String {
    tcore_reports::render(runs).unwrap_or_else(|error| panic!("{error}"))
}

fn occurrences(html: &str, needle: &str) -> usize {
    html.matches(needle).count()
}

/// The charts a run's report must draw: throughput, one per journey step over time, one
/// histogram per step, queue depth and wait, errors.
fn charts_expected(run: &Value) -> usize {
    let mut steps: Vec<&String> = run["series"]
        .as_array()
        .expect("series")
        .iter()
        .flat_map(|second| second["latency"].as_object().into_iter().flat_map(|latency| latency.keys()))
        .collect();
    steps.sort();
    steps.dedup();
    let histograms = run["latency_histograms"].as_object().expect("histograms").len();
    1 + steps.len() + histograms + 2 + 1
}

const SECTIONS: [&str; 11] = [
    "verdict",
    "run",
    "throughput",
    "latency-over-time",
    "latency-histograms",
    "queue",
    "errors",
    "errors-by-reason",
    "faults",
    "agent",
    "score",
];

fn assert_structure(html: &str, charts: usize) {
    assert!(html.starts_with("<!DOCTYPE html>"));
    for section in SECTIONS {
        assert_eq!(occurrences(html, &format!("<section id=\"{section}\">")), 1, "section {section}");
    }
    assert_eq!(occurrences(html, "<figure class=\"chart\""), charts);
    assert_eq!(occurrences(html, "<svg "), charts, "one SVG per chart");
    // Nothing to fetch: the only URL is the SVG namespace, which names and loads nothing.
    let urls = occurrences(html, "http://") + occurrences(html, "https://");
    assert_eq!(urls, occurrences(html, "xmlns=\"http://www.w3.org/2000/svg\""), "no URL but the SVG namespace");
    assert!(html.contains("Content-Security-Policy\" content=\"default-src 'none'"));
}

#[test]
fn a_passing_run_shows_every_invariant_passed_and_all_its_charts() {
    let run = passing();
    let html = render(std::slice::from_ref(run));
    assert_structure(&html, charts_expected(run));
    assert_eq!(occurrences(&html, "data-verdict=\"pass\""), 1);
    assert_eq!(occurrences(&html, "data-passed=\"true\""), 12 + 6, "12 invariants and 6 SLOs pass");
    assert_eq!(occurrences(&html, "data-passed=\"false\""), 0);
    assert!(html.contains("<td>20261123</td>"), "the seed");
    assert!(html.contains("<td>test</td>"), "the commit");
    assert!(html.contains("<p>No faults in this run.</p>"));
    assert_eq!(occurrences(&html, "<details class=\"counterexample\""), 0);
    // The fault shading colour appears only in the legend of a run with faults.
    assert!(!html.contains("fault window"));
    // The queue chart draws users waiting: many while the spike queues, few once it sold out.
    let depths: Vec<u64> = run["series"]
        .as_array()
        .expect("series")
        .iter()
        .map(|second| second["queue_depth"].as_u64().expect("depth"))
        .collect();
    let peak = depths.iter().copied().max().unwrap_or(0);
    assert!(peak > 100, "{depths:?}");
    assert!(depths.last().is_some_and(|&last| last < peak / 10), "{depths:?}");
}

#[test]
fn a_failing_run_shows_its_failed_invariants_with_counterexamples_and_fault_windows() {
    let run = failing();
    let html = render(std::slice::from_ref(run));
    assert_structure(&html, charts_expected(run));
    assert_eq!(occurrences(&html, "data-verdict=\"fail\""), 1);
    assert!(html.contains("<tr data-invariant=\"no-double-sale\" data-passed=\"false\">"));
    assert!(html.contains("<tr data-invariant=\"capacity\" data-passed=\"false\">"));
    assert!(html.contains("<tr data-slo=\"oversell\" data-passed=\"false\">"));
    let violations = run["safety"]["violations"].as_array().expect("violations");
    assert!(!violations.is_empty());
    assert_eq!(occurrences(&html, "<details class=\"counterexample\""), violations.len());
    let messages: Vec<&str> =
        violations.iter().map(|violation| violation["message"].as_str().expect("a message")).collect();
    assert!(messages.iter().any(|message| message.starts_with("sold ")), "an oversold seat among {messages:?}");
    for message in messages {
        let escaped = message
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
            .replace('\'', "&#39;");
        assert!(html.contains(&escaped), "the counterexample {message:?}");
    }
    // Every time chart shades the fault windows (two windows and three pauses each).
    let time_charts = charts_expected(run) - run["latency_histograms"].as_object().expect("histograms").len();
    assert_eq!(occurrences(&html, "fill=\"#F5A623\""), time_charts * 5);
}

#[test]
fn a_comparison_shows_runs_side_by_side_with_deltas() {
    let runs = [passing().clone(), failing().clone()];
    let html = render(&runs);
    assert_structure(&html, charts_expected(&runs[0]) + charts_expected(&runs[1]));
    assert!(html.contains("T-CORE comparison of 2 runs"));
    assert_eq!(occurrences(&html, "grid-template-columns: repeat(2, minmax(0, 1fr))"), SECTIONS.len() - 1);
    assert_eq!(occurrences(&html, "data-verdict=\"pass\""), 1);
    assert_eq!(occurrences(&html, "data-verdict=\"fail\""), 1);
    assert!(html.contains("<th class=\"num\">Δ run 2 − run 1</th>"));
    // The oversell went from none to the failing run's: the delta says so.
    let oversold = runs[1]["score"]["oversell"].as_u64().expect("an oversell count");
    assert!(oversold > 0, "the failing run oversold");
    let row_start = html.find("<tr data-metric=\"oversell\">").expect("an oversell row");
    let row = &html[row_start..row_start + html[row_start..].find("</tr>").expect("row end")];
    let cells =
        format!("<td class=\"num\">0</td><td class=\"num\">{oversold}</td><td class=\"num delta\">+{oversold}</td>");
    assert!(row.contains(&cells), "{row}");
}

/// The passing run with the ops agent's figures and actions, as the agent writes them.
fn with_agent(run: &Value) -> Value {
    let mut run = run.clone();
    run["agent_actions"] = json!([
        { "at_us": 6_000_000, "tool": "set_admission", "args": { "rate_per_s": 50 }, "outcome": "applied",
          "reason": "queue growing", "detail": null },
        { "at_us": 9_000_000, "tool": "block_ip", "args": { "ip": "100.64.0.1", "ttl_s": 60 }, "outcome": "rejected",
          "reason": "top talker", "detail": "not on the allowlist" },
        { "at_us": 12_000_000, "tool": "set_hold_ttl", "args": { "ttl_s": 30 }, "outcome": "failed",
          "reason": "holds piling up", "detail": "store unavailable" },
    ]);
    run["score"]["agent"] = json!({
        "policy": "rules", "decisions": 12, "actions_applied": 1, "actions_rejected": 1, "actions_failed": 1,
        "time_to_detect_s": 2.5, "time_to_mitigate_s": null, "false_alarms": 0,
        "harm": { "legitimate_users_blocked": 0, "legitimate_users_turned_away": 3 },
        "caused_safety_violation": false,
    });
    run
}

#[test]
fn agent_actions_are_listed_and_marked_on_every_time_chart() {
    let run = with_agent(passing());
    let html = render(std::slice::from_ref(&run));
    assert_structure(&html, charts_expected(&run));
    for outcome in ["applied", "rejected", "failed"] {
        assert_eq!(occurrences(&html, &format!("<tr data-outcome=\"{outcome}\">")), 1, "{outcome}");
    }
    assert!(html.contains("not on the allowlist"));
    assert!(html.contains("<th>time_to_detect_s</th><td class=\"num\">2.5</td>"));
    assert!(html.contains("<th>harm.legitimate_users_turned_away</th><td class=\"num\">3</td>"));
    let time_charts = charts_expected(&run) - run["latency_histograms"].as_object().expect("histograms").len();
    for colour in ["#178A5A", "#888888", "#9B111E"] {
        assert_eq!(occurrences(&html, &format!("stroke=\"{colour}\" stroke-width=\"2\"")), time_charts, "{colour}");
    }
    // A run without an agent lists none; a result without the list says so.
    let html = render(std::slice::from_ref(passing()));
    assert!(html.contains("<p>The agent took no action.</p>"));
    let mut older = passing().clone();
    older.as_object_mut().expect("a run result").remove("agent_actions");
    let html = render(std::slice::from_ref(&older));
    assert!(html.contains("The run result records no agent actions."));
}

#[test]
fn text_from_the_run_result_is_escaped() {
    let mut run = with_agent(failing());
    let attack = "<script>alert(1)</script>";
    run["scenario"]["name"] = json!(attack);
    run["scenario"]["description"] = json!("<img src=x onerror=alert(2)>");
    run["agent_actions"][0]["tool"] = json!(attack);
    run["safety"]["violations"][0]["message"] = json!(attack);
    run["score"]["errors"]["by_code"][attack] = json!(1);
    let html = render(std::slice::from_ref(&run));
    assert!(!html.contains("<script"), "raw markup from the run result reached the page");
    assert!(!html.contains("<img"));
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(html.contains("&lt;img src=x onerror=alert(2)&gt;"));
}

#[test]
fn a_run_result_of_another_schema_is_refused() {
    let mut run = passing().clone();
    run["schema"] = json!("tcore.run/0");
    let error = tcore_reports::render(&[run]).expect_err("another schema").to_string();
    assert_eq!(error, "run result 1: schema is \"tcore.run/0\", expected \"tcore.run/1\"");
    assert_eq!(tcore_reports::render(&[]).expect_err("nothing").to_string(), "no run result to report on");
}

// ---------------------------------------------------------------------------------------------
// In a browser.

/// Debian's chromium, or the browser `TCORE_CHROMIUM` names.
fn chromium() -> Option<PathBuf> {
    match std::env::var_os("TCORE_CHROMIUM") {
        Some(path) => Some(PathBuf::from(path)).filter(|path| path.exists()),
        None => {
            ["/usr/bin/chromium", "/usr/bin/chromium-browser"].into_iter().map(PathBuf::from).find(|path| path.exists())
        }
    }
}

/// What a headless chromium made of a page.
struct Visit {
    /// Console messages and refused loads, from chromium's log.
    console: Vec<String>,
    /// URLs the page itself requested over the network (not chromium's own service calls).
    requests: Vec<String>,
    /// The screenshot's pixels, RGB.
    pixels: Vec<[u8; 3]>,
}

fn visit(chromium: &Path, page: &Path, dir: &Path) -> Visit {
    let (profile, net_log, screenshot) = (dir.join("profile"), dir.join("net-log.json"), dir.join("screenshot.png"));
    let output = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            "--enable-logging=stderr",
            "--v=0",
            // Tall enough for every counterexample of the failing run and the charts below them.
            "--window-size=1400,8000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--log-net-log={}", net_log.display()))
        .arg(format!("--screenshot={}", screenshot.display()))
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("chromium starts");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "chromium failed: {stderr}");
    let console = stderr
        .lines()
        .filter(|line| line.contains("CONSOLE") || line.contains("Refused to"))
        .map(str::to_owned)
        .collect();
    // Chromium calls its own services whatever the flags; the page's requests are the ones
    // keyed by the page's site (file://).
    let net_log: Value =
        serde_json::from_slice(&std::fs::read(&net_log).expect("net log written")).expect("net log is JSON");
    let mut requests: Vec<String> = net_log["events"]
        .as_array()
        .expect("net log events")
        .iter()
        .filter(|event| event["params"]["network_isolation_key"].as_str().is_some_and(|key| key.starts_with("file://")))
        .filter_map(|event| event["params"]["url"].as_str().map(str::to_owned))
        .collect();
    requests.dedup();
    let decoder = png::Decoder::new(std::fs::File::open(&screenshot).expect("screenshot written"));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut buffer = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut buffer).expect("a frame");
    let channels = frame.color_type.samples();
    let pixels = buffer[..frame.buffer_size()].chunks(channels).map(|pixel| [pixel[0], pixel[1], pixel[2]]).collect();
    Visit { console, requests, pixels }
}

fn count_pixels(pixels: &[[u8; 3]], rgb: [u8; 3]) -> usize {
    pixels.iter().filter(|pixel| **pixel == rgb).count()
}

#[test]
fn the_report_renders_in_a_headless_browser_with_no_console_error_and_no_request() {
    let Some(chromium) = chromium() else {
        assert!(
            std::env::var("TCORE_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "chromium not installed, and TCORE_REQUIRE_SERVICES=1 makes the browser test mandatory"
        );
        eprintln!("skipped: chromium not installed");
        return;
    };
    let dir = temp_dir("browser");
    let page = dir.join("report.html");
    std::fs::write(&page, render(std::slice::from_ref(failing()))).expect("report written");
    let report = visit(&chromium, &page, &dir.join("report"));
    assert_eq!(report.console, Vec::<String>::new(), "console messages");
    assert_eq!(report.requests, Vec::<String>::new(), "network requests");
    // The charts were painted: the banner, the throughput lines and histogram bars in their
    // colours, and the fault windows shaded (#F5A623 at 30 % over white).
    let fail_banner = count_pixels(&report.pixels, [0xb3, 0x26, 0x1e]);
    assert!(fail_banner > 5_000, "the FAIL banner: {fail_banner} pixels");
    let blue = count_pixels(&report.pixels, [0x1f, 0x77, 0xb4]);
    assert!(blue > 2_000, "chart lines and bars: {blue} pixels");
    let green = count_pixels(&report.pixels, [0x2c, 0xa0, 0x2c]);
    assert!(green > 100, "the confirmations line: {green} pixels");
    let shaded = report
        .pixels
        .iter()
        .filter(|pixel| pixel[0] >= 250 && (224..=232).contains(&pixel[1]) && (185..=193).contains(&pixel[2]))
        .count();
    assert!(shaded > 1_000, "fault windows: {shaded} pixels");

    // The same checks catch a page that misbehaves.
    let bad = dir.join("bad.html");
    std::fs::write(&bad, "<html><body><img src=\"http://127.0.0.1:9/x.png\"><script>console.error('boom')</script>")
        .expect("page written");
    let visit = visit(&chromium, &bad, &dir.join("bad"));
    assert_eq!(visit.requests, ["http://127.0.0.1:9/x.png"]);
    assert!(visit.console.iter().any(|line| line.contains("boom")), "{:?}", visit.console);
    assert_eq!(count_pixels(&visit.pixels, [0x1f, 0x77, 0xb4]), 0);
}

#[test]
fn tcore_run_writes_the_report_and_tcore_report_compares_runs() {
    let dir = temp_dir("report-command");
    let scenario = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/ci/concert-open.toml");
    let tcore = |arguments: &[&std::ffi::OsStr]| {
        let output = Command::new(env!("CARGO_BIN_EXE_tcore")).args(arguments).output().expect("tcore runs");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let run_dir = dir.join("run");
    let stdout =
        tcore(&["run".as_ref(), "--quiet".as_ref(), "--out".as_ref(), run_dir.as_os_str(), scenario.as_os_str()]);
    assert!(stdout.contains(&format!("report: {}", run_dir.join("report.html").display())), "{stdout}");
    let single = std::fs::read_to_string(run_dir.join("report.html")).expect("report.html beside run.json");
    assert!(single.contains("T-CORE run: ci-concert-open"));

    std::fs::write(dir.join("failing.json"), serde_json::to_vec(failing()).expect("JSON")).expect("written");
    let out = dir.join("compare.html");
    tcore(&[
        "report".as_ref(),
        run_dir.as_os_str(),
        dir.join("failing.json").as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    let compared = std::fs::read_to_string(&out).expect("comparison written");
    assert!(compared.contains("T-CORE comparison of 2 runs"));
    assert_eq!(occurrences(&compared, "data-verdict=\"fail\""), 1);
}
