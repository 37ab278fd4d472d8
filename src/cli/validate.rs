//! `sentiflow validate`: checks pipeline files without running them; `sentiflow schema`: prints
//! the JSON Schema they follow.

use std::path::PathBuf;

use super::exit;
use super::project::Globals;
use crate::pipeline::{spec, Pipeline};

/// Checks `files`; with a settings file (`--config`), also where their stages run (`runs_on`
/// against its `executors:`, and a remote cache for them).
pub(super) fn validate(global: &Globals, files: Vec<PathBuf>, json: bool) -> anyhow::Result<i32> {
    let executors = match global.executors(false) {
        Ok(e) => e,
        Err(code) => return Ok(code),
    };
    // The settings file's `remote_cache:` arrives as this variable, like every flat setting.
    let remote_cache = std::env::var_os("SENTIFLOW_REMOTE_CACHE").is_some_and(|v| !v.is_empty());
    let mut code = exit::OK;
    for file in &files {
        let result = Pipeline::load(file, &[]).and_then(|p| p.check_placement(&executors, remote_cache).map(|()| p));
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
