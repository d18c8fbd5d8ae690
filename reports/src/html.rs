//! The page: sections, tables and the layout of one or several runs side by side.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;

use crate::ReportError;
use crate::charts::{
    ACTION_APPLIED, ACTION_FAILED, ACTION_REJECTED, Colour, FAULT_SHADE, Line, PALETTE, TimeChart, Timeline, bar_chart,
    time_chart,
};
use crate::run::{AgentAction, Run, Second};

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        match character {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            other => escaped.push(other),
        }
    }
    escaped
}

const STYLE: &str = r#"
:root { --pass: #137a3f; --fail: #b3261e; --muted: #5f6368; --line: #dadce0; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #202124; margin: 0 auto; padding: 16px 24px 48px; max-width: 1600px; }
h1 { font-size: 22px; margin: 0 0 8px; }
h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h3 { font-size: 15px; margin: 12px 0 6px; }
.runs { display: grid; gap: 16px; }
.run { min-width: 0; }
.banner { border-radius: 6px; padding: 10px 14px; color: #fff; font-weight: 600; font-size: 16px; }
.banner.pass { background: var(--pass); }
.banner.fail { background: var(--fail); }
.pass-text { color: var(--pass); font-weight: 600; }
.fail-text { color: var(--fail); font-weight: 600; }
table { border-collapse: collapse; width: 100%; margin: 6px 0; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid var(--line); padding: 3px 8px; text-align: left; vertical-align: top; }
td.num, th.num { text-align: right; }
.worse { color: var(--fail); }
.better { color: var(--pass); }
figure { margin: 8px 0 16px; break-inside: avoid; }
figure svg { width: 100%; max-width: 1100px; height: auto; display: block; border: 1px solid var(--line); }
figcaption { font-weight: 600; margin-bottom: 4px; }
.legend { color: var(--muted); font-size: 12px; margin-top: 4px; }
.swatch { display: inline-block; width: 12px; height: 12px; vertical-align: -2px; margin: 0 4px 0 10px; border-radius: 2px; }
.note { color: var(--muted); font-style: italic; }
.warning { color: #9a4d00; }
pre, code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px; }
pre { white-space: pre-wrap; word-break: break-word; background: #f8f9fa; padding: 6px 8px; border-radius: 4px; }
details { margin: 6px 0; }
@media print {
  body { max-width: none; padding: 0; font-size: 11px; }
  h2 { break-after: avoid; }
  .banner { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  details { display: block; }
}
@page { size: A4 landscape; margin: 12mm; }
"#;

/// The page: every section, each showing the runs side by side.
pub fn page(runs: &[Run]) -> Result<String, ReportError> {
    let mut html = String::new();
    let title = match runs {
        [run] => format!("T-CORE run: {}", run.label()),
        _ => format!("T-CORE comparison of {} runs", runs.len()),
    };
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>{}</h1>\n",
        escape(&title),
        escape(&title)
    );
    let x_max = runs.iter().map(Run::end_s).fold(1.0, f64::max);
    let timelines: Vec<Timeline> = runs.iter().map(timeline).collect();

    section(&mut html, "verdict", "Verdict", runs, verdict);
    section(&mut html, "run", "Scenario, seed and commit", runs, run_facts);
    time_section(
        &mut html,
        "throughput",
        "Arrivals, admissions, holds and confirmations per second",
        runs,
        &timelines,
        x_max,
        throughput_charts,
    )?;
    time_section(
        &mut html,
        "latency-over-time",
        "Latency percentiles over time, per journey step",
        runs,
        &timelines,
        x_max,
        latency_charts,
    )?;
    histogram_section(&mut html, runs)?;
    time_section(&mut html, "queue", "Queue depth and wait", runs, &timelines, x_max, queue_charts)?;
    time_section(&mut html, "errors", "Errors and rejections", runs, &timelines, x_max, error_charts)?;
    section(&mut html, "errors-by-reason", "Errors and rejections by reason", runs, errors_by_reason);
    section(&mut html, "faults", "Fault windows", runs, faults);
    section(&mut html, "agent", "Ops agent", runs, agent);
    score_table(&mut html, runs);
    html.push_str("</body>\n</html>\n");
    Ok(html)
}

fn open_section(html: &mut String, id: &str, title: &str, columns: usize) {
    let _ = write!(
        html,
        "<section id=\"{id}\">\n<h2>{}</h2>\n<div class=\"runs\" style=\"grid-template-columns: repeat({columns}, minmax(0, 1fr))\">\n",
        escape(title)
    );
}

/// A section whose content is written per run, in columns.
fn section(html: &mut String, id: &str, title: &str, runs: &[Run], content: fn(&mut String, &Run)) {
    open_section(html, id, title, runs.len());
    for (index, run) in runs.iter().enumerate() {
        let _ = write!(html, "<div class=\"run\">\n{}", run_heading(runs.len(), index, run));
        content(html, run);
        html.push_str("</div>\n");
    }
    html.push_str("</div>\n</section>\n");
}

fn run_heading(count: usize, index: usize, run: &Run) -> String {
    if count == 1 { String::new() } else { format!("<h3>Run {}: {}</h3>\n", index + 1, escape(&run.label())) }
}

fn pass_fail(passed: bool) -> &'static str {
    if passed { "<span class=\"pass-text\">PASS</span>" } else { "<span class=\"fail-text\">FAIL</span>" }
}

fn verdict(html: &mut String, run: &Run) {
    let passed = run.verdict == "pass";
    let _ = writeln!(
        html,
        "<div class=\"banner {}\" data-verdict=\"{}\">{}: safety {}, SLOs {}</div>",
        if passed { "pass" } else { "fail" },
        if passed { "pass" } else { "fail" },
        if passed { "PASS" } else { "FAIL" },
        if run.safety.passed { "hold" } else { "violated" },
        if run.slo.iter().all(|slo| slo.passed) { "met" } else { "missed" },
    );
    html.push_str(
        "<table class=\"invariants\">\n<tr><th>invariant</th><th>verdict</th><th class=\"num\">violations</th></tr>\n",
    );
    for invariant in &run.safety.invariants {
        let _ = writeln!(
            html,
            "<tr data-invariant=\"{}\" data-passed=\"{}\"><td>{}</td><td>{}</td><td class=\"num\">{}</td></tr>",
            escape(&invariant.invariant),
            invariant.passed,
            escape(&invariant.invariant),
            pass_fail(invariant.passed),
            invariant.violations
        );
    }
    html.push_str("</table>\n");
    if !run.slo.is_empty() {
        html.push_str("<table class=\"slo\">\n<tr><th>SLO</th><th>threshold</th><th class=\"num\">value</th><th>verdict</th></tr>\n");
        for slo in &run.slo {
            let value = slo.value.map_or_else(|| "not measured".to_owned(), format_number);
            let _ = writeln!(
                html,
                "<tr data-slo=\"{}\" data-passed=\"{}\"><td><code>{}</code></td><td><code>{}</code></td><td class=\"num\">{}</td><td>{}</td></tr>",
                escape(&slo.metric),
                slo.passed,
                escape(&slo.metric),
                escape(&slo.expression),
                escape(&value),
                pass_fail(slo.passed)
            );
        }
        html.push_str("</table>\n");
    }
    for violation in &run.safety.violations {
        let _ = write!(
            html,
            "<details class=\"counterexample\" open>\n<summary><span class=\"fail-text\">{}</span>: {}</summary>\n<p>subject: <code>{}</code>{}</p>\n",
            escape(&violation.invariant),
            escape(&violation.message),
            escape(&compact(&violation.subject)),
            violation.seed.map(|seed| format!(", seed {seed}")).unwrap_or_default()
        );
        if !violation.times_us.is_empty() {
            html.push_str("<table>\n<tr><th class=\"num\">at (s)</th><th>event</th></tr>\n");
            for moment in &violation.times_us {
                let _ = writeln!(
                    html,
                    "<tr><td class=\"num\">{:.3}</td><td>{}</td></tr>",
                    moment.at_us as f64 / 1e6,
                    escape(&moment.event)
                );
            }
            html.push_str("</table>\n");
        }
        if !violation.operations.is_empty() {
            html.push_str("<table>\n<tr><th>operation</th><th class=\"num\">invoked (s)</th><th class=\"num\">completed (s)</th><th>outcome</th><th>idempotency key</th></tr>\n");
            for operation in &violation.operations {
                let seconds =
                    |key: &str| operation[key].as_u64().map_or("-".to_owned(), |us| format!("{:.3}", us as f64 / 1e6));
                let _ = writeln!(
                    html,
                    "<tr><td>#{} {}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td><td><code>{}</code></td></tr>",
                    escape(&text(&operation["op_id"])),
                    escape(&text(&operation["kind"])),
                    seconds("invoke_us"),
                    seconds("complete_us"),
                    escape(&text(&operation["outcome"])),
                    escape(&text(&operation["idempotency_key"]))
                );
            }
            html.push_str("</table>\n");
        }
        html.push_str("</details>\n");
    }
    if run.safety.violations_omitted > 0 {
        let _ = writeln!(html, "<p class=\"note\">{} more violations omitted.</p>", run.safety.violations_omitted);
    }
}

fn run_facts(html: &mut String, run: &Run) {
    html.push_str("<table class=\"facts\">\n");
    let mut fact = |name: &str, value: &str| {
        let _ = writeln!(html, "<tr><th>{name}</th><td>{}</td></tr>", escape(value));
    };
    fact("scenario", &run.scenario.name);
    if let Some(description) = &run.scenario.description {
        fact("description", description);
    }
    fact("file", &run.scenario.file);
    fact("seed", &run.seed.to_string());
    fact("commit", &run.commit);
    fact("hold mode", &run.hold_mode);
    if let Some(live) = &run.live {
        fact("mode", "live: real engine processes over real HTTP (not byte-reproducible)");
        fact("deployment", live["deployment"].as_str().unwrap_or("?"));
        fact(
            "journeys",
            &format!(
                "{} of {} started, {} late (lateness p99 {} µs), pool of {}",
                live["journeys_started"],
                live["arrivals"],
                live["journeys_late"],
                live["lateness_p99_us"],
                live["pool"]
            ),
        );
        fact("duration", &format!("{} s", format_number(run.duration_s)));
    } else {
        fact("mode", &run.mode);
        fact("simulated duration", &format!("{} s", format_number(run.duration_s)));
        if let Some(tick_ms) = run.tick_ms {
            fact("tick (time resolution)", &format!("{tick_ms} ms"));
        }
    }
    if let Some(replay) = &run.replay {
        fact("replay", replay);
    }
    html.push_str("</table>\n");
}

/// A chart of one run: the lines it draws, under a key shared with the other runs' charts.
struct ChartSpec {
    key: String,
    title: String,
    y_label: &'static str,
    lines: Vec<Line>,
}

fn series_line(label: &str, colour: Colour, series: &[Second], value: impl Fn(&Second) -> Option<f64>) -> Line {
    Line {
        label: label.to_owned(),
        colour,
        points: series.iter().filter_map(|second| value(second).map(|value| (second.t_s as f64, value))).collect(),
    }
}

/// One count of the series: its label, its colour, and how to read it.
type Count = (&'static str, Colour, fn(&Second) -> u64);

/// A chart of per-second counts.
fn counts_chart(key: &str, series: &[Second], counts: &[Count]) -> ChartSpec {
    ChartSpec {
        key: key.to_owned(),
        title: "Per simulated second".into(),
        y_label: "per second",
        lines: counts
            .iter()
            .map(|&(label, colour, count)| series_line(label, colour, series, |second| Some(count(second) as f64)))
            .collect(),
    }
}

fn throughput_charts(run: &Run) -> Vec<ChartSpec> {
    vec![counts_chart(
        "throughput",
        &run.series,
        &[
            ("arrivals (queue joins)", PALETTE[0], |second| second.joins),
            ("admissions", PALETTE[3], |second| second.admissions),
            ("holds", PALETTE[4], |second| second.holds),
            ("confirmations", PALETTE[2], |second| second.confirms),
        ],
    )]
}

/// Journey steps in the order a user meets them; other steps follow by name.
const STEP_ORDER: [&str; 9] = [
    "create_user",
    "charge_points",
    "queue_join",
    "queue_status",
    "seat_map",
    "hold",
    "confirm",
    "cancel",
    "read_reservation",
];

fn ordered_steps<'a>(steps: impl IntoIterator<Item = &'a String>) -> Vec<String> {
    let mut steps: Vec<String> = steps.into_iter().cloned().collect();
    steps.sort_by_key(|step| {
        (STEP_ORDER.iter().position(|known| known == step).unwrap_or(STEP_ORDER.len()), step.clone())
    });
    steps.dedup();
    steps
}

fn latency_charts(run: &Run) -> Vec<ChartSpec> {
    let series = &run.series;
    if !run.has_detailed_series() {
        return vec![ChartSpec {
            key: "latency-holds-confirms".into(),
            title: "p99 of holds and confirms (this run result has no per-step series)".into(),
            y_label: "ms",
            lines: vec![series_line("p99", PALETTE[1], series, |second| {
                (second.p99_us > 0).then(|| second.p99_us as f64 / 1e3)
            })],
        }];
    }
    let steps = ordered_steps(series.iter().flat_map(|second| second.latency.iter().flat_map(BTreeMap::keys)));
    steps
        .into_iter()
        .map(|step| {
            let percentile = |pick: fn(&crate::run::StepSecond) -> u64| {
                let step = step.clone();
                move |second: &Second| {
                    second.latency.as_ref().and_then(|latency| latency.get(&step)).map(|step| pick(step) as f64 / 1e3)
                }
            };
            ChartSpec {
                key: format!("latency-{step}"),
                title: step.clone(),
                y_label: "ms",
                lines: vec![
                    series_line("p50", PALETTE[0], series, percentile(|step| step.p50_us)),
                    series_line("p99", PALETTE[1], series, percentile(|step| step.p99_us)),
                ],
            }
        })
        .collect()
}

fn queue_charts(run: &Run) -> Vec<ChartSpec> {
    let series = &run.series;
    if !run.has_detailed_series() {
        return Vec::new();
    }
    vec![
        ChartSpec {
            key: "queue-depth".into(),
            title: "Users waiting in the queue (polling its status)".into(),
            y_label: "users",
            lines: vec![series_line("queue depth", PALETTE[0], series, |second| {
                second.queue_depth.map(|depth| depth as f64)
            })],
        },
        ChartSpec {
            key: "queue-wait".into(),
            title: "Queue wait of the users admitted each second".into(),
            y_label: "seconds",
            lines: vec![
                series_line("p50", PALETTE[0], series, |second| {
                    (second.admissions > 0).then(|| second.queue_wait_p50_us.unwrap_or(0) as f64 / 1e6)
                }),
                series_line("p99", PALETTE[1], series, |second| {
                    (second.admissions > 0).then(|| second.queue_wait_p99_us.unwrap_or(0) as f64 / 1e6)
                }),
            ],
        },
    ]
}

fn error_charts(run: &Run) -> Vec<ChartSpec> {
    vec![counts_chart(
        "errors",
        &run.series,
        &[
            ("rejections (4xx)", PALETTE[4], |second| second.rejections),
            ("errors (5xx)", PALETTE[1], |second| second.errors),
            ("unknown outcomes", PALETTE[3], |second| second.unknown),
        ],
    )]
}

fn timeline(run: &Run) -> Timeline {
    let seconds = |us: u64| us as f64 / 1e6;
    let mut faults: Vec<(f64, f64)> =
        run.faults.iter().map(|window| (seconds(window.start_us), seconds(window.end_us))).collect();
    faults.extend(run.fault_pauses.iter().map(|pause| (seconds(pause.at_us), seconds(pause.at_us + pause.pause_us))));
    let actions =
        run.agent_actions.iter().flatten().map(|action| (seconds(action.at_us), action_colour(action))).collect();
    Timeline { faults, actions }
}

fn action_colour(action: &AgentAction) -> Colour {
    match action.outcome.as_str() {
        "applied" => ACTION_APPLIED,
        "rejected" => ACTION_REJECTED,
        _ => ACTION_FAILED,
    }
}

fn swatch(colour: Colour, label: &str) -> String {
    format!("<span class=\"swatch\" style=\"background:{}\"></span>{}", colour.css(), escape(label))
}

fn legend(lines: &[Line], timeline: &Timeline) -> String {
    let mut legend: String = lines.iter().map(|line| swatch(line.colour, &line.label)).collect();
    if !timeline.faults.is_empty() {
        legend.push_str(&swatch(FAULT_SHADE, "fault window"));
    }
    if !timeline.actions.is_empty() {
        legend.push_str(&swatch(ACTION_APPLIED, "agent action applied"));
        legend.push_str(&swatch(ACTION_REJECTED, "rejected"));
        legend.push_str(&swatch(ACTION_FAILED, "failed"));
    }
    legend
}

/// A section of time charts: one row per chart key, one column per run, on shared axes.
fn time_section(
    html: &mut String,
    id: &str,
    title: &str,
    runs: &[Run],
    timelines: &[Timeline],
    x_max: f64,
    charts: fn(&Run) -> Vec<ChartSpec>,
) -> Result<(), ReportError> {
    let per_run: Vec<Vec<ChartSpec>> = runs.iter().map(charts).collect();
    let mut keys: Vec<&str> = Vec::new();
    for spec in per_run.iter().flatten() {
        if !keys.contains(&spec.key.as_str()) {
            keys.push(&spec.key);
        }
    }
    open_section(html, id, title, runs.len());
    if keys.is_empty() {
        for _ in runs {
            html.push_str(
                "<div class=\"run\"><p class=\"note\">This run result has no data for this section.</p></div>\n",
            );
        }
    }
    for key in keys {
        let y_max = per_run
            .iter()
            .flatten()
            .filter(|spec| spec.key == key)
            .flat_map(|spec| spec.lines.iter().flat_map(|line| line.points.iter().map(|point| point.1)))
            .fold(0.0, f64::max);
        for (index, (run, specs)) in runs.iter().zip(&per_run).enumerate() {
            html.push_str("<div class=\"run\">\n");
            match specs.iter().find(|spec| spec.key == key) {
                Some(spec) => {
                    let chart = TimeChart {
                        y_label: spec.y_label,
                        x_max,
                        y_max,
                        lines: &spec.lines,
                        timeline: &timelines[index],
                    };
                    let caption = if runs.len() == 1 {
                        escape(&spec.title)
                    } else {
                        format!("Run {}: {}", index + 1, escape(&spec.title))
                    };
                    let _ = write!(
                        html,
                        "<figure class=\"chart\" data-chart=\"{}\">\n<figcaption>{caption}</figcaption>\n{}\n<div class=\"legend\">{}</div>\n</figure>\n",
                        escape(key),
                        time_chart(&chart)?,
                        legend(&spec.lines, &timelines[index])
                    );
                }
                None => {
                    let _ = writeln!(html, "<p class=\"note\">{}: no data in this run.</p>", escape(&run.label()));
                }
            }
            html.push_str("</div>\n");
        }
    }
    html.push_str("</div>\n</section>\n");
    Ok(())
}

fn bucket_label(le_us: Option<u64>) -> String {
    match le_us {
        Some(us) if us >= 1_000_000 => format!("{}s", format_number(us as f64 / 1e6)),
        Some(us) => format!("{}ms", format_number(us as f64 / 1e3)),
        None => "slower".to_owned(),
    }
}

fn histogram_section(html: &mut String, runs: &[Run]) -> Result<(), ReportError> {
    open_section(html, "latency-histograms", "Latency histograms, per journey step", runs.len());
    let steps = ordered_steps(runs.iter().flat_map(|run| run.latency_histograms.keys()));
    if steps.is_empty() {
        for _ in runs {
            html.push_str(
                "<div class=\"run\"><p class=\"note\">This run result has no latency histograms.</p></div>\n",
            );
        }
    }
    for step in steps {
        for (index, run) in runs.iter().enumerate() {
            html.push_str("<div class=\"run\">\n");
            match run.latency_histograms.get(&step) {
                Some(buckets) if !buckets.is_empty() => {
                    let labels: Vec<String> = buckets.iter().map(|bucket| bucket_label(bucket.le_us)).collect();
                    let counts: Vec<u64> = buckets.iter().map(|bucket| bucket.count).collect();
                    let caption =
                        if runs.len() == 1 { escape(&step) } else { format!("Run {}: {}", index + 1, escape(&step)) };
                    let _ = write!(
                        html,
                        "<figure class=\"chart\" data-chart=\"histogram-{}\">\n<figcaption>{caption}</figcaption>\n{}\n</figure>\n",
                        escape(&step),
                        bar_chart(&labels, &counts, PALETTE[0], "operations")?
                    );
                }
                _ => {
                    let _ = writeln!(
                        html,
                        "<p class=\"note\">{}: no {} operations.</p>",
                        escape(&run.label()),
                        escape(&step)
                    );
                }
            }
            html.push_str("</div>\n");
        }
    }
    html.push_str("</div>\n</section>\n");
    Ok(())
}

fn errors_by_reason(html: &mut String, run: &Run) {
    let Some(by_code) = run.score["errors"]["by_code"].as_object() else {
        html.push_str("<p class=\"note\">No errors by reason in this run result.</p>\n");
        return;
    };
    if by_code.is_empty() {
        html.push_str("<p>No errors and no rejections.</p>\n");
        return;
    }
    let total: f64 = by_code.values().filter_map(Value::as_f64).sum();
    let mut codes: Vec<(&String, f64)> =
        by_code.iter().map(|(code, count)| (code, count.as_f64().unwrap_or(0.0))).collect();
    codes.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    html.push_str(
        "<table class=\"by-reason\">\n<tr><th>code</th><th class=\"num\">count</th><th class=\"num\">share</th></tr>\n",
    );
    for (code, count) in codes {
        let _ = writeln!(
            html,
            "<tr><td><code>{}</code></td><td class=\"num\">{}</td><td class=\"num\">{:.1} %</td></tr>",
            escape(code),
            format_number(count),
            if total > 0.0 { count / total * 100.0 } else { 0.0 }
        );
    }
    html.push_str("</table>\n");
}

fn faults(html: &mut String, run: &Run) {
    if run.faults.is_empty() {
        html.push_str("<p>No faults in this run.</p>\n");
        return;
    }
    html.push_str("<table class=\"faults\">\n<tr><th>#</th><th>kind</th><th>hosts</th><th class=\"num\">from (s)</th><th class=\"num\">to (s)</th></tr>\n");
    for window in &run.faults {
        let _ = writeln!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{:.3}</td><td class=\"num\">{:.3}</td></tr>",
            window.index,
            escape(&window.kind),
            escape(&window.hosts.join(", ")),
            window.start_us as f64 / 1e6,
            window.end_us as f64 / 1e6
        );
    }
    html.push_str("</table>\n");
    if !run.fault_pauses.is_empty() {
        html.push_str("<table class=\"pauses\">\n<tr><th>fault</th><th>host</th><th>point</th><th class=\"num\">at (s)</th><th class=\"num\">paused (ms)</th></tr>\n");
        for pause in &run.fault_pauses {
            let _ = writeln!(
                html,
                "<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td class=\"num\">{:.3}</td><td class=\"num\">{}</td></tr>",
                pause.fault,
                escape(&pause.host),
                escape(&pause.point),
                pause.at_us as f64 / 1e6,
                pause.pause_us / 1_000
            );
        }
        html.push_str("</table>\n");
    }
    if !run.faults_without_effect.is_empty() {
        html.push_str(
            "<p class=\"warning\"><strong>Faults without effect</strong>: the scenario dodged them, \
             so this run proves nothing about them.</p>\n<table class=\"no-effect\">\n\
             <tr><th>fault</th><th>kind</th><th>why</th></tr>\n",
        );
        for dodged in &run.faults_without_effect {
            let _ = writeln!(
                html,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                dodged.fault,
                escape(&dodged.kind),
                escape(&dodged.reason)
            );
        }
        html.push_str("</table>\n");
    }
}

fn agent(html: &mut String, run: &Run) {
    let agent = &run.score["agent"];
    if let Some(object) = agent.as_object() {
        let mut rows = Vec::new();
        flatten("", agent, &mut rows);
        html.push_str("<table class=\"agent-score\">\n");
        for (name, value) in rows {
            let _ = writeln!(
                html,
                "<tr><th>{}</th><td class=\"num\">{}</td></tr>",
                escape(&name),
                escape(&value_text(&value))
            );
        }
        html.push_str("</table>\n");
        if object.is_empty() {
            html.push_str("<p class=\"note\">The run result has no agent figures.</p>\n");
        }
    } else {
        html.push_str("<p class=\"note\">The run result has no agent figures.</p>\n");
    }
    match &run.agent_actions {
        None => html.push_str("<p class=\"note\">The run result records no agent actions.</p>\n"),
        Some(actions) if actions.is_empty() => html.push_str("<p>The agent took no action.</p>\n"),
        Some(actions) => {
            html.push_str("<table class=\"agent-actions\">\n<tr><th class=\"num\">at (s)</th><th>tool</th><th>arguments</th><th>outcome</th><th>reason</th><th>detail</th></tr>\n");
            for action in actions {
                let _ = writeln!(
                    html,
                    "<tr data-outcome=\"{}\"><td class=\"num\">{:.3}</td><td><code>{}</code></td><td><code>{}</code></td><td>{}{}</td><td>{}</td><td>{}</td></tr>",
                    escape(&action.outcome),
                    action.at_us as f64 / 1e6,
                    escape(&action.tool),
                    escape(&compact(&action.args)),
                    swatch(action_colour(action), ""),
                    escape(&action.outcome),
                    escape(&action.reason),
                    escape(action.detail.as_deref().unwrap_or(""))
                );
            }
            html.push_str("</table>\n");
        }
    }
}

/// The numeric and text leaves of a JSON value, by dotted path.
fn flatten(prefix: &str, value: &Value, rows: &mut Vec<(String, Value)>) {
    match value {
        Value::Object(object) => {
            for (key, child) in object {
                let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
                flatten(&path, child, rows);
            }
        }
        Value::Array(_) => rows.push((prefix.to_owned(), Value::String(compact(value)))),
        leaf => rows.push((prefix.to_owned(), leaf.clone())),
    }
}

/// The score of every run in one table, with each run's delta against the first.
fn score_table(html: &mut String, runs: &[Run]) {
    let flattened: Vec<BTreeMap<String, Value>> = runs
        .iter()
        .map(|run| {
            let mut rows = Vec::new();
            flatten("", &run.score, &mut rows);
            rows.into_iter().collect()
        })
        .collect();
    let mut metrics: Vec<&String> = flattened.iter().flat_map(BTreeMap::keys).collect();
    metrics.sort();
    metrics.dedup();
    html.push_str("<section id=\"score\">\n<h2>Score</h2>\n<table class=\"score\">\n<tr><th>metric</th>");
    for (index, run) in runs.iter().enumerate() {
        let _ = write!(
            html,
            "<th class=\"num\">{}</th>",
            if runs.len() == 1 { "value".to_owned() } else { format!("run {}: {}", index + 1, escape(&run.label())) }
        );
    }
    for index in 1..runs.len() {
        let _ = write!(html, "<th class=\"num\">Δ run {} − run 1</th>", index + 1);
    }
    html.push_str("</tr>\n");
    for metric in metrics {
        let _ = write!(html, "<tr data-metric=\"{}\"><td><code>{}</code></td>", escape(metric), escape(metric));
        for values in &flattened {
            let _ = write!(
                html,
                "<td class=\"num\">{}</td>",
                escape(&values.get(metric).map_or_else(|| "–".to_owned(), value_text))
            );
        }
        let first = flattened[0].get(metric).and_then(Value::as_f64);
        for values in &flattened[1..] {
            let cell = match (first, values.get(metric).and_then(Value::as_f64)) {
                (Some(first), Some(value)) => delta(first, value),
                _ => String::new(),
            };
            let _ = write!(html, "<td class=\"num delta\">{cell}</td>");
        }
        html.push_str("</tr>\n");
    }
    html.push_str("</table>\n</section>\n");
}

fn delta(first: f64, value: f64) -> String {
    let difference = value - first;
    if difference == 0.0 {
        return "=".to_owned();
    }
    let percent = if first == 0.0 { String::new() } else { format!(" ({:+.1} %)", difference / first.abs() * 100.0) };
    format!("{}{}{percent}", if difference > 0.0 { "+" } else { "" }, format_number(difference))
}

/// A number as a reader wants it: integers whole, fractions to four significant places.
pub fn format_number(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{value:.0}")
    } else if value.abs() >= 100.0 {
        format!("{value:.1}")
    } else {
        let formatted = format!("{value:.4}");
        formatted.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

fn value_text(value: &Value) -> String {
    match value {
        Value::Number(number) => number.as_f64().map_or_else(|| number.to_string(), format_number),
        Value::Null => "–".to_owned(),
        other => text(other),
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn compact(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_neutralises_markup() {
        assert_eq!(
            escape("<script>alert('x')</script> & \"q\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
    }

    #[test]
    fn numbers_read_naturally() {
        assert_eq!(format_number(3.0), "3");
        assert_eq!(format_number(0.25), "0.25");
        assert_eq!(format_number(45.827010622), "45.827");
        assert_eq!(format_number(1234.56), "1234.6");
    }

    #[test]
    fn deltas_carry_sign_and_percent() {
        assert_eq!(delta(100.0, 150.0), "+50 (+50.0 %)");
        assert_eq!(delta(100.0, 90.0), "-10 (-10.0 %)");
        assert_eq!(delta(0.0, 2.0), "+2");
        assert_eq!(delta(5.0, 5.0), "=");
    }
}
