//! The bodies of `tcore report` and `tcore gate`; `main.rs` parses and dispatches.

pub mod gate;
pub mod report;

use std::path::{Path, PathBuf};

use anyhow::Context;

/// A run result given on the command line: the `run.json` file, or a directory holding one.
pub fn run_json_path(path: &Path) -> PathBuf {
    if path.is_dir() { path.join("run.json") } else { path.to_owned() }
}

/// Reads a JSON file.
pub fn read_json(path: &Path) -> anyhow::Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))
}

/// Writes a file, creating its directory.
pub fn write_file(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    if let Some(parent) = path.parent().filter(|parent| !parent.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}
