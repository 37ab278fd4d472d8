//! The pipeline file format, as Rust types. The JSON Schema (`sentiflow schema`) is generated
//! from these types, so editors and the parser agree on what a pipeline may contain.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::executors::Resources;
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
    #[serde(default)]
    pub resources: Resources,
    #[serde(default)]
    pub runs_on: Option<String>,
    #[serde(default)]
    pub max_parallel: Option<usize>,
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
    /// What the stage needs from the machine it runs on; an executor asks its engine for it,
    /// a local run ignores it. Not part of the cache key.
    #[serde(default)]
    resources: Option<Resources>,
    /// The executor that runs the stage, by its name in the settings file's `executors:`
    /// (e.g. `gpu`); without that section, or with `run --local`, the stage runs here. Not
    /// part of the cache key.
    #[serde(default)]
    runs_on: Option<String>,
    /// For a search (`tune`) on an executor: run each trial as a job of its own, at most this
    /// many at once, instead of the whole stage as one job. Not part of the cache key.
    #[serde(default)]
    #[schemars(range(min = 1))]
    max_parallel: Option<usize>,
    #[serde(flatten)]
    kind: StageKind,
}

/// The JSON Schema of pipeline files, pretty-printed. Every typed field also accepts a string
/// that is one `${params.NAME}` or `${env.NAME}` reference: the file is checked as written, and
/// `sentiflow validate` checks the resolved values.
pub fn json_schema() -> String {
    let mut schema = serde_json::to_value(schemars::schema_for!(PipelineFile)).expect("schemas serialize");
    // What serde's attributes cannot say: the name rules of `pipeline::valid_name`, at least one
    // stage, and no unknown key beside a stage's flattened kind.
    let name = serde_json::json!({"pattern": NAME});
    merge(&mut schema["properties"]["name"], &name);
    merge(
        &mut schema["properties"]["stages"],
        &serde_json::json!({"minProperties": 1, "propertyNames": name}),
    );
    merge(
        &mut schema["$defs"]["StageSchema"],
        &serde_json::json!({"unevaluatedProperties": false}),
    );
    allow_references(&mut schema);
    let mut text = serde_json::to_string_pretty(&schema).expect("schemas serialize");
    text.push('\n');
    text
}

const NAME: &str = "^[A-Za-z0-9_-]+$";

fn merge(target: &mut Value, extra: &Value) {
    if let (Value::Object(t), Value::Object(e)) = (target, extra) {
        t.extend(e.clone());
    }
}

/// A whole-value reference, as `pipeline::interp` resolves it.
const REFERENCE: &str = r"^\$\{(params|env)\.[^${}]+\}$";

/// Rewrites every property and array item that is not a plain string as `anyOf: [its schema, a
/// reference]`, keeping its description and default outside for editors' hover text.
fn allow_references(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            if let Some(Value::Object(props)) = map.get_mut("properties") {
                for (name, prop) in props.iter_mut() {
                    if name != "uses" {
                        accept_reference(prop);
                    }
                }
            }
            if let Some(items) = map.get_mut("items") {
                accept_reference(items);
            }
            map.values_mut().for_each(allow_references);
        }
        Value::Array(list) => list.iter_mut().for_each(allow_references),
        _ => {}
    }
}

fn accept_reference(prop: &mut Value) {
    let Value::Object(map) = prop else { return };
    let plain_string =
        map.get("type") == Some(&Value::from("string")) && !map.contains_key("enum") && !map.contains_key("const");
    if plain_string {
        return;
    }
    let mut outer = Map::new();
    for key in ["description", "default"] {
        if let Some(v) = map.remove(key) {
            outer.insert(key.into(), v);
        }
    }
    let reference = serde_json::json!({"type": "string", "pattern": REFERENCE});
    outer.insert(
        "anyOf".into(),
        Value::Array(vec![Value::Object(std::mem::take(map)), reference]),
    );
    *prop = Value::Object(outer);
}
