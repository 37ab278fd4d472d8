//! A stage sent to another machine: what the client stores in the remote cache under the
//! stage's key for `sentiflow stage exec KEY` to run. Its inputs travel as artifacts, whose
//! objects the client puts in the remote cache first.

use serde::{Deserialize, Serialize};

use crate::cache::{sha256_hex, Artifact};
use crate::stages::StageKind;

#[derive(Debug, Serialize, Deserialize)]
pub struct Task {
    pub pipeline: String,
    pub stage: String,
    /// Its kind and parameters, as the pipeline file resolved them.
    pub kind: StageKind,
    /// The finished stages it needs, with their outputs.
    pub needs: Vec<Needed>,
    /// Its declared dependencies (scripts, data files), inside the project.
    pub deps: Vec<Artifact>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Needed {
    pub name: String,
    pub kind: String,
    pub outs: Vec<Artifact>,
}

/// The key under which trial `i` of the search whose key is `key` keeps its result.
pub fn trial_key(key: &str, i: usize) -> String {
    sha256_hex(format!("{key}/trial/{i}").as_bytes())
}
