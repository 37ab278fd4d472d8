//! `sentiflow validate`: checks pipeline files without running them; `sentiflow schema`: prints
//! the JSON Schema they follow.

use std::path::PathBuf;

use super::exit;
use crate::pipeline::{spec, Pipeline};

pub(super) fn validate(files: Vec<PathBuf>, json: bool) -> anyhow::Result<i32> {
    let mut code = exit::OK;
    for file in &files {
        let result = Pipeline::load(file, &[]);
        if result.is_err() {
            code = exit::INVALID;
        }
        match (result, json) {
            (Ok(p), false) => println!("ok: {} ({}, {} stages)", file.display(), p.name, p.stages.len()),
            (Err(d), false) => eprint!("{}", d.render()),
            (Ok(p), true) => println!(
                "{}",
                serde_json::json!({"file": file, "valid": true, "pipeline": p.name, "stages": p.stages.len(), "errors": []})
            ),
            (Err(d), true) => {
                let errors: Vec<_> = d
                    .items
                    .iter()
                    .map(|e| serde_json::json!({"line": e.pos.line, "col": e.pos.col, "message": e.message, "hint": e.hint}))
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({"file": file, "valid": false, "errors": errors})
                );
            }
        }
    }
    Ok(code)
}

pub(super) fn schema() -> anyhow::Result<i32> {
    print!("{}", spec::json_schema());
    Ok(exit::OK)
}
