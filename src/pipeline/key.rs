//! What a stage's cache key covers: its kind and version, its parameters with keys sorted, and
//! the hashes of its inputs. The engine computes keys from it; the lock file compares against it.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::Pipeline;
use crate::cache::{sha256_hex, Artifact, CacheError, Hasher};

/// Input hashes of stage `i`: its declared dependencies (hashed now) and the outputs of the
/// stages it needs (as they reported them).
pub fn stage_inputs(
    p: &Pipeline,
    i: usize,
    hasher: &Hasher,
    upstream: &BTreeMap<String, Vec<Artifact>>,
) -> Result<BTreeMap<String, String>, (String, CacheError)> {
    let mut inputs = BTreeMap::new();
    for outs in upstream.values() {
        for a in outs {
            inputs.insert(a.path.clone(), a.hash.clone());
        }
    }
    for dep in p.stages[i].kind.stage().deps() {
        let a = hasher.artifact(&p.root, &dep).map_err(|e| (dep.clone(), e))?;
        inputs.insert(a.path, a.hash);
    }
    Ok(inputs)
}

/// The cache key of a stage: a hash of its kind, the kind's implementation version, its
/// parameters (key order ignored) and its inputs' hashes.
pub fn cache_key(kind: &str, version: u32, params: &Value, inputs: &BTreeMap<String, String>) -> String {
    let material = json!({
        "kind": kind,
        "version": version,
        "params": canonical(params),
        "inputs": inputs,
    });
    sha256_hex(serde_json::to_string(&material).expect("keys serialize").as_bytes())
}

/// `value` with every object's keys sorted, so equal parameters hash equally.
pub fn canonical(value: &Value) -> Value {
    match value {
        Value::Object(m) => {
            let sorted: BTreeMap<&String, Value> = m.iter().map(|(k, v)| (k, canonical(v))).collect();
            Value::Object(sorted.into_iter().map(|(k, v)| (k.clone(), v)).collect())
        }
        Value::Array(a) => Value::Array(a.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_changes_when_and_only_when_its_material_changes() {
        let inputs: BTreeMap<String, String> = [("data/x".to_string(), "aa".to_string())].into();
        let params = json!({"run": "echo", "outs": ["a", "b"]});
        let base = cache_key("command", 1, &params, &inputs);
        assert_eq!(
            base,
            cache_key("command", 1, &json!({"outs": ["a", "b"], "run": "echo"}), &inputs)
        );
        assert_ne!(base, cache_key("train", 1, &params, &inputs));
        assert_ne!(base, cache_key("command", 2, &params, &inputs));
        assert_ne!(
            base,
            cache_key("command", 1, &json!({"run": "echo", "outs": ["b", "a"]}), &inputs)
        );
        let changed: BTreeMap<String, String> = [("data/x".to_string(), "ab".to_string())].into();
        assert_ne!(base, cache_key("command", 1, &params, &changed));
        let renamed: BTreeMap<String, String> = [("data/y".to_string(), "aa".to_string())].into();
        assert_ne!(base, cache_key("command", 1, &params, &renamed));
    }
}
