//! Executors: existing distributed engines (Ray, Slurm) that run a stage on another machine.
//!
//! A stage says what it needs (`resources:`) and where it runs (`runs_on: NAME`); the settings
//! file says what each `NAME` is (`executors:`), so a pipeline stays the same on a laptop and on
//! a cluster. The engine gets one command to run, `sentiflow stage exec KEY`, which takes the
//! stage's description and inputs from the remote cache and puts its outputs back there: the
//! remote cache is the only data path, and the engine's own scheduler is the only scheduler.

mod job;
pub mod ray;
mod resources;
pub mod slurm;

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::pipeline::yaml::{self, Pos};
pub use job::{forwarded_env, ExecutorError, Job, Placement, Watch, Watcher};
pub use resources::{Memory, Resources};

/// The config file's key that holds the executors.
pub const SECTION: &str = "executors";

/// One executor of the settings file: an engine and how to reach it.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "engine", rename_all = "lowercase", deny_unknown_fields)]
pub enum ExecutorSpec {
    /// A Ray cluster, through its Jobs REST API.
    Ray(ray::RaySpec),
    /// A Slurm cluster, through `sbatch`, `squeue`, `scontrol` and `scancel` on this machine.
    Slurm(slurm::SlurmSpec),
}

/// The executors of the settings file, by name.
#[derive(Debug, Clone, Default)]
pub struct Executors(pub BTreeMap<String, ExecutorSpec>);

impl Executors {
    /// The `executors:` section of the settings file at `path` (none when it has no such section).
    pub fn load(path: &Path) -> Result<Executors, ExecutorError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ExecutorError::Read {
            path: file.clone(),
            source,
        })?;
        let at = |pos: Pos, message: String| ExecutorError::Settings {
            file: file.clone(),
            line: pos.line,
            col: pos.col,
            message,
        };
        let doc = yaml::parse(&text).map_err(|e| at(e.pos, e.message))?;
        let section: Option<BTreeMap<String, ExecutorSpec>> =
            yaml::section(&doc, SECTION).map_err(|(pos, message)| at(pos, message))?;
        Ok(Executors(section.unwrap_or_default()))
    }

    pub fn get(&self, name: &str) -> Option<&ExecutorSpec> {
        self.0.get(name)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }
}

impl ExecutorSpec {
    /// Runs `job` on this engine until it ends: `Ok` with where it ran once the job succeeded
    /// (its result is then in the remote cache), an error naming what went wrong otherwise.
    pub fn run(&self, job: &Job, watch: &dyn Watch) -> Result<Placement, ExecutorError> {
        match self {
            ExecutorSpec::Ray(spec) => ray::run(spec, job, watch),
            ExecutorSpec::Slurm(spec) => slurm::run(spec, job, watch),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executors_are_typed_and_a_wrong_key_is_located() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("settings.yaml");
        std::fs::write(
            &file,
            "remote_cache: s3://team/cache\nexecutors:\n  gpu: {engine: ray, address: 'http://head:8265'}\n  hpc:\n    engine: slurm\n    partition: gpu\n",
        )
        .unwrap();
        let e = Executors::load(&file).unwrap();
        assert_eq!(e.names().collect::<Vec<_>>(), ["gpu", "hpc"]);
        assert!(matches!(e.get("hpc"), Some(ExecutorSpec::Slurm(s)) if s.partition.as_deref() == Some("gpu")));

        std::fs::write(&file, "executors:\n  gpu: {engine: ray, adress: x}\n").unwrap();
        let err = Executors::load(&file).unwrap_err().to_string();
        assert!(err.contains("settings.yaml:2:") && err.contains("adress"), "{err}");
        std::fs::write(&file, "executors:\n  gpu: {engine: kubernetes}\n").unwrap();
        let err = Executors::load(&file).unwrap_err().to_string();
        assert!(err.contains("settings.yaml:2:") && err.contains("kubernetes"), "{err}");
    }
}
