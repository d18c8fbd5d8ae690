//! `tcore report RUN.json... [--out FILE]`: one run result, or several side by side, as HTML.

use std::path::{Path, PathBuf};

use anyhow::Context;

use super::{read_json, run_json_path, write_file};

#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// Run results (`run.json`, or the directory holding it); several are compared side by side.
    #[arg(required = true, value_name = "RUN.json")]
    pub runs: Vec<PathBuf>,
    /// Where the HTML goes (default: report.html beside a single run result, else
    /// target/tcore/comparison.html).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Renders the report; returns where it went.
pub fn report(args: &ReportArgs) -> anyhow::Result<PathBuf> {
    let paths: Vec<PathBuf> = args.runs.iter().map(|path| run_json_path(path)).collect();
    let runs = paths.iter().map(|path| read_json(path)).collect::<anyhow::Result<Vec<_>>>()?;
    let html = tcore_reports::render(&runs).with_context(|| {
        let files: Vec<String> = paths.iter().map(|path| path.display().to_string()).collect();
        format!("rendering {}", files.join(", "))
    })?;
    let out = match (&args.out, paths.as_slice()) {
        (Some(out), _) => out.clone(),
        (None, [single]) => single.parent().unwrap_or(Path::new(".")).join("report.html"),
        (None, _) => PathBuf::from("target/tcore/comparison.html"),
    };
    write_file(&out, html.as_bytes())?;
    Ok(out)
}

/// Writes `report.html` for a run result just written to `out`.
pub fn write_beside(run: &serde_json::Value, out: &Path) -> anyhow::Result<PathBuf> {
    let html = tcore_reports::render(std::slice::from_ref(run)).context("rendering report.html")?;
    let path = out.join("report.html");
    write_file(&path, html.as_bytes())?;
    Ok(path)
}
