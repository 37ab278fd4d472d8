//! Parameter values set from outside a pipeline file (`--set NAME=VALUE`, `POST /training`).
//!
//! They are typed scalars and are never parsed as YAML: a value is data, so it cannot nest,
//! expand aliases or become a second document, whatever its text.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A parameter value: what a pipeline's `params:` may declare and `--set` may replace.
#[derive(Debug, Clone, PartialEq, Serialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum ParamValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

impl ParamValue {
    /// Reads `--set` text: `true`/`false`, an integer, a finite decimal number, otherwise text.
    /// Quotes keep a number-like value text (`--set name="'7'"`).
    pub fn parse(raw: &str) -> Result<ParamValue, String> {
        let quoted = |q: char| raw.len() >= 2 && raw.starts_with(q) && raw.ends_with(q);
        if quoted('\'') || quoted('"') {
            return Ok(ParamValue::Text(raw[1..raw.len() - 1].to_string()));
        }
        match raw {
            "true" => return Ok(ParamValue::Bool(true)),
            "false" => return Ok(ParamValue::Bool(false)),
            _ => {}
        }
        let digits = raw.strip_prefix(['-', '+']).unwrap_or(raw);
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            return raw
                .parse::<i64>()
                .map(ParamValue::Int)
                .map_err(|_| format!("`{raw}` does not fit a 64-bit integer; quote it to pass it as text"));
        }
        // Only plain decimal notation: Rust also reads `inf`, `NaN` and `infinity`, which are text.
        let numeric = digits.bytes().all(|b| b.is_ascii_digit() || b"._eE+-".contains(&b))
            && digits.bytes().any(|b| b.is_ascii_digit());
        if numeric {
            if let Ok(x) = raw.parse::<f64>() {
                return if x.is_finite() {
                    Ok(ParamValue::Float(x))
                } else {
                    Err(format!("`{raw}` is too large for a 64-bit float"))
                };
            }
        }
        Ok(ParamValue::Text(raw.to_string()))
    }

    pub fn to_json(&self) -> Value {
        match self {
            ParamValue::Bool(b) => Value::Bool(*b),
            ParamValue::Int(i) => Value::from(*i),
            ParamValue::Float(x) => Value::from(*x),
            ParamValue::Text(s) => Value::String(s.clone()),
        }
    }

    /// This value as the declared parameter `declared` expects it, or what kind it should be.
    /// Integers are accepted for floats, and anything for text (`--set name=2024` is the text
    /// `2024` when `name` is declared as text).
    pub fn conform(&self, declared: &Value) -> Result<Value, &'static str> {
        Ok(match (declared, self) {
            (Value::Bool(_), ParamValue::Bool(b)) => Value::Bool(*b),
            (Value::Bool(_), _) => return Err("`true` or `false`"),
            (Value::Number(n), ParamValue::Int(i)) if n.is_i64() || n.is_u64() => Value::from(*i),
            (Value::Number(n), _) if n.is_i64() || n.is_u64() => return Err("an integer"),
            (Value::Number(_), ParamValue::Int(i)) => Value::from(*i as f64),
            (Value::Number(_), ParamValue::Float(x)) => Value::from(*x),
            (Value::Number(_), _) => return Err("a number"),
            (Value::String(_), v) => Value::String(v.to_string()),
            (Value::Null, v) => v.to_json(),
            (Value::Array(_) | Value::Object(_), _) => {
                return Err("a list or mapping, which only the pipeline file can set")
            }
        })
    }
}

impl fmt::Display for ParamValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamValue::Bool(b) => write!(f, "{b}"),
            ParamValue::Int(i) => write!(f, "{i}"),
            ParamValue::Float(x) => write!(f, "{x}"),
            ParamValue::Text(s) => f.write_str(s),
        }
    }
}

/// JSON scalars only: a list, an object or `null` is an error naming what is expected.
impl<'de> Deserialize<'de> for ParamValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Scalar;
        impl<'de> Visitor<'de> for Scalar {
            type Value = ParamValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<ParamValue, E> {
                Ok(ParamValue::Bool(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ParamValue, E> {
                Ok(ParamValue::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ParamValue, E> {
                i64::try_from(v)
                    .map(ParamValue::Int)
                    .map_err(|_| E::custom(format!("{v} does not fit a 64-bit integer")))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<ParamValue, E> {
                Ok(ParamValue::Float(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ParamValue, E> {
                Ok(ParamValue::Text(v.to_string()))
            }
        }
        deserializer.deserialize_any(Scalar)
    }
}

/// One `--set NAME=VALUE`.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    pub name: String,
    pub value: ParamValue,
}

impl FromStr for Override {
    type Err = String;

    fn from_str(s: &str) -> Result<Override, String> {
        let (name, raw) = s
            .split_once('=')
            .ok_or_else(|| format!("bad --set `{s}`: expected NAME=VALUE, e.g. `seed=7`"))?;
        if name.is_empty() {
            return Err(format!("bad --set `{s}`: the parameter name is empty"));
        }
        let value = ParamValue::parse(raw).map_err(|e| format!("bad --set `{s}`: {e}"))?;
        Ok(Override {
            name: name.to_string(),
            value,
        })
    }
}

impl fmt::Display for Override {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.name, self.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_text_becomes_typed_scalars() {
        let p = |s| ParamValue::parse(s).unwrap();
        assert_eq!(p("7"), ParamValue::Int(7));
        assert_eq!(p("-3"), ParamValue::Int(-3));
        assert_eq!(p("1.0e-4"), ParamValue::Float(1.0e-4));
        assert_eq!(p("true"), ParamValue::Bool(true));
        assert_eq!(p("'7'"), ParamValue::Text("7".into()));
        assert_eq!(p("'"), ParamValue::Text("'".into()));
        assert_eq!(p("inf"), ParamValue::Text("inf".into()));
        assert_eq!(p("- - - x"), ParamValue::Text("- - - x".into()));
        assert_eq!(p("&a [*a, *a]"), ParamValue::Text("&a [*a, *a]".into()));
        assert!(ParamValue::parse("99999999999999999999999999999999")
            .unwrap_err()
            .contains("64-bit integer"));
        assert!(ParamValue::parse("1e400").unwrap_err().contains("too large"));
    }

    #[test]
    fn overrides_need_a_name_and_an_equals_sign() {
        let o: Override = "data=a=b.csv".parse().unwrap();
        assert_eq!((o.name.as_str(), o.value), ("data", ParamValue::Text("a=b.csv".into())));
        assert!("seed".parse::<Override>().unwrap_err().contains("expected NAME=VALUE"));
        assert!("=1".parse::<Override>().unwrap_err().contains("name is empty"));
    }

    #[test]
    fn declared_kinds_are_kept() {
        let int = Value::from(42);
        assert_eq!(ParamValue::Int(7).conform(&int), Ok(Value::from(7)));
        assert_eq!(ParamValue::Float(0.5).conform(&int), Err("an integer"));
        assert_eq!(ParamValue::Int(1).conform(&Value::from(0.1)), Ok(Value::from(1.0)));
        assert_eq!(
            ParamValue::Int(2024).conform(&Value::from("x")),
            Ok(Value::from("2024"))
        );
        assert_eq!(
            ParamValue::Text("yes".into()).conform(&Value::Bool(true)),
            Err("`true` or `false`")
        );
    }

    #[test]
    fn json_values_must_be_scalars() {
        let ok: ParamValue = serde_json::from_str("1.5").unwrap();
        assert_eq!(ok, ParamValue::Float(1.5));
        let err = serde_json::from_str::<ParamValue>("[[1]]").unwrap_err().to_string();
        assert!(err.contains("a string, number or boolean"), "{err}");
        assert!(serde_json::from_str::<ParamValue>("18446744073709551615").is_err());
    }
}
