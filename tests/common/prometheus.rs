//! `/metrics` as Prometheus users read it: Python's `prometheus_client` and `promtool check
//! metrics`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::Value;

use super::python;

/// Runs `program` with `input` on stdin; its exit status and its stdout and stderr together.
fn run(mut cmd: Command, input: &str) -> (std::process::ExitStatus, String, String) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status, text(&out.stdout), text(&out.stderr))
}

/// The families Python's text-format parser reads, as JSON: name, type and samples.
const PARSE: &str = r#"
import json, sys
try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:
    sys.exit("prometheus_client is missing: scripts/setup-python installs requirements-dev.txt")
families = [
    {"name": f.name, "type": f.type,
     "samples": [{"name": s.name, "labels": s.labels, "value": s.value} for s in f.samples]}
    for f in text_string_to_metric_families(sys.stdin.read())
]
json.dump(families, sys.stdout)
"#;

pub struct Family {
    pub kind: String,
    pub samples: Vec<Value>,
}

fn parse(text: &str) -> (Vec<String>, BTreeMap<String, Family>) {
    let mut cmd = Command::new(python());
    cmd.args(["-c", PARSE]);
    let (status, stdout, stderr) = run(cmd, text);
    assert!(status.success(), "the Python parser refused /metrics: {stderr}\n{text}");
    let parsed: Vec<Value> = serde_json::from_str(&stdout).unwrap();
    let names = parsed.iter().map(|f| f["name"].as_str().unwrap().to_string()).collect();
    let families = parsed
        .into_iter()
        .map(|f| {
            let name = f["name"].as_str().unwrap().to_string();
            let family = Family {
                kind: f["type"].as_str().unwrap().to_string(),
                samples: f["samples"].as_array().unwrap().clone(),
            };
            (name, family)
        })
        .collect();
    (names, families)
}

fn promtool() -> Command {
    let path = std::env::var_os("SENTIFLOW_PROMTOOL").unwrap_or_else(|| "promtool".into());
    let found = Command::new(&path)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "promtool not found (as {path:?}): install Prometheus' tools (Debian: apt-get install prometheus) \
         or set SENTIFLOW_PROMTOOL"
    );
    let mut cmd = Command::new(path);
    cmd.args(["check", "metrics"]);
    cmd
}

/// The families of an exposition, after asserting what every scrape must be: one family per
/// name, each typed and with samples, and nothing for `promtool check metrics` to say.
pub fn read_clean(text: &str) -> BTreeMap<String, Family> {
    let (names, families) = parse(text);
    let mut seen = BTreeSet::new();
    for name in &names {
        assert!(seen.insert(name), "{name} is more than one family in\n{text}");
    }
    for (name, family) in &families {
        // A sample away from its family's HELP and TYPE lines parses as an untyped family.
        assert!(
            !["unknown", "untyped"].contains(&family.kind.as_str()),
            "{name} has no type in\n{text}"
        );
        assert!(!family.samples.is_empty(), "{name} has no samples in\n{text}");
    }
    let (status, stdout, stderr) = run(promtool(), text);
    assert!(status.success(), "promtool: {stdout}{stderr}\n{text}");
    assert_eq!(format!("{stdout}{stderr}"), "", "promtool lints\n{text}");
    families
}
