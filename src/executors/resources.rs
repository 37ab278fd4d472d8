//! What a stage asks of the machine it runs on: `resources: {cpus, memory, gpus, timeout}`.

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

use crate::span::Span;

/// What a stage needs from the machine it runs on. Local runs ignore it; an executor asks its
/// engine for it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU cores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Memory: a whole number and a unit, `512M`, `4G` (binary units: M is MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>", regex(pattern = r"^[0-9]+[KMGT]$"))]
    pub memory: Option<Memory>,
    /// GPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<u32>,
    /// The longest the stage may run, e.g. `30m`, `2h`: the job is stopped after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>", regex(pattern = r"^[0-9]+[smhd]$"))]
    pub timeout: Option<Span>,
}

impl Resources {
    /// Why the request can be met by no machine, whatever the cluster.
    pub fn check(&self) -> Result<(), String> {
        if self.cpus == Some(0) {
            return Err("`resources.cpus` must be at least 1 (leave it out for the engine's default)".into());
        }
        Ok(())
    }

    /// `gpus: 1, cpus: 2`, for messages.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(c) = self.cpus {
            parts.push(format!("cpus: {c}"));
        }
        if let Some(m) = self.memory {
            parts.push(format!("memory: {m}"));
        }
        if let Some(g) = self.gpus {
            parts.push(format!("gpus: {g}"));
        }
        if let Some(t) = self.timeout {
            parts.push(format!("timeout: {t}"));
        }
        parts.join(", ")
    }
}

/// An amount of memory, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory(pub u64);

impl Memory {
    pub fn mebibytes(self) -> u64 {
        self.0.div_ceil(1 << 20)
    }
}

impl std::str::FromStr for Memory {
    type Err = String;

    fn from_str(text: &str) -> Result<Memory, String> {
        let bad =
            || format!("`{text}` is not an amount of memory: write a whole number and a unit, e.g. `512M` or `4G`");
        let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
        let shift = match unit {
            "K" => 10,
            "M" => 20,
            "G" => 30,
            "T" => 40,
            _ => return Err(bad()),
        };
        match number.parse::<u64>() {
            Ok(n) if n > 0 => n
                .checked_shl(shift)
                .filter(|b| b >> shift == n)
                .map(Memory)
                .ok_or_else(bad),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match [(40, "T"), (30, "G"), (20, "M"), (10, "K")]
            .into_iter()
            .find(|(shift, _)| self.0.trailing_zeros() >= *shift)
        {
            Some((shift, unit)) => write!(f, "{}{unit}", self.0 >> shift),
            None => write!(f, "{}", self.0),
        }
    }
}

impl<'de> Deserialize<'de> for Memory {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Memory, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for Memory {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_a_number_and_a_binary_unit() {
        assert_eq!("512M".parse(), Ok(Memory(512 << 20)));
        assert_eq!("4G".parse::<Memory>().unwrap().to_string(), "4G");
        assert_eq!(Memory(1536 << 20).to_string(), "1536M");
        assert_eq!("1G".parse::<Memory>().unwrap().mebibytes(), 1024);
        for bad in ["", "4", "G", "0M", "1.5G", "4GB", "-1G", "99999999999T"] {
            assert!(bad.parse::<Memory>().unwrap_err().contains("is not an amount"), "{bad}");
        }
    }
}
