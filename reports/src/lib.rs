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
