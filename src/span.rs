//! Lengths of time as settings and pipelines write them: `30s`, `15m`, `6h`, `7d`.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A length of time written as a whole number and a unit: `30s`, `15m`, `6h` or `7d`, at most
/// [`Span::MAX_DAYS`] days, so that any span added to a date is still a date.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span(pub Duration);

impl Span {
    /// The longest span: ten years.
    pub const MAX_DAYS: u64 = 3650;
}

impl std::str::FromStr for Span {
    type Err = String;

    fn from_str(text: &str) -> Result<Span, String> {
        let bad = || {
            format!(
                "`{text}` is not a duration: write a whole number above 0 and a unit, e.g. `30s`, `15m`, `6h` or `7d`"
            )
        };
        let s = text.trim();
        let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
        let unit_s: u64 = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            _ => return Err(bad()),
        };
        let too_long = || format!("`{text}` is too long: at most {}d (ten years)", Span::MAX_DAYS);
        match number.parse::<u64>() {
            Ok(n) if n > 0 => match n.checked_mul(unit_s) {
                Some(secs) if secs <= Span::MAX_DAYS * 86_400 => Ok(Span(Duration::from_secs(secs))),
                _ => Err(too_long()),
            },
            Err(e) if *e.kind() == std::num::IntErrorKind::PosOverflow => Err(too_long()),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for Span {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.0.as_secs();
        match [(86_400, "d"), (3600, "h"), (60, "m")]
            .into_iter()
            .find(|(unit, _)| secs.is_multiple_of(*unit))
        {
            Some((unit, name)) => write!(f, "{}{name}", secs / unit),
            None => write!(f, "{secs}s"),
        }
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Span, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for Span {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_a_number_and_a_unit() {
        assert_eq!("30s".parse(), Ok(Span(Duration::from_secs(30))));
        assert_eq!("15m".parse(), Ok(Span(Duration::from_secs(900))));
        assert_eq!("7d".parse::<Span>().unwrap().to_string(), "7d");
        assert_eq!(Span(Duration::from_secs(90)).to_string(), "90s");
        for bad in ["", "6", "h", "0s", "1.5h", "-1h", "6 hours"] {
            assert!(bad.parse::<Span>().unwrap_err().contains("is not a duration"), "{bad}");
        }
        assert_eq!("3650d".parse::<Span>().unwrap().to_string(), "3650d");
        for long in ["3651d", "100000000d", "99999999999999999999d"] {
            assert!(long.parse::<Span>().unwrap_err().contains("at most 3650d"), "{long}");
        }
    }
}
