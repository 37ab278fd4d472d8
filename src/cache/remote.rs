//! A remote copy of the cache in [object storage](crate::objects), shared by machines. It has
//! the local cache's layout under its prefix: `objects/ab/<sha256>` and `runs/ab/<key>.json`.
//!
//! Everything in it is named by content (objects) or by everything that determined the content
//! (run entries), so an entry never changes once written: puts are create-only, and a put that
//! finds the name taken has nothing left to do. That makes two machines pushing one entry at once
//! harmless, and, as a put is atomic, a reader sees a whole object or none.

use std::collections::HashSet;
use std::sync::Mutex;

use crate::objects::{Objects, ObjectsError};

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error(transparent)]
    Objects(#[from] ObjectsError),
    #[error("remote cache {url}: corrupt `{key}`: {reason}")]
    Corrupt { url: String, key: String, reason: String },
}

/// A remote cache.
pub struct Remote {
    objects: Objects,
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
        Ok(Remote {
            objects: Objects::open(url, "remote cache")?,
            corrupt: Mutex::new(HashSet::new()),
        })
    }

    pub fn url(&self) -> &str {
        self.objects.url()
    }

    /// Remembers that `rel` cannot be trusted, so a later put replaces it.
    pub(super) fn distrust(&self, rel: &str) {
        self.corrupt.lock().unwrap().insert(rel.to_string());
    }

    /// Distrusts `rel` and gives the error that says why.
    pub(super) fn corrupt(&self, rel: &str, reason: String) -> RemoteError {
        self.distrust(rel);
        RemoteError::Corrupt {
            url: self.url().to_string(),
            key: rel.to_string(),
            reason,
        }
    }

    /// The object at `rel`, or `None` when there is none.
    pub(super) fn get(&self, rel: &str) -> Result<Option<Vec<u8>>, RemoteError> {
        Ok(self.objects.get(rel)?)
    }

    /// Streams the object at `rel` into `dest`, checking on the way that its content hashes to
    /// `hash`: `false` when there is no such object.
    pub(super) fn download(
        &self,
        rel: &str,
        hash: &str,
        dest: &mut tempfile::NamedTempFile,
    ) -> Result<bool, RemoteError> {
        let path = dest.path().to_path_buf();
        match self.objects.download(rel, dest, &path)? {
            None => Ok(false),
            Some(got) if got == hash => Ok(true),
            Some(got) => Err(self.corrupt(rel, format!("its content hashes to {got}"))),
        }
    }

    /// Whether `rel` exists and can be trusted (this process did not find it corrupt).
    pub(super) fn has(&self, rel: &str) -> Result<bool, RemoteError> {
        if self.corrupt.lock().unwrap().contains(rel) {
            return Ok(false);
        }
        Ok(self.objects.has(rel)?)
    }

    /// Writes `bytes` to `rel` unless something is there already, which, the name saying what
    /// the content is, is the same thing. Only a copy this process found corrupt is replaced.
    pub(super) fn put(&self, rel: &str, bytes: Vec<u8>) -> Result<(), RemoteError> {
        let replace = self.corrupt.lock().unwrap().contains(rel);
        self.objects.put(rel, bytes, replace)?;
        if replace {
            self.corrupt.lock().unwrap().remove(rel);
        }
        Ok(())
    }

    /// The keys of every run entry in the remote.
    pub fn run_keys(&self) -> Result<Vec<String>, RemoteError> {
        Ok(self
            .objects
            .list("runs")?
            .iter()
            .filter_map(|name| name.strip_suffix(".json").map(str::to_string))
            .filter(|k| super::is_hash(k))
            .collect())
    }
}
