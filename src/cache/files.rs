//! Files written whole or not at all: a temporary file, synced, renamed into place.

use std::fs;
use std::io::Write;
use std::path::Path;

use super::error::CacheError;

pub fn persist(mut tmp: tempfile::NamedTempFile, dest: &Path) -> Result<(), CacheError> {
    tmp.as_file_mut()
        .sync_all()
        .map_err(|e| CacheError::io(tmp.path(), e))?;
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).map_err(|e| CacheError::io(parent, e))?;
    }
    tmp.persist(dest).map_err(|e| CacheError::io(dest, e.error))?;
    Ok(())
}

/// Writes `bytes` to `dest` through a synced temporary file in the same directory.
pub fn write_atomic(dest: &Path, bytes: &[u8]) -> Result<(), CacheError> {
    let parent = dest.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|e| CacheError::io(parent, e))?;
    let mut tmp = tempfile::NamedTempFile::new_in(parent).map_err(|e| CacheError::io(parent, e))?;
    tmp.write_all(bytes).map_err(|e| CacheError::io(dest, e))?;
    persist(tmp, dest)
}
