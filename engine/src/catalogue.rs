//! A sale read from a JSON file when a node starts (`serve --catalog FILE`): the schedules on
//! sale and the fans' accounts, which is how a load test or a staging deployment gets the
//! opening it replays.
//!
//! **Invariant:** a catalogue is loaded at most once per system of record: a node that finds
//! any of its schedules already there loads nothing (another node sharing the stores did).
//! Accounts are opened in the file's order, so on a fresh system of record the `n`-th account
//! has user id `n`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::domain::{Concert, Schedule, Section};
use crate::engine::{Engine, EngineError};

/// The file's contents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalogue {
    pub schedules: Vec<CatalogueSchedule>,
    /// Accounts to open, group after group.
    #[serde(default)]
    pub accounts: Vec<AccountGroup>,
}

/// One schedule on sale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogueSchedule {
    pub id: u64,
    pub concert: String,
    /// When its sale opens, in milliseconds after the catalogue is loaded.
    #[serde(default)]
    pub opens_in_ms: u64,
    pub sections: Vec<Section>,
}

/// `count` accounts named `{prefix}{index}`, each starting with `points`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountGroup {
    pub prefix: String,
    pub count: u64,
    pub points: u64,
}

/// What loading did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loaded {
    Loaded {
        schedules: usize,
        accounts: u64,
    },
    /// A schedule of the catalogue was already there: nothing was loaded.
    AlreadyThere,
}

/// Why a catalogue file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CatalogueError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {source}")]
    Parse { path: String, source: serde_json::Error },
}

impl Catalogue {
    /// Reads a catalogue file.
    pub fn read(path: &Path) -> Result<Catalogue, CatalogueError> {
        let shown = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|source| CatalogueError::Read { path: shown.clone(), source })?;
        serde_json::from_str(&text).map_err(|source| CatalogueError::Parse { path: shown, source })
    }

    /// Puts the schedules on sale and opens the accounts, unless a schedule is already there.
    pub async fn load_into(&self, engine: &Engine) -> Result<Loaded, EngineError> {
        let existing = engine.schedules().await?;
        if self.schedules.iter().any(|schedule| existing.iter().any(|sale| sale.id == schedule.id)) {
            return Ok(Loaded::AlreadyThere);
        }
        let now_ms = engine.now_ms();
        for schedule in &self.schedules {
            engine
                .add_schedule(Schedule {
                    id: schedule.id,
                    concert: Concert { id: schedule.id, name: schedule.concert.clone() },
                    opens_at_ms: now_ms.saturating_add(schedule.opens_in_ms),
                    sections: schedule.sections.clone(),
                })
                .await?;
        }
        let mut accounts = 0;
        for group in &self.accounts {
            for index in 0..group.count {
                engine.open_account(format!("{}{index}", group.prefix), group.points).await?;
                accounts += 1;
            }
        }
        Ok(Loaded::Loaded { schedules: self.schedules.len(), accounts })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_catalogue_reads_from_json_and_refuses_unknown_keys() {
        let text = r#"{"schedules":[{"id":1,"concert":"C","sections":[{"name":"Floor","price_points":300,"seats_count":10}]}],
            "accounts":[{"prefix":"user-","count":3,"points":1000}]}"#;
        let catalogue: Catalogue = serde_json::from_str(text).expect("a catalogue");
        assert_eq!(catalogue.schedules[0].sections[0].seats_count, 10);
        assert_eq!(catalogue.schedules[0].opens_in_ms, 0);
        assert_eq!(catalogue.accounts[0].count, 3);
        let unknown = text.replace("\"points\":1000", "\"points\":1000,\"admin\":true");
        assert!(serde_json::from_str::<Catalogue>(&unknown).is_err());
    }
}
