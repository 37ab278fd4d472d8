//! Object storage shared by machines: an S3-compatible bucket (`s3://BUCKET/PREFIX`, configured
//! by the standard `AWS_…` variables) or a directory (`file:///DIR`), with sync calls over
//! object_store's async ones. The remote stage cache and the registry's artifacts live in it.
//!
//! Both only ever add objects whose name says what they hold, so puts are create-only by default:
//! a put that finds the name taken has nothing left to do, and, a put being atomic, a reader sees
//! a whole object or none.

use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::TryStreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ClientConfigKey, ObjectStore, ObjectStoreExt, PutMode, PutOptions, RetryConfig};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum ObjectsError {
    #[error(
        "invalid {role} `{url}`: {reason}; give s3://BUCKET/PREFIX (the endpoint and credentials \
         come from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION) or \
         file:///DIR"
    )]
    Url {
        role: &'static str,
        url: String,
        reason: String,
    },
    #[error(
        "{role} {url}: `{key}`: {source}; check that the server answers at AWS_ENDPOINT_URL \
         (AWS_ALLOW_HTTP=true for plain http), that the bucket exists and that AWS_ACCESS_KEY_ID and \
         AWS_SECRET_ACCESS_KEY may read and write it"
    )]
    Store {
        role: &'static str,
        url: String,
        key: String,
        // Boxed: object_store's errors are large, and this one travels inside other errors.
        #[source]
        source: Box<object_store::Error>,
    },
    #[error("writing {} from the {role}: {source}", path.display())]
    Local {
        role: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Whether `location` is a URL (`s3://…`, `file://…`) rather than a path.
pub fn is_url(location: &str) -> bool {
    location
        .split_once("://")
        .is_some_and(|(scheme, _)| !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphanumeric()))
}

/// A prefix of a bucket or directory; `role` (what it is for) names it in errors.
pub struct Objects {
    role: &'static str,
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
}

impl Objects {
    pub fn open(url: &str, role: &'static str) -> Result<Objects, ObjectsError> {
        let bad = |reason: &str| ObjectsError::Url {
            role,
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let (store, prefix): (Arc<dyn ObjectStore>, &str) = if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("no bucket"));
            }
            let s3 = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                // A store that is down should cost a run or a promotion seconds, not the 3
                // minutes of retries object_store defaults to; a large model may take minutes.
                .with_retry(RetryConfig {
                    max_retries: 3,
                    retry_timeout: Duration::from_secs(30),
                    ..Default::default()
                })
                // Over the environment's other client settings (AWS_ALLOW_HTTP, …), not instead.
                .with_config(AmazonS3ConfigKey::Client(ClientConfigKey::Timeout), "10m")
                .build()
                .map_err(|e| bad(&e.to_string()))?;
            (Arc::new(s3), prefix)
        } else if let Some(dir) = url.strip_prefix("file://") {
            if !dir.starts_with('/') {
                return Err(bad("a file URL needs an absolute path, as in file:///srv/cache"));
            }
            std::fs::create_dir_all(dir).map_err(|e| bad(&e.to_string()))?;
            let local = LocalFileSystem::new_with_prefix(dir).map_err(|e| bad(&e.to_string()))?;
            (Arc::new(local), "")
        } else {
            return Err(bad("unknown scheme"));
        };
        let prefix = ObjectPath::parse(prefix.trim_matches('/')).map_err(|e| bad(&e.to_string()))?;
        Ok(Objects {
            role,
            url: url.trim_end_matches('/').to_string(),
            store,
            prefix,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URL of `rel`, which `rel` gets back from [`Objects::relative`].
    pub fn url_of(&self, rel: &str) -> String {
        format!("{}/{rel}", self.url)
    }

    /// The name under this prefix of `url`, if `url` is in it.
    pub fn relative<'a>(&self, url: &'a str) -> Option<&'a str> {
        url.strip_prefix(self.url.as_str())?.strip_prefix('/')
    }

    fn path(&self, rel: &str) -> ObjectPath {
        rel.split('/').fold(self.prefix.clone(), |p, part| p.join(part))
    }

    fn error(&self, rel: &str, source: object_store::Error) -> ObjectsError {
        ObjectsError::Store {
            role: self.role,
            url: self.url.clone(),
            key: rel.to_string(),
            source: Box::new(source),
        }
    }

    /// The object at `rel`, or `None` when there is none.
    pub fn get(&self, rel: &str) -> Result<Option<Vec<u8>>, ObjectsError> {
        block_on(async {
            match self.store.get(&self.path(rel)).await {
                Ok(got) => got.bytes().await.map(|b| Some(b.to_vec())),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        })
        .map_err(|e| self.error(rel, e))
    }

    /// Streams the object at `rel` into `dest` (the file at `path`), hashing it on the way: the
    /// SHA-256 of what was written, or `None` when there is no such object.
    pub fn download(&self, rel: &str, dest: &mut impl Write, path: &Path) -> Result<Option<String>, ObjectsError> {
        let mut sha = Sha256::new();
        block_on(async {
            let mut stream = match self.store.get(&self.path(rel)).await {
                Ok(got) => got.into_stream(),
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(self.error(rel, e)),
            };
            while let Some(chunk) = stream.try_next().await.map_err(|e| self.error(rel, e))? {
                sha.update(&chunk);
                dest.write_all(&chunk).map_err(|source| ObjectsError::Local {
                    role: self.role,
                    path: path.to_path_buf(),
                    source,
                })?;
            }
            Ok(Some(()))
        })
        .map(|found| found.map(|()| hex::encode(sha.finalize())))
    }

    /// Whether there is an object at `rel`.
    pub fn has(&self, rel: &str) -> Result<bool, ObjectsError> {
        block_on(async {
            match self.store.head(&self.path(rel)).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(e),
            }
        })
        .map_err(|e| self.error(rel, e))
    }

    /// Writes `bytes` to `rel`: with `replace`, over what is there; otherwise only when the name
    /// is free (what holds it, the name saying what the content is, is the same thing).
    pub fn put(&self, rel: &str, bytes: Vec<u8>, replace: bool) -> Result<(), ObjectsError> {
        let opts = PutOptions {
            mode: if replace { PutMode::Overwrite } else { PutMode::Create },
            ..Default::default()
        };
        match block_on(self.store.put_opts(&self.path(rel), bytes.into(), opts)) {
            Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => Ok(()),
            Err(e) => Err(self.error(rel, e)),
        }
    }

    /// The file names (last parts) of the objects under `rel`.
    pub fn list(&self, rel: &str) -> Result<Vec<String>, ObjectsError> {
        let metas: Vec<_> =
            block_on(self.store.list(Some(&self.path(rel))).try_collect()).map_err(|e| self.error(rel, e))?;
        Ok(metas
            .iter()
            .filter_map(|m| m.location.filename().map(str::to_string))
            .collect())
    }
}

/// Runs `f` to completion on the runtime that does all object storage I/O: one for the process,
/// started at its first use and never dropped (dropping a runtime inside the server's would
/// panic).
fn block_on<F: Future>(f: F) -> F::Output {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    let runtime = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("object-io")
            .enable_all()
            .build()
            .expect("the object storage runtime starts")
    });
    crate::blocking::off_runtime(|| runtime.block_on(f))
}
