//! The model registry: each exported bundle recorded once per version in the database, with its
//! own copy of the files (exports overwrite their directory; a registered version never
//! changes), and promoted to production only once its copy loads.
//!
//! The copies live in a directory (`--artifacts DIR`, which replicas share as a volume), or in
//! object storage (`--artifacts s3://…`): there a version is `NAME/VERSION/<file>`, its files put
//! before its manifest, so a version whose manifest is there is complete. A replica downloads a
//! version once into its artifact cache, checking every file against the manifest's SHA-256.
//! Every load checks the local copy's files the same way, and a promotion checks the stored
//! copy too: bytes changed on disk or in the bucket are refused, never served.

use std::path::{Path, PathBuf};

use crate::cache::{hash_reader, sha256_hex};
use crate::models::bert::Runtime;
use crate::models::bundle::{version_of, Bundle, BundleError, Manifest};
use crate::objects::{is_url, Objects, ObjectsError};
use crate::store::{ModelRow, ModelStatus, Promotion, PromotionReason, Store, StoreError};

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
    #[error("model version `{version}`: {source}")]
    Storage {
        version: String,
        #[source]
        source: ObjectsError,
    },
    #[error("model version `{0}` is in production already: nothing changed")]
    AlreadyProduction(String),
    #[error("model version `{version}` ({url}) is refused: {reason}")]
    Refused {
        version: String,
        url: String,
        reason: String,
    },
}

/// The registry of one database: its copies live in `dir` (`--artifacts DIR`), or in `objects`
/// with `dir` as the cache of the versions downloaded from there.
pub struct Registry {
    dir: PathBuf,
    objects: Option<Objects>,
    runtime: Runtime,
}

impl Registry {
    pub fn new(dir: PathBuf, objects: Option<Objects>, runtime: Runtime) -> Registry {
        Registry { dir, objects, runtime }
    }

    /// Records the bundle at `dir` (once per version) and returns its row.
    pub fn register(&self, store: &Store, dir: &Path, run_id: Option<&str>) -> Result<ModelRow, RegistryError> {
        let bundle = Bundle::load(dir, self.runtime).map_err(|source| RegistryError::Bundle {
            path: dir.to_path_buf(),
            source,
        })?;
        let m = &bundle.manifest;
        if let Some(objects) = &self.objects {
            upload(objects, dir, m)?;
        }
        let copy = self.dir.join(&m.name).join(&m.version);
        if !copy.join("manifest.json").is_file() {
            copy_dir_atomic(dir, &copy).map_err(|source| RegistryError::Copy {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let path = match &self.objects {
            Some(objects) => objects.url_of(&format!("{}/{}", m.name, m.version)),
            None => std::path::absolute(&copy)
                .map_err(|source| RegistryError::Copy {
                    path: copy.clone(),
                    source,
                })?
                .display()
                .to_string(),
        };
        let row = ModelRow {
            version: m.version.clone(),
            name: m.name.clone(),
            kind: m.kind().into(),
            pipeline: m.pipeline.clone(),
            path,
            params: Some(m.parameters()),
            metrics: m.figures(),
            tuning: m.tuning(),
            accuracy: m.metrics["accuracy"].as_f64(),
            run_id: run_id.map(str::to_string),
            status: ModelStatus::Candidate,
            created_at: String::new(),
            promoted_at: None,
            reason: None,
            canary_percent: 0,
        };
        store.register_model(&row)?;
        Ok(store.model(&row.version)?.unwrap_or(row))
    }

    /// Loads the registered copy of a version, downloading it first when it is in object storage
    /// and not yet in the cache.
    pub fn load(&self, row: &ModelRow) -> Result<Bundle, RegistryError> {
        let dir = if is_url(&row.path) {
            self.downloaded(row)?
        } else {
            PathBuf::from(&row.path)
        };
        check_copy(&dir, row)?;
        Bundle::load(&dir, self.runtime).map_err(|source| RegistryError::Unloadable {
            version: row.version.clone(),
            source,
        })
    }

    /// Promotes `version` to production for `reason` after loading it, so a broken bundle never
    /// replaces a working one; returns its row and the loaded bundle.
    pub fn promote(
        &self,
        store: &Store,
        version: &str,
        reason: &PromotionReason,
    ) -> Result<(ModelRow, Bundle), RegistryError> {
        let row = store
            .model(version)?
            .ok_or_else(|| RegistryError::NotFound(version.to_string()))?;
        if row.status == ModelStatus::Production {
            return Err(RegistryError::AlreadyProduction(row.version));
        }
        self.check_stored(&row)?;
        let bundle = self.load(&row)?;
        match store.promote(version, reason)? {
            Promotion::Promoted => {}
            Promotion::AlreadyProduction => return Err(RegistryError::AlreadyProduction(row.version)),
            Promotion::NotFound => return Err(RegistryError::NotFound(row.version)),
        }
        let row = store.model(version)?.unwrap_or(row);
        Ok((row, bundle))
    }

    /// Checks the copy in object storage of a version kept there, as a replica without it in its
    /// cache would download it: a replica must not promote what the others cannot load.
    fn check_stored(&self, row: &ModelRow) -> Result<(), RegistryError> {
        let (Some(objects), true) = (&self.objects, is_url(&row.path)) else {
            return Ok(());
        };
        let rel = objects.relative(&row.path).ok_or_else(|| RegistryError::Refused {
            version: row.version.clone(),
            url: row.path.clone(),
            reason: format!("this server's artifacts are in {}", objects.url()),
        })?;
        let scratch = tempfile::Builder::new()
            .prefix(".check-")
            .tempdir_in(&self.dir)
            .or_else(|_| tempfile::tempdir())
            .map_err(|source| RegistryError::Copy {
                path: self.dir.clone(),
                source,
            })?;
        download(objects, rel, row, &scratch.path().join("copy"))?;
        Ok(())
    }

    /// The cached copy of the version at the object storage URL `row.path`, downloaded and
    /// checked first if there is none.
    fn downloaded(&self, row: &ModelRow) -> Result<PathBuf, RegistryError> {
        let refused = |reason: String| RegistryError::Refused {
            version: row.version.clone(),
            url: row.path.clone(),
            reason,
        };
        let objects = self.objects.as_ref().ok_or_else(|| {
            refused(format!(
                "it is in object storage and this server keeps its artifacts in {}: give it \
                 --artifacts with the URL the version was registered under",
                self.dir.display()
            ))
        })?;
        let rel = objects.relative(&row.path).ok_or_else(|| {
            refused(format!(
                "this server's artifacts are in {}: give it --artifacts with the URL the version \
                 was registered under",
                objects.url()
            ))
        })?;
        if !plain_name(&row.name) || !plain_name(&row.version) {
            return Err(refused("its name or version is not a plain file name".into()));
        }
        let dest = self.dir.join(&row.name).join(&row.version);
        if !dest.join("manifest.json").is_file() {
            let (files, bytes) = download(objects, rel, row, &dest)?;
            tracing::info!(
                "model {} version {} downloaded from {} into {} ({files} files, {bytes} bytes, checked)",
                row.name,
                row.version,
                row.path,
                dest.display()
            );
        }
        Ok(dest)
    }
}

/// Checks the local copy of `row` at `dir`: its manifest names the version, and every file it
/// lists has the SHA-256 it gives.
fn check_copy(dir: &Path, row: &ModelRow) -> Result<(), RegistryError> {
    let refused = |reason: String| RegistryError::Refused {
        version: row.version.clone(),
        url: dir.display().to_string(),
        reason,
    };
    let m = Manifest::read(dir).map_err(|e| refused(e.to_string()))?;
    let listed = version_of(&m.files);
    if m.version != row.version || listed != row.version {
        return Err(refused(format!(
            "its manifest says version {} and lists the files of version {listed}: the copy was \
             changed; delete it and register the bundle again",
            m.version
        )));
    }
    for (file, expected) in &m.files {
        if !plain_name(file) {
            return Err(refused(format!("its manifest lists `{file}`, not a plain file name")));
        }
        let path = dir.join(file);
        let found = std::fs::File::open(&path)
            .and_then(|f| hash_reader(f, None))
            .map_err(|source| RegistryError::Copy {
                path: path.clone(),
                source,
            })?;
        if found != *expected {
            return Err(refused(format!(
                "`{file}` has SHA-256 {found} where its manifest says {expected}: the copy was changed or \
                 damaged; delete it and register the bundle again"
            )));
        }
    }
    Ok(())
}

/// Puts the files of the bundle at `dir` into `NAME/VERSION/` of `objects`, unless its manifest
/// is there: the files first, each checked against the manifest, then the manifest.
fn upload(objects: &Objects, dir: &Path, m: &Manifest) -> Result<(), RegistryError> {
    let rel = format!("{}/{}", m.name, m.version);
    let storage = |source| RegistryError::Storage {
        version: m.version.clone(),
        source,
    };
    let manifest = format!("{rel}/manifest.json");
    if objects.has(&manifest).map_err(storage)? {
        return Ok(());
    }
    let read = |path: PathBuf| std::fs::read(&path).map_err(|source| RegistryError::Copy { path, source });
    for (file, expected) in &m.files {
        let path = dir.join(file);
        let bytes = read(path.clone())?;
        // Never spread a bundle whose files changed since it was exported.
        if sha256_hex(&bytes) != *expected {
            return Err(RegistryError::Bundle {
                source: BundleError::Invalid {
                    path: path.display().to_string(),
                    reason: format!("its content no longer matches its manifest's SHA-256 {expected}; export it again"),
                },
                path,
            });
        }
        objects.put(&format!("{rel}/{file}"), bytes, false).map_err(storage)?;
    }
    objects
        .put(&manifest, read(dir.join("manifest.json"))?, false)
        .map_err(storage)
}

/// Downloads the version of `row` from `rel` of `objects` into a directory beside `dest`,
/// checks every file against the manifest, and renames it into place: the files and bytes it got.
fn download(objects: &Objects, rel: &str, row: &ModelRow, dest: &Path) -> Result<(usize, u64), RegistryError> {
    let local = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RegistryError::Copy { path, source }
    };
    let storage = |source| RegistryError::Storage {
        version: row.version.clone(),
        source,
    };
    let refused = |reason: String| RegistryError::Refused {
        version: row.version.clone(),
        url: row.path.clone(),
        reason,
    };
    let parent = dest.parent().expect("cache paths have a parent");
    std::fs::create_dir_all(parent).map_err(local(parent))?;
    let staging = tempfile::Builder::new()
        .prefix(".download-")
        .tempdir_in(parent)
        .map_err(local(parent))?;
    let manifest = objects
        .get(&format!("{rel}/manifest.json"))
        .map_err(storage)?
        .ok_or_else(|| {
            refused(
                "it has no manifest.json: its registration did not finish, or this is not the \
                 bucket it was registered in"
                    .into(),
            )
        })?;
    let path = staging.path().join("manifest.json");
    std::fs::write(&path, &manifest).map_err(local(&path))?;
    let m = Manifest::read(staging.path()).map_err(|e| refused(e.to_string()))?;
    let listed = version_of(&m.files);
    if m.version != row.version || listed != row.version {
        return Err(refused(format!(
            "its manifest says version {} and lists the files of version {listed}: the stored copy \
             was changed; delete it and register the bundle again",
            m.version
        )));
    }
    let mut bytes = manifest.len() as u64;
    for (file, expected) in &m.files {
        if !plain_name(file) || file == "manifest.json" {
            return Err(refused(format!("its manifest lists `{file}`, not a plain file name")));
        }
        let path = staging.path().join(file);
        let mut out = std::fs::File::create(&path).map_err(local(&path))?;
        let found = objects
            .download(&format!("{rel}/{file}"), &mut out, &path)
            .map_err(storage)?
            .ok_or_else(|| refused(format!("`{file}` is missing")))?;
        if found != *expected {
            return Err(refused(format!(
                "`{file}` has SHA-256 {found} where its manifest says {expected}: the stored copy \
                 was changed or damaged; delete it and register the bundle again"
            )));
        }
        bytes += out.metadata().map_err(local(&path))?.len();
    }
    publish(staging, dest).map_err(local(dest))?;
    Ok((m.files.len() + 1, bytes))
}

/// Whether `name` is one component of a path, not a way out of the directory it is joined to.
fn plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\', '\0'])
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
    publish(staging, dest)
}

/// Renames the assembled copy of a version in `staging` to `dest`. When another registration or
/// download of the same version got there first, its copy (the same files) is kept.
fn publish(staging: tempfile::TempDir, dest: &Path) -> std::io::Result<()> {
    let staged = staging.keep();
    std::fs::rename(&staged, dest).or_else(|e| {
        let _ = std::fs::remove_dir_all(&staged);
        if dest.join("manifest.json").is_file() {
            Ok(())
        } else {
            Err(e)
        }
    })
}
