//! Run results rendered as self-contained HTML.
//!
//! [`render`] turns one or more run results (`run.json`, schema `tcore.run/1`) into one HTML
//! page: a verdict banner with each invariant and its counterexamples, the scenario, seed and
//! commit, time charts (throughput, latency per journey step, queue depth and wait, errors)
//! with fault windows shaded and the ops agent's actions marked, latency histograms, errors by
//! reason, the agent's actions, and the score table. Several runs are shown side by side, with
//! the score's deltas against the first.
//!
//! **Invariant:** rendering is a pure function of the run results: no clock, no file, no
//! network. The page fetches nothing either: charts are inline SVG, styles inline CSS, and a
//! Content-Security-Policy forbids every load. Every string taken from a run result is
//! escaped. Reports never run a scenario.

#![forbid(unsafe_code)]

mod charts;
mod html;
mod run;

pub use run::RUN_SCHEMA;

/// Why a report could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// No run result was given.
    #[error("no run result to report on")]
    NoRuns,
    /// A run result is not one this crate reads.
    #[error("run result {index}: {message}")]
    InvalidRun {
        /// 1-based position among the inputs.
        index: usize,
        /// What is wrong.
        message: String,
    },
    /// A chart could not be drawn.
    #[error("drawing a chart: {0}")]
    Chart(String),
}

/// Renders one run result, or several side by side, as one HTML page.
pub fn render(runs: &[serde_json::Value]) -> Result<String, ReportError> {
    if runs.is_empty() {
        return Err(ReportError::NoRuns);
    }
    let runs = runs
        .iter()
        .enumerate()
        .map(|(position, value)| {
            let index = position + 1;
            let schema = value.get("schema").and_then(serde_json::Value::as_str).unwrap_or("(none)");
            if schema != RUN_SCHEMA {
                return Err(ReportError::InvalidRun {
                    index,
                    message: format!("schema is {schema:?}, expected {RUN_SCHEMA:?}"),
                });
            }
            serde_json::from_value::<run::Run>(value.clone())
                .map_err(|error| ReportError::InvalidRun { index, message: error.to_string() })
        })
        .collect::<Result<Vec<_>, _>>()?;
    html::page(&runs)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A run result as the first `tcore.run/1` writers made it: no per-step series, no queue
    /// figures, no histograms, no agent.
    fn minimal_run() -> serde_json::Value {
        json!({
            "schema": "tcore.run/1",
            "scenario": { "name": "old", "file": "old.toml" },
            "seed": 1,
            "commit": "abc",
            "hold_mode": "Atomic",
            "duration_s": 3.0,
            "verdict": "pass",
            "safety": { "passed": true, "invariants": [{ "invariant": "no-double-sale", "passed": true, "violations": 0 }] },
            "slo": [],
            "score": { "oversell": 0, "errors": { "by_code": {} } },
            "series": [
                { "t_s": 0, "requests": 5, "joins": 5, "admissions": 2, "holds": 1, "confirms": 1, "rejections": 0,
                  "errors": 0, "unknown": 0, "p99_us": 12000 },
                { "t_s": 1, "requests": 3, "joins": 1, "admissions": 2, "holds": 2, "confirms": 1, "rejections": 1,
                  "errors": 0, "unknown": 0, "p99_us": 15000 },
            ],
            "faults": [],
        })
    }

    #[test]
    fn an_older_run_result_renders_what_it_has_and_says_what_it_lacks() {
        let html = render(&[minimal_run()]).expect("renders");
        assert_eq!(html.matches("<figure class=\"chart\"").count(), 3, "throughput, p99 of holds and confirms, errors");
        assert!(html.contains("data-chart=\"latency-holds-confirms\""));
        assert!(html.contains("this run result has no per-step series"));
        assert!(html.contains("This run result has no latency histograms."));
        assert!(html.contains("The run result records no agent actions."));
        assert!(html.contains("<p>No errors and no rejections.</p>"));
    }

    #[test]
    fn a_run_result_missing_required_fields_is_refused_with_its_position() {
        let mut run = minimal_run();
        run.as_object_mut().expect("an object").remove("safety");
        let error = render(&[minimal_run(), run]).expect_err("no safety").to_string();
        assert_eq!(error, "run result 2: missing field `safety`");
    }
}
