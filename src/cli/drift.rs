//! `sentiflow drift`: compares reviews with a bundle's reference statistics and prints the drift
//! report, optionally with a chart.

use std::path::Path;

use anyhow::Context as _;

use super::exit;
use super::predict::{load_bundle, read_reviews};
use crate::models::bert::Device;
use crate::models::bundle::{Prediction, LABELS};

pub(super) fn drift(model: &Path, input: &Path, chart: Option<&Path>) -> anyhow::Result<i32> {
    let bundle = match load_bundle(model, Device::Cpu) {
        Ok(b) => b,
        Err(code) => return Ok(code),
    };
    let Some(reference) = &bundle.drift else {
        eprintln!(
            "error: {}: no drift.json: the bundle was exported before drift monitoring; export it again",
            model.display()
        );
        return Ok(exit::INVALID);
    };
    let rows = match read_reviews(input) {
        Ok(r) => r,
        Err(code) => return Ok(code),
    };
    let texts: Vec<&str> = rows
        .iter()
        .map(|(_, r)| r["text"].as_str().unwrap_or_default())
        .collect();
    let mut labels: Vec<Option<&str>> = Vec::with_capacity(rows.len());
    for (n, r) in &rows {
        match &r["label"] {
            serde_json::Value::Null => labels.push(None),
            serde_json::Value::String(l) if LABELS.contains(&l.as_str()) => labels.push(Some(l.as_str())),
            other => {
                eprintln!(
                    "error: {}:{n}: `label` must be one of {LABELS:?}, got {other}",
                    input.display()
                );
                return Ok(exit::INVALID);
            }
        }
    }
    let samples = bundle.model.predict(&texts)?;
    let feedback: Vec<bool> = samples
        .iter()
        .zip(&labels)
        .filter_map(|(s, l)| l.map(|l| Prediction::from_score(s.score).label == l))
        .collect();
    let report = crate::drift::evaluate(reference, &samples, &feedback, &Default::default());
    if let Some(path) = chart {
        let score_labels: Vec<String> = (0..10).map(|i| format!(".{i}")).collect();
        let edges = &reference.length_edges;
        let length_labels: Vec<String> = (0..=edges.len())
            .map(|i| match i {
                0 => format!("<{:.0}", edges[0]),
                i if i == edges.len() => format!(">{:.0}", edges[i - 1]),
                i => format!("{:.0}", edges[i]),
            })
            .collect();
        let panel = |name: &str, stat: &crate::drift::Statistic, labels: Vec<String>| crate::plot::Panel {
            title: format!("{name}: PSI {:.3} ({})", stat.value, stat.status.as_str()),
            labels,
            reference: stat.reference.shares().to_vec(),
            current: stat.current.shares().to_vec(),
        };
        let png = crate::plot::distributions(
            &format!(
                "drift of {} {}: {}",
                bundle.manifest.name,
                bundle.manifest.version,
                report.status.as_str()
            ),
            &[
                panel("P(positive)", &report.statistics.score_psi, score_labels),
                panel("length (characters)", &report.statistics.length_psi, length_labels),
            ],
        );
        std::fs::write(path, png).with_context(|| path.display().to_string())?;
    }
    let mut report = serde_json::to_value(&report)?;
    report["model"] = bundle.manifest.name.clone().into();
    report["version"] = bundle.manifest.version.clone().into();
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(exit::OK)
}
