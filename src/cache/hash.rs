//! Content hashes of files and directories, remembered by (path, size, mtime, inode) so an
//! unchanged file is read once.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::entry::{Artifact, FileEntry};
use super::error::CacheError;
use super::files::write_atomic;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    size: u64,
    mtime_ns: i128,
    inode: u64,
}

impl Stamp {
    fn of(meta: &fs::Metadata) -> Self {
        Stamp {
            size: meta.len(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            inode: meta.ino(),
        }
    }

    /// A file changed within the last two seconds could change again within the same mtime
    /// tick without its stamp changing; such hashes are not remembered.
    fn settled(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        now - self.mtime_ns > 2_000_000_000
    }
}

#[derive(Default, Serialize, Deserialize)]
struct MemoFile {
    entries: HashMap<PathBuf, (Stamp, String)>,
}

/// Remembered file hashes, saved in the cache directory between runs.
pub struct Hasher {
    file: PathBuf,
    memo: Mutex<MemoFile>,
    dirty: Mutex<bool>,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl Hasher {
    pub fn load(file: PathBuf) -> Self {
        // A memo that cannot be read is only a lost speed-up: start afresh.
        let memo = fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Hasher {
            file,
            memo: Mutex::new(memo),
            dirty: Mutex::new(false),
        }
    }

    pub fn save(&self) -> Result<(), CacheError> {
        let mut dirty = self.dirty.lock().unwrap();
        if !*dirty {
            return Ok(());
        }
        let bytes = serde_json::to_vec(&*self.memo.lock().unwrap()).expect("memo serializes");
        write_atomic(&self.file, &bytes)?;
        *dirty = false;
        Ok(())
    }

    /// Hashes the file or directory at `root/rel`.
    pub fn artifact(&self, root: &Path, rel: &str) -> Result<Artifact, CacheError> {
        let abs = root.join(rel);
        let meta = fs::metadata(&abs).map_err(|e| CacheError::io(&abs, e))?;
        if meta.is_dir() {
            let mut files = BTreeMap::new();
            walk(&abs, &abs, &mut |rel_in_dir, path, meta| {
                let hash = self.file_hash(path, meta)?;
                files.insert(rel_in_dir, FileEntry { hash, size: meta.len() });
                Ok(())
            })?;
            Ok(dir_artifact(rel, files))
        } else {
            regular(&abs, &meta)?;
            Ok(Artifact {
                path: rel.to_string(),
                hash: self.file_hash(&abs, &meta)?,
                size: meta.len(),
                files: None,
            })
        }
    }

    fn file_hash(&self, path: &Path, meta: &fs::Metadata) -> Result<String, CacheError> {
        let stamp = Stamp::of(meta);
        if let Some((s, h)) = self.memo.lock().unwrap().entries.get(path) {
            if *s == stamp {
                return Ok(h.clone());
            }
        }
        let hash = hash_reader(open_regular(path)?, None).map_err(|e| CacheError::io(path, e))?;
        self.remember(path, meta, &hash);
        Ok(hash)
    }

    /// Records that `path`, as `meta` describes it, has content `hash`.
    pub fn remember(&self, path: &Path, meta: &fs::Metadata, hash: &str) {
        let stamp = Stamp::of(meta);
        if stamp.settled() {
            self.memo
                .lock()
                .unwrap()
                .entries
                .insert(path.to_path_buf(), (stamp, hash.to_string()));
            *self.dirty.lock().unwrap() = true;
        }
    }
}

/// What a file type is when it is neither a regular file, a directory nor a symbolic link.
pub fn special_kind(ft: fs::FileType) -> Option<&'static str> {
    if ft.is_fifo() {
        Some("FIFO")
    } else if ft.is_char_device() {
        Some("character device")
    } else if ft.is_block_device() {
        Some("block device")
    } else if ft.is_socket() {
        Some("socket")
    } else {
        None
    }
}

/// Refuses anything but a regular file: opening a FIFO blocks until a writer comes, and a device
/// such as `/dev/zero` never ends, so hashing either would hang the stage.
pub(super) fn regular(path: &Path, meta: &fs::Metadata) -> Result<(), CacheError> {
    if meta.is_file() {
        return Ok(());
    }
    Err(CacheError::NotRegular {
        path: path.to_path_buf(),
        kind: special_kind(meta.file_type()).unwrap_or(if meta.is_dir() { "directory" } else { "special file" }),
    })
}

/// Opens a file already found regular. It may have been swapped for a FIFO since: `O_NONBLOCK`
/// makes even that open return at once (it changes nothing for a regular file), and the open
/// file is checked again.
pub(super) fn open_regular(path: &Path) -> Result<fs::File, CacheError> {
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| CacheError::io(path, e))?;
    regular(path, &file.metadata().map_err(|e| CacheError::io(path, e))?)?;
    Ok(file)
}

/// Builds a directory's artifact from its files; the hash covers names and contents.
pub fn dir_artifact(rel: &str, files: BTreeMap<String, FileEntry>) -> Artifact {
    let mut h = Sha256::new();
    for (name, f) in &files {
        h.update(name.as_bytes());
        h.update([0]);
        h.update(f.hash.as_bytes());
        h.update([b'\n']);
    }
    Artifact {
        path: rel.to_string(),
        hash: format!("{}.dir", hex::encode(h.finalize())),
        size: files.values().map(|f| f.size).sum(),
        files: Some(files),
    }
}

/// Streams `reader` through SHA-256, copying it to `copy` when given.
pub fn hash_reader(mut reader: impl Read, mut copy: Option<&mut dyn Write>) -> std::io::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        if let Some(w) = copy.as_mut() {
            w.write_all(&buf[..n])?;
        }
    }
    Ok(hex::encode(h.finalize()))
}

/// Visits every file under `dir` in sorted order, with its path relative to `base`; anything but
/// regular files and directories is refused.
pub fn walk(
    base: &Path,
    dir: &Path,
    visit: &mut dyn FnMut(String, &Path, &fs::Metadata) -> Result<(), CacheError>,
) -> Result<(), CacheError> {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .map_err(|e| CacheError::io(dir, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| CacheError::io(dir, e))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let meta = fs::metadata(&path).map_err(|e| CacheError::io(&path, e))?;
        if meta.is_dir() {
            walk(base, &path, visit)?;
        } else {
            regular(&path, &meta)?;
            let rel = path
                .strip_prefix(base)
                .expect("walked paths are under base")
                .to_string_lossy()
                .into_owned();
            visit(rel, &path, &meta)?;
        }
    }
    Ok(())
}
