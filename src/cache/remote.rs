//! A remote copy of the cache in [object storage](crate::objects), shared by machines. It has
//! the local cache's layout under its prefix: `objects/ab/<sha256>` and `runs/ab/<key>.json`.
//!
//! Everything in it is named by content (objects) or by everything that determined the content
//! (run entries), so an entry never changes once written: puts are create-only, and a put that
//! finds the name taken has nothing left to do. That makes two machines pushing one entry at once
//! harmless, and, as a put is atomic, a reader sees a whole object or none.
//!
//! What it trusts: an object is checked against its name, so its bytes cannot be changed. A run
//! entry says which objects a stage produced, and only a key can check that: with a team secret
//! (`--remote-cache-secret`), each entry carries an HMAC-SHA256 of its stage key and content, and
//! an entry without a valid one is refused and run again. Without a secret, whoever can write the
//! bucket can make an entry name other (existing) objects.

use std::collections::HashSet;
use std::sync::Mutex;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};

use super::entry::{is_hash, RunEntry};
use crate::objects::{Objects, ObjectsError};

/// A run entry as the remote keeps it: with its MAC when the team has a secret.
#[derive(Serialize, Deserialize)]
struct Sealed {
    #[serde(flatten)]
    entry: RunEntry,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mac: Option<String>,
}

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
    /// The team's secret that signs run entries.
    secret: Option<Vec<u8>>,
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
    pub fn open(url: &str, secret: Option<&str>) -> Result<Remote, RemoteError> {
        Ok(Remote {
            objects: Objects::open(url, "remote cache")?,
            secret: secret.map(|s| s.as_bytes().to_vec()),
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

    /// The MAC of the entry of stage key `key`, by the team's secret.
    fn mac(&self, secret: &[u8], key: &str, entry: &RunEntry) -> String {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
        mac.update(b"sentiflow run entry\n");
        mac.update(key.as_bytes());
        mac.update(b"\n");
        mac.update(&serde_json::to_vec(entry).expect("run entries serialize"));
        hex::encode(mac.finalize().into_bytes())
    }

    /// The bytes to store for the entry of stage key `key`.
    pub(super) fn seal(&self, key: &str, entry: &RunEntry) -> Vec<u8> {
        let sealed = Sealed {
            entry: entry.clone(),
            mac: self.secret.as_deref().map(|s| self.mac(s, key, entry)),
        };
        serde_json::to_vec_pretty(&sealed).expect("run entries serialize")
    }

    /// The entry of stage key `key` stored at `rel` as `bytes`, once its MAC is checked (with a
    /// secret); a bad one is distrusted, so the stage's next push replaces it.
    pub(super) fn unseal(&self, rel: &str, key: &str, bytes: &[u8]) -> Result<RunEntry, RemoteError> {
        let sealed: Sealed = serde_json::from_slice(bytes).map_err(|e| self.corrupt(rel, e.to_string()))?;
        if let Some(secret) = &self.secret {
            let expected = self.mac(secret, key, &sealed.entry);
            match &sealed.mac {
                None => {
                    return Err(self.corrupt(
                        rel,
                        "it is not signed with the team's secret (--remote-cache-secret); it was written by a \
                         machine without it, or altered"
                            .into(),
                    ))
                }
                Some(mac) if *mac != expected => {
                    return Err(self.corrupt(
                        rel,
                        "its signature does not match its content: it was altered, or signed with another secret"
                            .into(),
                    ))
                }
                Some(_) => {}
            }
        }
        Ok(sealed.entry)
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
            .filter(|k| is_hash(k))
            .collect())
    }
}
