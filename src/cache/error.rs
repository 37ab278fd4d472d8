//! What the cache fails with.

use std::path::{Path, PathBuf};

use super::remote::RemoteError;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt cache entry {what}: {reason}")]
    Corrupt { what: String, reason: String },
    #[error(
        "{path} is a {kind}, not a regular file: reading it could block or never end, so it cannot be \
         hashed or cached; point the pipeline at a regular file or a directory of them"
    )]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error(transparent)]
    Remote(#[from] RemoteError),
}

impl CacheError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        CacheError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
