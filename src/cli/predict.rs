//! `sentiflow predict`: scores reviews with a model bundle, and the bundle and review loading
//! that `drift` shares.

use std::path::Path;

use super::exit;
use crate::models::bert::{BertError, Device, Runtime};
use crate::models::bundle::{Bundle, BundleError, Prediction};

/// Loads the bundle at `model`, or prints why not and gives the exit code: a missing ONNX Runtime
/// is the machine's problem (1), anything else the bundle's (2).
pub(super) fn load_bundle(model: &Path, device: Device) -> Result<Bundle, i32> {
    Bundle::load(model, Runtime { threads: 0, device }).map_err(|e| {
        eprintln!("error: {e}");
        match e {
            BundleError::Bert(
                BertError::RuntimeMissing { .. } | BertError::RuntimeBroken { .. } | BertError::Device { .. },
            ) => exit::FAILED,
            _ => exit::INVALID,
        }
    })
}

/// The non-empty JSON Lines of `path` (`-`: standard input), each an object with a string
/// `text`, with their line numbers; an error names the file and line.
pub(super) fn read_reviews(path: &Path) -> Result<Vec<(usize, serde_json::Value)>, i32> {
    use std::io::BufRead;
    let reader: Box<dyn BufRead> = if path == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        let file = std::fs::File::open(path).map_err(|e| {
            eprintln!("error: {}: {e}", path.display());
            exit::INVALID
        })?;
        Box::new(std::io::BufReader::new(file))
    };
    let mut rows = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let at = format!("{}:{}", path.display(), n + 1);
        let line = line.map_err(|e| {
            eprintln!("error: {at}: {e}");
            exit::INVALID
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let row: serde_json::Value = serde_json::from_str(&line).map_err(|e| {
            eprintln!("error: {at}: invalid JSON: {e}");
            exit::INVALID
        })?;
        if !row["text"].is_string() {
            eprintln!("error: {at}: missing string field `text`");
            return Err(exit::INVALID);
        }
        rows.push((n + 1, row));
    }
    Ok(rows)
}

/// Reviews scored together: enough to share among every core, few enough that answers start
/// coming out at once.
const CHUNK: usize = 4096;

pub(super) fn predict(model: &Path, input: Option<&Path>, texts: &[String], device: Device) -> anyhow::Result<i32> {
    use std::io::Write;
    let bundle = match load_bundle(model, device) {
        Ok(b) => b,
        Err(code) => return Ok(code),
    };
    let mut rows: Vec<(serde_json::Value, String)> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| ((i + 1).into(), t.clone()))
        .collect();
    if let Some(path) = input {
        let lines = match read_reviews(path) {
            Ok(l) => l,
            Err(code) => return Ok(code),
        };
        for (n, row) in lines {
            let id = if row["id"].is_null() {
                n.into()
            } else {
                row["id"].clone()
            };
            rows.push((id, row["text"].as_str().unwrap_or_default().to_string()));
        }
    }
    if rows.is_empty() {
        eprintln!("error: nothing to score: give texts or --input FILE.jsonl");
        return Ok(exit::INVALID);
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    // In chunks, so that the first answers come out while the rest are scored, each on every core.
    for chunk in rows.chunks(CHUNK) {
        let texts: Vec<&str> = chunk.iter().map(|(_, t)| t.as_str()).collect();
        let predictions = bundle.model.predict_many(&texts)?;
        for ((id, _), s) in chunk.iter().zip(predictions) {
            let p = Prediction::from_score(s.score);
            let line = serde_json::json!({"id": id, "label": p.label, "score": p.score});
            writeln!(out, "{line}")?;
        }
    }
    out.flush()?;
    Ok(exit::OK)
}
