//! A remote copy of the cache in object storage, shared by machines: an S3-compatible bucket
//! (`s3://BUCKET/PREFIX`, configured by the standard `AWS_…` variables) or a directory
//! (`file:///DIR`). It has the local cache's layout under its prefix: `objects/ab/<sha256>` and
//! `runs/ab/<key>.json`.
//!
//! Everything in it is named by content (objects) or by everything that determined the content
//! (run entries), so an entry never changes once written: puts are create-only, and a put that
//! finds the name taken has nothing left to do. That makes two machines pushing one entry at once
//! harmless, and, as a put is atomic, a reader sees a whole object or none.

use std::collections::HashSet;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::TryStreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ClientConfigKey, ObjectStore, ObjectStoreExt, PutMode, PutOptions, RetryConfig};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error(
        "invalid remote cache `{url}`: {reason}; give s3://BUCKET/PREFIX (the endpoint and \
         credentials come from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION) \
         or file:///DIR"
    )]
    Url { url: String, reason: String },
    #[error(
        "remote cache {url}: `{key}`: {source}; check that the server answers at AWS_ENDPOINT_URL \
         (AWS_ALLOW_HTTP=true for plain http), that the bucket exists and that AWS_ACCESS_KEY_ID and \
         AWS_SECRET_ACCESS_KEY may read and write it"
    )]
    Store {
        url: String,
        key: String,
        // Boxed: object_store's errors are large, and this one travels inside `CacheError`.
        #[source]
        source: Box<object_store::Error>,
    },
    #[error("remote cache {url}: corrupt `{key}`: {reason}")]
    Corrupt { url: String, key: String, reason: String },
    #[error("writing {path} from the remote cache: {source}")]
    Local {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A remote cache, with sync methods over object_store's async ones, run on a small runtime of
/// its own.
pub struct Remote {
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    runtime: tokio::runtime::Runtime,
    /// Names this process found corrupt: its next put of them replaces them instead of keeping
    /// the damaged copy forever.
    corrupt: Mutex<HashSet<String>>,
}

/// What a push or pull copied.
#[derive(Debug, Default, Clone, Copy)]
pub struct Transfer {
    pub runs: usize,
    pub objects: usize,
    pub bytes: u64,
}

impl Remote {
    pub fn open(url: &str) -> Result<Remote, RemoteError> {
        let bad = |reason: &str| RemoteError::Url {
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
                // A remote that is down should cost a run seconds, not the 3 minutes of
                // retries object_store defaults to; a large model may take minutes to send.
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
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("remote-cache")
            .enable_all()
            .build()
            .map_err(|e| bad(&format!("starting its I/O runtime: {e}")))?;
        Ok(Remote {
            url: url.to_string(),
            store,
            prefix,
            runtime,
            corrupt: Mutex::new(HashSet::new()),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn path(&self, rel: &str) -> ObjectPath {
        rel.split('/').fold(self.prefix.clone(), |p, part| p.join(part))
    }

    fn store_error(&self, rel: &str, source: object_store::Error) -> RemoteError {
        RemoteError::Store {
            url: self.url.clone(),
            key: rel.to_string(),
            source: Box::new(source),
        }
    }

    /// Remembers that `rel` cannot be trusted, so a later put replaces it.
    pub(super) fn distrust(&self, rel: &str) {
        self.corrupt.lock().unwrap().insert(rel.to_string());
    }

    /// Distrusts `rel` and gives the error that says why.
    pub(super) fn corrupt(&self, rel: &str, reason: String) -> RemoteError {
        self.distrust(rel);
        RemoteError::Corrupt {
            url: self.url.clone(),
            key: rel.to_string(),
            reason,
        }
    }

    /// The object at `rel`, or `None` when there is none.
    pub(super) fn get(&self, rel: &str) -> Result<Option<Vec<u8>>, RemoteError> {
        self.runtime
            .block_on(async {
                match self.store.get(&self.path(rel)).await {
                    Ok(got) => got.bytes().await.map(|b| Some(b.to_vec())),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .map_err(|e| self.store_error(rel, e))
    }

    /// Streams the object at `rel` into `dest`, checking on the way that its content hashes to
    /// `hash`: `false` when there is no such object.
    pub(super) fn download(
        &self,
        rel: &str,
        hash: &str,
        dest: &mut tempfile::NamedTempFile,
    ) -> Result<bool, RemoteError> {
        let mut sha = Sha256::new();
        let found = self.runtime.block_on(async {
            let mut stream = match self.store.get(&self.path(rel)).await {
                Ok(got) => got.into_stream(),
                Err(object_store::Error::NotFound { .. }) => return Ok(false),
                Err(e) => return Err(self.store_error(rel, e)),
            };
            while let Some(chunk) = stream.try_next().await.map_err(|e| self.store_error(rel, e))? {
                sha.update(&chunk);
                dest.write_all(&chunk).map_err(|e| RemoteError::Local {
                    path: dest.path().to_path_buf(),
                    source: e,
                })?;
            }
            Ok(true)
        })?;
        let got = hex::encode(sha.finalize());
        if found && got != hash {
            return Err(self.corrupt(rel, format!("its content hashes to {got}")));
        }
        Ok(found)
    }

    /// Whether `rel` exists and can be trusted (this process did not find it corrupt).
    pub(super) fn has(&self, rel: &str) -> Result<bool, RemoteError> {
        if self.corrupt.lock().unwrap().contains(rel) {
            return Ok(false);
        }
        self.runtime
            .block_on(async {
                match self.store.head(&self.path(rel)).await {
                    Ok(_) => Ok(true),
                    Err(object_store::Error::NotFound { .. }) => Ok(false),
                    Err(e) => Err(e),
                }
            })
            .map_err(|e| self.store_error(rel, e))
    }

    /// Writes `bytes` to `rel` unless something is there already, which, the name saying what
    /// the content is, is the same thing. Only a copy this process found corrupt is replaced.
    pub(super) fn put(&self, rel: &str, bytes: Vec<u8>) -> Result<(), RemoteError> {
        let replace = self.corrupt.lock().unwrap().contains(rel);
        let mode = if replace { PutMode::Overwrite } else { PutMode::Create };
        let opts = PutOptions {
            mode,
            ..Default::default()
        };
        let result = self
            .runtime
            .block_on(self.store.put_opts(&self.path(rel), bytes.into(), opts));
        match result {
            Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => {
                if replace {
                    self.corrupt.lock().unwrap().remove(rel);
                }
                Ok(())
            }
            Err(e) => Err(self.store_error(rel, e)),
        }
    }

    /// The keys of every run entry in the remote.
    pub fn run_keys(&self) -> Result<Vec<String>, RemoteError> {
        let runs = self.path("runs");
        let metas: Vec<_> = self
            .runtime
            .block_on(self.store.list(Some(&runs)).try_collect())
            .map_err(|e| self.store_error("runs", e))?;
        Ok(metas
            .iter()
            .filter_map(|m| m.location.filename()?.strip_suffix(".json").map(str::to_string))
            .filter(|k| super::is_hash(k))
            .collect())
    }
}
