//! The pipeline file format, as Rust types. The JSON Schema (`sentiflow schema`) is generated
//! from these types, so editors and the parser agree on what a pipeline may contain.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::stages::StageKind;

/// A pipeline file: named parameters and a DAG of stages.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "sentiflow pipeline")]
pub struct PipelineFile {
    /// Name of the pipeline (letters, digits, `_` and `-`).
    pub name: String,
    /// Free text; not part of any cache key.
    #[serde(default)]
    pub description: Option<String>,
    /// Default parameter values, referenced as `${params.NAME}` and overridden with `--set`.
    #[serde(default)]
    pub params: Map<String, Value>,
    /// The stages, by name. A stage starts as soon as every stage in its `needs` has finished.
    #[schemars(with = "BTreeMap<String, StageSchema>")]
    pub stages: Map<String, Value>,
}

/// How a stage is written in the file, before its kind's parameters are typed.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStage {
    pub uses: String,
    #[serde(default)]
    pub needs: Vec<String>,
    #[serde(default)]
    #[allow(dead_code)] // documentation only: never hashed, never run
    pub description: Option<String>,
    #[serde(default)]
    pub with: Value,
}

/// A stage: its kind (`uses`), the kind's parameters (`with`) and the stages it needs.
#[derive(JsonSchema)]
#[allow(dead_code)] // describes the schema of `RawStage` with its typed `with`
pub struct StageSchema {
    /// Stages that must finish before this one starts.
    #[serde(default)]
    needs: Vec<String>,
    /// Free text; not part of the cache key.
    #[serde(default)]
    description: Option<String>,
    #[serde(flatten)]
    kind: StageKind,
}

/// The JSON Schema of pipeline files, pretty-printed.
pub fn json_schema() -> String {
    let schema = schemars::schema_for!(PipelineFile);
    let mut text = serde_json::to_string_pretty(&schema).expect("schemas serialize");
    text.push('\n');
    text
}
