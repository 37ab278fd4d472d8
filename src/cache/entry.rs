//! What the cache stores: a stage run's entry, and the artifacts (files, directories) it produced.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Numbers a stage run reports (accuracy, row counts, …), kept in its run entry and the lock file.
pub type Metrics = Map<String, Value>;

/// The hash of a file, or of a directory as the sorted list of its files' hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// Path relative to the project root, with `/` separators.
    pub path: String,
    pub hash: String,
    pub size: u64,
    /// For a directory: each file's path relative to it, and its hash and size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<BTreeMap<String, FileEntry>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub hash: String,
    pub size: u64,
}

/// What one stage run produced, stored under its key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunEntry {
    pub stage: String,
    pub kind: String,
    pub outs: Vec<Artifact>,
    pub metrics: Metrics,
    pub duration_ms: u64,
}

impl RunEntry {
    /// The hash and size of every object its outputs are made of.
    pub fn objects(&self) -> impl Iterator<Item = (&str, u64)> {
        objects(&self.outs)
    }

    /// Why an entry from elsewhere (a remote) must not be restored: object names that are not
    /// hashes, or output paths that could lead out of the project.
    pub fn check_foreign(&self) -> Result<(), String> {
        if let Some((bad, _)) = self.objects().find(|(h, _)| !is_hash(h)) {
            return Err(format!("object name `{bad}` is not a SHA-256"));
        }
        let escapes = |p: &str| p.is_empty() || p.starts_with('/') || p.split('/').any(|c| c == "..");
        let names = self.outs.iter().flat_map(|out| {
            std::iter::once(out.path.as_str()).chain(out.files.iter().flat_map(|f| f.keys().map(String::as_str)))
        });
        for name in names {
            if escapes(name) {
                return Err(format!("output path `{name}` is not inside the project"));
            }
        }
        Ok(())
    }
}

/// The hash and size of every object that `outs` are made of.
pub fn objects(outs: &[Artifact]) -> impl Iterator<Item = (&str, u64)> {
    outs.iter().flat_map(|out| match &out.files {
        Some(files) => files.values().map(|f| (f.hash.as_str(), f.size)).collect::<Vec<_>>(),
        None => vec![(out.hash.as_str(), out.size)],
    })
}

/// Whether `name` is a SHA-256 in hex, as object names and cache keys are.
pub fn is_hash(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}
