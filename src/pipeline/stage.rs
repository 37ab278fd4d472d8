//! A stage of a validated pipeline, as the graph and the engine see it.

use std::collections::BTreeSet;

use super::yaml::Pos;
use crate::executors::Resources;
use crate::stages::StageKind;

/// One stage of a validated pipeline.
#[derive(Debug, Clone)]
pub struct Stage {
    pub name: String,
    pub needs: Vec<String>,
    pub kind: StageKind,
    /// The parameters its settings refer to through `${params.NAME}`.
    pub param_uses: BTreeSet<ParamUse>,
    pub resources: Resources,
    /// The executor it runs on, and where the file names it.
    pub runs_on: Option<(String, Pos)>,
    /// For a search on an executor: its trials are jobs, at most this many at once.
    pub max_parallel: Option<usize>,
}

/// A `${params.NAME}` in a stage's settings: the parameter, and the field of `with` that holds it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ParamUse {
    pub field: String,
    pub param: String,
}
