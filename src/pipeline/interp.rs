//! `${params.NAME}` and `${env.NAME}` interpolation inside stage parameters.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use super::yaml::{child_path, index_path};

/// An interpolation that could not be resolved, with the path of the string that holds it.
#[derive(Debug)]
pub struct InterpError {
    pub path: String,
    pub message: String,
    pub hint: String,
}

/// Replaces every `${params.X}` and `${env.X}` in the strings of `value`, adding each parameter
/// it refers to to `used`. A string that is exactly one `${params.X}` takes the parameter's value
/// with its type (so `seed: ${params.seed}` stays a number); `$${` writes a literal `${`.
pub fn interpolate(
    value: &mut Value,
    path: &str,
    params: &Map<String, Value>,
    env: &dyn Fn(&str) -> Option<String>,
    used: &mut BTreeSet<String>,
) -> Result<(), InterpError> {
    match value {
        Value::String(s) => {
            if let Some(new) = expand(s, path, params, env, used)? {
                *value = new;
            }
            Ok(())
        }
        Value::Array(items) => items
            .iter_mut()
            .enumerate()
            .try_for_each(|(i, v)| interpolate(v, &index_path(path, i), params, env, used)),
        Value::Object(map) => map
            .iter_mut()
            .try_for_each(|(k, v)| interpolate(v, &child_path(path, k), params, env, used)),
        _ => Ok(()),
    }
}

fn expand(
    s: &str,
    path: &str,
    params: &Map<String, Value>,
    env: &dyn Fn(&str) -> Option<String>,
    used: &mut BTreeSet<String>,
) -> Result<Option<Value>, InterpError> {
    if !s.contains("${") {
        return Ok(None);
    }
    if let Some(expr) = s.strip_prefix("${").and_then(|r| r.strip_suffix('}')) {
        if !expr.contains(['{', '}', '$']) {
            return resolve(expr, path, params, env, used).map(Some);
        }
    }
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        if rest[..start].ends_with('$') {
            out.push_str(&rest[..start - 1]);
            out.push_str("${");
            rest = &rest[start + 2..];
            continue;
        }
        out.push_str(&rest[..start]);
        let Some(len) = rest[start..].find('}') else {
            return Err(InterpError {
                path: path.to_string(),
                message: format!("unterminated `${{` in `{s}`"),
                hint: "close it with `}`, or write `$${` for a literal `${`".into(),
            });
        };
        let expr = &rest[start + 2..start + len];
        match resolve(expr, path, params, env, used)? {
            Value::String(v) => out.push_str(&v),
            other => out.push_str(&other.to_string()),
        }
        rest = &rest[start + len + 1..];
    }
    out.push_str(rest);
    Ok(Some(Value::String(out)))
}

fn resolve(
    expr: &str,
    path: &str,
    params: &Map<String, Value>,
    env: &dyn Fn(&str) -> Option<String>,
    used: &mut BTreeSet<String>,
) -> Result<Value, InterpError> {
    let err = |message: String, hint: String| InterpError {
        path: path.to_string(),
        message,
        hint,
    };
    match expr.split_once('.') {
        Some(("params", name)) => {
            let value = params.get(name).cloned();
            if value.is_some() {
                used.insert(name.to_string());
            }
            value.ok_or_else(|| {
                let known: Vec<&str> = params.keys().map(String::as_str).collect();
                err(
                    format!("undefined parameter `{name}` in `${{{expr}}}`"),
                    if known.is_empty() {
                        "declare it under `params:` at the top of the file".into()
                    } else {
                        format!(
                            "{}declared parameters: {}",
                            super::diag::did_you_mean(name, known.iter().copied()),
                            known.join(", ")
                        )
                    },
                )
            })
        }
        Some(("env", name)) => env(name).map(Value::String).ok_or_else(|| {
            err(
                format!("environment variable `{name}` is not set (used in `${{{expr}}}`)"),
                format!("export {name}=… before running, or use a parameter instead"),
            )
        }),
        _ => Err(err(
            format!("unknown interpolation `${{{expr}}}`"),
            "write `${params.NAME}` or `${env.NAME}`".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params() -> Map<String, Value> {
        json!({"greeting": "hi", "seed": 42}).as_object().unwrap().clone()
    }

    fn env(name: &str) -> Option<String> {
        (name == "HOME_DIR").then(|| "/home/x".to_string())
    }

    #[test]
    fn whole_string_keeps_type() {
        let mut v = json!({"seed": "${params.seed}", "msg": "say ${params.greeting} ${params.seed}"});
        let mut used = BTreeSet::new();
        interpolate(&mut v, "with", &params(), &env, &mut used).unwrap();
        assert_eq!(v, json!({"seed": 42, "msg": "say hi 42"}));
        assert_eq!(used, BTreeSet::from(["greeting".to_string(), "seed".to_string()]));
    }

    #[test]
    fn env_and_escape() {
        let mut v = json!(["${env.HOME_DIR}/a", "$${params.seed}"]);
        let mut used = BTreeSet::new();
        interpolate(&mut v, "with", &params(), &env, &mut used).unwrap();
        assert_eq!(v, json!(["/home/x/a", "${params.seed}"]));
        assert!(used.is_empty(), "an escaped reference uses nothing: {used:?}");
    }

    #[test]
    fn undefined_names_fail_with_path() {
        let mut v = json!({"a": ["ok", "${params.nope}"]});
        let e = interpolate(&mut v, "with", &params(), &env, &mut BTreeSet::new()).unwrap_err();
        assert_eq!(e.path, "with.a[1]");
        assert!(e.message.contains("nope"));
        let mut v = json!("${env.NOPE}");
        assert!(interpolate(&mut v, "w", &params(), &env, &mut BTreeSet::new()).is_err());
    }
}
