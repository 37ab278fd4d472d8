//! The model registry: each exported bundle recorded once per version in the database, with its
//! own copy of the files (exports overwrite their directory; a registered version never
//! changes), and promoted to production only once its copy loads.

use std::path::{Path, PathBuf};

use crate::models::bert::Runtime;
use crate::models::bundle::{Bundle, BundleError};
use crate::store::{ModelRow, ModelStatus, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no model version `{0}`")]
    NotFound(String),
    #[error("model version `{version}` cannot be loaded: {source}")]
    Unloadable {
        version: String,
        #[source]
        source: BundleError,
    },
    #[error("{}: {source}", path.display())]
    Bundle {
        path: PathBuf,
        #[source]
        source: BundleError,
    },
    #[error("copying {} into the registry: {source}", path.display())]
    Copy {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The registry of one database: its copies live in `dir` (`--artifacts`).
pub struct Registry {
    dir: PathBuf,
    runtime: Runtime,
}

impl Registry {
    pub fn new(dir: PathBuf, runtime: Runtime) -> Registry {
        Registry { dir, runtime }
    }

    /// Records the bundle at `dir` (once per version) and returns its row.
    pub fn register(&self, store: &Store, dir: &Path, run_id: Option<&str>) -> Result<ModelRow, RegistryError> {
        let bundle = Bundle::load(dir, self.runtime).map_err(|source| RegistryError::Bundle {
            path: dir.to_path_buf(),
            source,
        })?;
        let m = &bundle.manifest;
        let copy = self.dir.join(&m.name).join(&m.version);
        if !copy.join("manifest.json").is_file() {
            copy_dir_atomic(dir, &copy).map_err(|source| RegistryError::Copy {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let path = std::path::absolute(&copy).map_err(|source| RegistryError::Copy {
            path: copy.clone(),
            source,
        })?;
        let row = ModelRow {
            version: m.version.clone(),
            name: m.name.clone(),
            kind: m.kind().into(),
            pipeline: m.pipeline.clone(),
            path: path.display().to_string(),
            params: m.parameters(),
            metrics: m.metrics.clone(),
            tuning: m.tuning(),
            accuracy: m.metrics["accuracy"].as_f64(),
            run_id: run_id.map(str::to_string),
            status: ModelStatus::Candidate,
            created_at: String::new(),
            promoted_at: None,
        };
        store.register_model(&row)?;
        Ok(store.model(&row.version)?.unwrap_or(row))
    }

    /// Loads the registered copy of a version.
    pub fn load(&self, row: &ModelRow) -> Result<Bundle, RegistryError> {
        Bundle::load(Path::new(&row.path), self.runtime).map_err(|source| RegistryError::Unloadable {
            version: row.version.clone(),
            source,
        })
    }

    /// Promotes `version` to production after loading it, so a broken bundle never replaces a
    /// working one; returns its row and the loaded bundle.
    pub fn promote(&self, store: &Store, version: &str) -> Result<(ModelRow, Bundle), RegistryError> {
        let row = store
            .model(version)?
            .ok_or_else(|| RegistryError::NotFound(version.to_string()))?;
        let bundle = self.load(&row)?;
        store.promote(version)?;
        let row = store.model(version)?.unwrap_or(row);
        Ok((row, bundle))
    }
}

/// Copies the files of `src` into a new directory `dest`, assembled beside it and renamed into place.
fn copy_dir_atomic(src: &Path, dest: &Path) -> std::io::Result<()> {
    let parent = dest.parent().expect("registry paths have a parent");
    std::fs::create_dir_all(parent)?;
    let staging = tempfile::Builder::new().prefix(".copy-").tempdir_in(parent)?;
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), staging.path().join(entry.file_name()))?;
        }
    }
    let staged = staging.keep();
    std::fs::rename(&staged, dest).or_else(|e| {
        // Another registration of the same version won the race: keep its copy.
        let _ = std::fs::remove_dir_all(&staged);
        if dest.join("manifest.json").is_file() {
            Ok(())
        } else {
            Err(e)
        }
    })
}
