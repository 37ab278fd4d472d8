//! What a run reports about each stage, shared by the engine that produces the reports and the
//! lock file that records them.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::cache::{Artifact, Metrics};
use crate::executors::Placement;

/// How a stage ended in one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Ran and produced new outputs.
    Ran,
    /// Its outputs came from the cache.
    Cached,
    /// Its outputs came from the remote cache (`--remote-cache`), the local one lacking them.
    Fetched,
    Failed,
    /// Not run because a stage it needs failed or the run was interrupted.
    Skipped,
    /// Stopped by an interrupt while running.
    Interrupted,
}

impl State {
    /// Whether the stage's outputs are in place: it ran, or they came from a cache.
    pub fn succeeded(self) -> bool {
        matches!(self, State::Ran | State::Cached | State::Fetched)
    }

    /// The name it serializes as.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Ran => "ran",
            State::Cached => "cached",
            State::Fetched => "fetched",
            State::Failed => "failed",
            State::Skipped => "skipped",
            State::Interrupted => "interrupted",
        }
    }
}

/// One stage's part in a run.
#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    pub name: String,
    pub kind: &'static str,
    pub state: State,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Input path → content hash (declared dependencies and outputs of needed stages).
    pub inputs: BTreeMap<String, String>,
    pub outs: Vec<Artifact>,
    pub metrics: Metrics,
    /// How long the run that produced the outputs took (the original run for a cache hit).
    pub duration_ms: u64,
    /// Unix times, in seconds, of this invocation's start and end of the stage.
    pub started_at: f64,
    pub finished_at: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Where it ran, when an executor ran it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
}

/// A whole run: every selected stage, in the order they finished.
#[derive(Debug, Serialize)]
pub struct Report {
    pub pipeline: String,
    pub ok: bool,
    pub interrupted: bool,
    pub stages: Vec<StageReport>,
}

impl Report {
    /// How many stages ended in `state`.
    pub fn count(&self, state: State) -> usize {
        self.stages.iter().filter(|s| s.state == state).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_serialized_ones() {
        for state in [
            State::Ran,
            State::Cached,
            State::Fetched,
            State::Failed,
            State::Skipped,
            State::Interrupted,
        ] {
            assert_eq!(serde_json::to_value(state).unwrap(), state.as_str());
        }
    }
}
