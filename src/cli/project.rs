//! What most verbs share: the options given around the verb, the pipeline and the cache.

use std::path::{Path, PathBuf};

use super::exit;
use crate::cache::Cache;
use crate::executors::Executors;
use crate::pipeline::{Override, Pipeline};

pub(super) fn load(file: &Path, set: &[Override]) -> Result<Pipeline, i32> {
    Pipeline::load(file, set).map_err(|d| {
        eprint!("{}", d.render());
        exit::INVALID
    })
}

pub(super) fn open_cache(cli_dir: &Option<PathBuf>, root: &Path) -> anyhow::Result<Cache> {
    let dir = cli_dir.clone().unwrap_or_else(|| root.join("cache"));
    Cache::open(&dir).map_err(|e| anyhow::anyhow!("opening the cache at {}: {e}", dir.display()))
}

/// The options given before or after the verb that a verb's function reads.
pub(super) struct Globals {
    pub config: Option<PathBuf>,
    pub cache_dir: Option<PathBuf>,
    pub output_dirs: Vec<PathBuf>,
    pub quiet: bool,
}

impl Globals {
    /// The executors of the settings file (`--config`); none without one, or when `local`. `Err`
    /// holds the exit code of a settings file already reported as wrong.
    pub fn executors(&self, local: bool) -> Result<Executors, i32> {
        match (&self.config, local) {
            (Some(config), false) => Executors::load(config).map_err(|e| {
                eprintln!("error: {e}");
                exit::INVALID
            }),
            _ => Ok(Executors::default()),
        }
    }
}
