//! The content-addressed cache.
//!
//! Layout under the cache directory:
//! - `objects/ab/<sha256>`: file contents, named by their hash;
//! - `runs/ab/<key>.json`: what a stage run with that key produced (its outputs' hashes, metrics);
//! - `pipelines/<id>.json`: the keys the latest run of each pipeline used (for `cache gc`);
//! - `hashes.json`: remembered file hashes;
//! - `locks/<id>.lock`: one per output path ever written, locked while a stage writes it (see
//!   [`Cache::lock_outputs`]). `gc` leaves them: deleting a lock file someone holds would let a
//!   second run lock a new file of the same name.
//!
//! Every file is written to a temporary name, synced and renamed, so an interrupted write never
//! leaves a partial entry under a final name. Anything read back is verified against its hash.
//!
//! A cache may have a [`Remote`] copy with the same layout: [`Cache::fetch`] copies an entry from
//! it, [`Cache::push`] copies one to it.

mod entry;
mod error;
mod files;
mod hash;
pub mod remote;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Serialize;

use entry::is_hash;
pub use entry::{Artifact, FileEntry, Metrics, RunEntry};
pub use error::CacheError;
use files::persist;
pub use files::write_atomic;
pub use hash::{hash_reader, sha256_hex, special_kind, Hasher};
pub use remote::{Remote, RemoteError, Transfer};

/// Space a garbage collection freed.
#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    pub runs_removed: usize,
    pub objects_removed: usize,
    pub bytes_freed: u64,
    pub runs_kept: usize,
    pub objects_kept: usize,
}

pub struct Cache {
    dir: PathBuf,
    pub hasher: Hasher,
    remote: Option<Remote>,
}

impl Cache {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// This cache with a remote copy that runs fetch missing entries from and push new ones to.
    pub fn with_remote(self, remote: Remote) -> Cache {
        Cache {
            remote: Some(remote),
            ..self
        }
    }

    pub fn remote(&self) -> Option<&Remote> {
        self.remote.as_ref()
    }

    pub fn open(dir: &Path) -> Result<Cache, CacheError> {
        for sub in ["objects", "runs", "pipelines", "tmp", "locks"] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(|e| CacheError::io(&p, e))?;
        }
        Ok(Cache {
            dir: dir.to_path_buf(),
            hasher: Hasher::load(dir.join("hashes.json")),
            remote: None,
        })
    }

    fn run_path(&self, key: &str) -> PathBuf {
        self.dir.join(run_name(key))
    }

    fn object_path(&self, hash: &str) -> PathBuf {
        self.dir.join(object_name(hash))
    }

    /// The keys of every run entry here.
    pub fn keys(&self) -> Result<Vec<String>, CacheError> {
        Ok(list_files(&self.dir.join("runs"))?
            .iter()
            .filter_map(|f| Some(f.file_name()?.to_str()?.strip_suffix(".json")?.to_string()))
            .filter(|k| is_hash(k))
            .collect())
    }

    /// Whether the remote cache holds the entry `key` (`false` without a remote).
    pub fn remote_has(&self, key: &str) -> Result<bool, CacheError> {
        match &self.remote {
            Some(remote) => Ok(remote.has(&run_name(key))?),
            None => Ok(false),
        }
    }

    /// Copies the entry `key` from the remote into this cache, its objects first and the entry
    /// last, as a local write would: `None` when the remote has no such entry (or there is no
    /// remote). Each object is checked against its name on the way; a mismatch is reported as
    /// [`RemoteError::Corrupt`], and no entry is written (the objects already checked stay).
    pub fn fetch(&self, key: &str) -> Result<Option<(RunEntry, Transfer)>, CacheError> {
        let Some(remote) = &self.remote else { return Ok(None) };
        let name = run_name(key);
        let Some(bytes) = remote.get(&name)? else {
            return Ok(None);
        };
        let entry = remote.unseal(&name, key, &bytes)?;
        entry.check_foreign().map_err(|reason| remote.corrupt(&name, reason))?;
        let mut transfer = self.download(remote, entry.objects(), &name)?;
        transfer.runs = 1;
        write_atomic(
            &self.run_path(key),
            &serde_json::to_vec_pretty(&entry).expect("run entries serialize"),
        )?;
        Ok(Some((entry, transfer)))
    }

    /// Copies the entry `key` to the remote (if there is one), objects first and the entry last,
    /// so no reader finds an entry whose objects are not all there. Anything the remote has
    /// already is not sent again.
    pub fn push(&self, key: &str, entry: &RunEntry) -> Result<Transfer, CacheError> {
        let Some(remote) = &self.remote else {
            return Ok(Transfer::default());
        };
        let name = run_name(key);
        if remote.has(&name)? {
            return Ok(Transfer::default());
        }
        let mut transfer = self.upload(remote, entry.objects())?;
        remote.put(&name, remote.seal(key, entry))?;
        transfer.runs += 1;
        Ok(transfer)
    }

    /// Copies the `objects` this cache lacks from the remote, each checked against its name; one
    /// that is missing or damaged makes `entry` (the remote name that lists it) distrusted.
    fn download<'a>(
        &self,
        remote: &Remote,
        objects: impl Iterator<Item = (&'a str, u64)>,
        entry: &str,
    ) -> Result<Transfer, CacheError> {
        let mut transfer = Transfer::default();
        let tmp_dir = self.dir.join("tmp");
        for (hash, size) in objects {
            let dest = self.object_path(hash);
            if dest.exists() {
                continue;
            }
            let mut tmp = tempfile::NamedTempFile::new_in(&tmp_dir).map_err(|e| CacheError::io(&tmp_dir, e))?;
            let found = remote.download(&object_name(hash), hash, &mut tmp).inspect_err(|e| {
                // The entry names a damaged object: the next push of this key replaces it.
                if matches!(e, RemoteError::Corrupt { .. }) {
                    remote.distrust(entry);
                }
            })?;
            if !found {
                return Err(remote.corrupt(entry, format!("its object {hash} is missing")).into());
            }
            persist(tmp, &dest)?;
            transfer.objects += 1;
            transfer.bytes += size;
        }
        Ok(transfer)
    }

    /// Copies the `objects` the remote lacks to it.
    fn upload<'a>(
        &self,
        remote: &Remote,
        objects: impl Iterator<Item = (&'a str, u64)>,
    ) -> Result<Transfer, CacheError> {
        let mut transfer = Transfer::default();
        let mut sent = BTreeSet::new();
        for (hash, size) in objects {
            let object = object_name(hash);
            if !sent.insert(hash) || remote.has(&object)? {
                continue;
            }
            // Never spread a local object that rotted since it was stored.
            let bytes = self.read_object(hash)?;
            remote.put(&object, bytes)?;
            transfer.objects += 1;
            transfer.bytes += size;
        }
        Ok(transfer)
    }

    /// Sends the objects of `outs` (artifacts stored in this cache) to the remote: the inputs of
    /// a stage that runs elsewhere.
    pub fn push_artifacts(&self, outs: &[Artifact]) -> Result<Transfer, CacheError> {
        match &self.remote {
            Some(remote) => self.upload(remote, entry::objects(outs)),
            None => Ok(Transfer::default()),
        }
    }

    /// Copies the objects of `outs` from the remote into this cache, so they can be restored;
    /// `task` names the remote task that lists them, for errors.
    pub fn fetch_artifacts(&self, outs: &[Artifact], task: &str) -> Result<Transfer, CacheError> {
        match &self.remote {
            Some(remote) => self.download(remote, entry::objects(outs), &task_name(task)),
            None => Ok(Transfer::default()),
        }
    }

    /// Stores the description of the stage whose key is `key` in the remote, for a worker to run
    /// it. Like a run entry, it is named by what determined it, so it never changes.
    pub fn put_task(&self, key: &str, bytes: Vec<u8>) -> Result<(), CacheError> {
        match &self.remote {
            Some(remote) => Ok(remote.put(&task_name(key), bytes)?),
            None => Ok(()),
        }
    }

    /// The description of the stage whose key is `key`, from the remote.
    pub fn task(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        match &self.remote {
            Some(remote) => Ok(remote.get(&task_name(key))?),
            None => Ok(None),
        }
    }

    /// The content of the object named `hash`, checked against its name.
    pub fn read_object(&self, hash: &str) -> Result<Vec<u8>, CacheError> {
        let path = self.object_path(hash);
        let bytes = fs::read(&path).map_err(|e| CacheError::io(&path, e))?;
        if sha256_hex(&bytes) != hash {
            return Err(CacheError::Corrupt {
                what: path.display().to_string(),
                reason: "its content no longer matches its name".into(),
            });
        }
        Ok(bytes)
    }

    /// The entry stored under `key`, if any. An unreadable entry is removed and reported.
    pub fn lookup(&self, key: &str) -> Result<Option<RunEntry>, CacheError> {
        let path = self.run_path(key);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(CacheError::io(&path, e)),
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            let _ = fs::remove_file(&path);
            CacheError::Corrupt {
                what: path.display().to_string(),
                reason: e.to_string(),
            }
        })
    }

    pub fn discard(&self, key: &str) {
        let _ = fs::remove_file(self.run_path(key));
    }

    pub fn record(&self, key: &str, entry: &RunEntry) -> Result<(), CacheError> {
        let bytes = serde_json::to_vec_pretty(entry).expect("run entries serialize");
        write_atomic(&self.run_path(key), &bytes)
    }

    /// Copies the outputs at `root/outs` into the object store, hashing them on the way.
    pub fn store(&self, root: &Path, outs: &[String]) -> Result<Vec<Artifact>, CacheError> {
        outs.iter()
            .map(|rel| {
                let abs = root.join(rel);
                let meta = fs::metadata(&abs).map_err(|e| CacheError::io(&abs, e))?;
                if meta.is_dir() {
                    let mut files = BTreeMap::new();
                    hash::walk(&abs, &abs, &mut |name, path, meta| {
                        let (hash, size) = self.store_file(path, meta)?;
                        files.insert(name, FileEntry { hash, size });
                        Ok(())
                    })?;
                    Ok(hash::dir_artifact(rel, files))
                } else {
                    hash::regular(&abs, &meta)?;
                    let (hash, size) = self.store_file(&abs, &meta)?;
                    Ok(Artifact {
                        path: rel.clone(),
                        hash,
                        size,
                        files: None,
                    })
                }
            })
            .collect()
    }

    fn store_file(&self, path: &Path, meta: &fs::Metadata) -> Result<(String, u64), CacheError> {
        let src = hash::open_regular(path)?;
        let tmp_dir = self.dir.join("tmp");
        let mut tmp = tempfile::NamedTempFile::new_in(&tmp_dir).map_err(|e| CacheError::io(&tmp_dir, e))?;
        let hash = hash_reader(src, Some(tmp.as_file_mut())).map_err(|e| CacheError::io(path, e))?;
        let dest = self.object_path(&hash);
        if !dest.exists() {
            persist(tmp, &dest)?;
        }
        self.hasher.remember(path, meta, &hash);
        Ok((hash, meta.len()))
    }

    /// Makes the workspace hold `outs`: files already there with the right content are left
    /// alone, others are copied from the object store and verified on the way.
    pub fn restore(&self, root: &Path, outs: &[Artifact]) -> Result<(), CacheError> {
        for out in outs {
            if let Ok(current) = self.hasher.artifact(root, &out.path) {
                if current.hash == out.hash {
                    continue;
                }
            }
            let abs = root.join(&out.path);
            remove_path(&abs)?;
            match &out.files {
                Some(files) => {
                    for (name, f) in files {
                        self.checkout(&f.hash, &abs.join(name))?;
                    }
                }
                None => self.checkout(&out.hash, &abs)?,
            }
        }
        Ok(())
    }

    fn checkout(&self, hash: &str, dest: &Path) -> Result<(), CacheError> {
        let src_path = self.object_path(hash);
        let src = fs::File::open(&src_path).map_err(|_| CacheError::Corrupt {
            what: src_path.display().to_string(),
            reason: "object missing".into(),
        })?;
        let parent = dest.parent().expect("outputs live under the root");
        fs::create_dir_all(parent).map_err(|e| CacheError::io(parent, e))?;
        let mut tmp = tempfile::NamedTempFile::new_in(parent).map_err(|e| CacheError::io(parent, e))?;
        let got = hash_reader(src, Some(tmp.as_file_mut())).map_err(|e| CacheError::io(&src_path, e))?;
        if got != hash {
            let _ = fs::remove_file(&src_path);
            return Err(CacheError::Corrupt {
                what: src_path.display().to_string(),
                reason: format!("content hashes to {got}"),
            });
        }
        persist(tmp, dest)?;
        let meta = fs::metadata(dest).map_err(|e| CacheError::io(dest, e))?;
        self.hasher.remember(dest, &meta, hash);
        Ok(())
    }

    /// Locks the outputs at `paths` (absolute, symbolic links resolved) against every process
    /// using this cache, until the lock is dropped. A stage holds it from its cache lookup to its
    /// cache record, so two runs of one stage never write its outputs at once nor cache a mix of
    /// both: the second finds the first one's entry and restores it. Locks are taken in one fixed
    /// order, so runs locking overlapping sets cannot deadlock; they are flock(2) locks, which the
    /// kernel drops when their holder dies, even by SIGKILL.
    ///
    /// Before waiting, `waiting` is told the holder's pid when it is known. The wait polls rather
    /// than blocks so that it ends, with `None`, once `cancel` is set.
    pub fn lock_outputs(
        &self,
        paths: &[PathBuf],
        cancel: &AtomicBool,
        waiting: &dyn Fn(Option<u32>),
    ) -> Result<Option<OutputLock>, CacheError> {
        let mut ids: Vec<(String, &PathBuf)> = paths
            .iter()
            .map(|p| (sha256_hex(p.as_os_str().as_bytes())[..32].to_string(), p))
            .collect();
        ids.sort();
        ids.dedup_by(|a, b| a.0 == b.0);
        let mut files = Vec::with_capacity(ids.len());
        for (id, path) in ids {
            let lock_path = self.dir.join("locks").join(format!("{id}.lock"));
            let io = |e| CacheError::io(&lock_path, e);
            let file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&lock_path)
                .map_err(io)?;
            let mut told = false;
            loop {
                match file.try_lock() {
                    Ok(()) => break,
                    Err(fs::TryLockError::WouldBlock) => {}
                    Err(fs::TryLockError::Error(e)) => return Err(io(e)),
                }
                if !told {
                    waiting(lock_holder(&file));
                    told = true;
                }
                if cancel.load(Ordering::SeqCst) {
                    return Ok(None);
                }
                std::thread::sleep(LOCK_POLL);
            }
            // Who holds it, for the message of a run that waits (and a person looking). Its length
            // never changes, so it overwrites the last note without truncating, which costs far
            // more; not synced, as nothing else depends on it.
            let note = format!("{:>10}\n{}\n", std::process::id(), path.display());
            file.write_all_at(note.as_bytes(), 0).map_err(io)?;
            files.push(file);
        }
        Ok(Some(OutputLock { _files: files }))
    }

    fn usage_path(&self, pipeline: &Path) -> PathBuf {
        let id = sha256_hex(pipeline.to_string_lossy().as_bytes());
        self.dir.join("pipelines").join(format!("{}.json", &id[..16]))
    }

    /// Records which keys the latest run of `pipeline` uses, so `gc` keeps them.
    pub fn record_usage(&self, pipeline: &Path, keys: &BTreeSet<String>) -> Result<(), CacheError> {
        let body = serde_json::json!({"pipeline": pipeline, "keys": keys});
        let bytes = serde_json::to_vec_pretty(&body).expect("usage serializes");
        let path = self.usage_path(pipeline);
        if fs::read(&path).ok().as_deref() == Some(&bytes[..]) {
            return Ok(());
        }
        write_atomic(&path, &bytes)
    }

    /// Removes every run entry and object that no pipeline's latest run uses.
    pub fn gc(&self, dry_run: bool) -> Result<GcReport, CacheError> {
        let remove = |path: &Path| remove_counted(path, dry_run);
        let mut keys = BTreeSet::new();
        for file in list_files(&self.dir.join("pipelines"))? {
            let usage: serde_json::Value = fs::read(&file)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
            if let Some(list) = usage["keys"].as_array() {
                keys.extend(list.iter().filter_map(|k| k.as_str().map(str::to_string)));
            }
        }
        let mut report = GcReport::default();
        let mut objects = BTreeSet::new();
        for file in list_files(&self.dir.join("runs"))? {
            let key = file.file_stem().unwrap_or_default().to_string_lossy().into_owned();
            let entry = keys.contains(&key).then(|| self.lookup(&key).ok().flatten()).flatten();
            match entry {
                Some(entry) => {
                    report.runs_kept += 1;
                    objects.extend(entry.objects().map(|(hash, _)| hash.to_string()));
                }
                None => {
                    report.bytes_freed += remove(&file);
                    report.runs_removed += 1;
                }
            }
        }
        for file in list_files(&self.dir.join("objects"))? {
            let hash = file.file_name().unwrap_or_default().to_string_lossy().into_owned();
            if objects.contains(&hash) {
                report.objects_kept += 1;
            } else {
                report.bytes_freed += remove(&file);
                report.objects_removed += 1;
            }
        }
        for file in list_files(&self.dir.join("tmp"))? {
            report.bytes_freed += remove(&file);
        }
        Ok(report)
    }
}

/// Where the entry of run `key` lives, relative to a cache's root (local or remote).
fn run_name(key: &str) -> String {
    format!("runs/{}/{key}.json", &key[..2])
}

/// Where the description of the stage with key `key` lives in a remote cache.
fn task_name(key: &str) -> String {
    format!("tasks/{}/{key}.json", &key[..2])
}

/// Where the object named `hash` lives, relative to a cache's root (local or remote).
fn object_name(hash: &str) -> String {
    format!("objects/{}/{hash}", &hash[..2])
}

/// Outputs locked by [`Cache::lock_outputs`]; dropping it unlocks them.
pub struct OutputLock {
    _files: Vec<fs::File>,
}

/// How often a run waiting for another one's outputs tries their lock again.
const LOCK_POLL: Duration = Duration::from_millis(50);

/// The pid a lock file names (none when its holder has not written it yet).
fn lock_holder(file: &fs::File) -> Option<u32> {
    let mut buf = [0u8; 32];
    let n = file.read_at(&mut buf, 0).ok()?;
    std::str::from_utf8(&buf[..n]).ok()?.lines().next()?.trim().parse().ok()
}

/// Removes a file and gives its size; with `dry_run`, only gives the size.
fn remove_counted(path: &Path, dry_run: bool) -> u64 {
    let size = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if dry_run {
        return size;
    }
    match fs::remove_file(path) {
        Ok(()) => size,
        Err(_) => 0,
    }
}

fn list_files(dir: &Path) -> Result<Vec<PathBuf>, CacheError> {
    let mut out = Vec::new();
    if dir.exists() {
        hash::walk(dir, dir, &mut |_, path, _| {
            out.push(path.to_path_buf());
            Ok(())
        })?;
    }
    Ok(out)
}

fn remove_path(path: &Path) -> Result<(), CacheError> {
    let result = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    result.map_err(|e| CacheError::io(path, e))
}

/// Removes the outputs a stage is about to write, so stale files never pass for new ones.
pub fn clear_outputs(root: &Path, outs: &[String]) -> Result<(), CacheError> {
    outs.iter().try_for_each(|rel| remove_path(&root.join(rel)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_locked_output_makes_others_wait_until_it_is_released() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let outs = [dir.path().join("b"), dir.path().join("a")];
        let go_on = AtomicBool::new(false);
        let held = cache.lock_outputs(&outs, &go_on, &|_| panic!("free")).unwrap().unwrap();
        // A second lock of one of them, from its own open file as another process would, waits
        // and names this process; cancelling ends the wait.
        let cancel = AtomicBool::new(false);
        let told = std::sync::Mutex::new(None);
        let waiting = |pid| {
            *told.lock().unwrap() = Some(pid);
            cancel.store(true, Ordering::SeqCst);
        };
        assert!(cache.lock_outputs(&outs[1..], &cancel, &waiting).unwrap().is_none());
        assert_eq!(*told.lock().unwrap(), Some(Some(std::process::id())));
        drop(held);
        assert!(cache
            .lock_outputs(&outs[1..], &go_on, &|_| panic!("released"))
            .unwrap()
            .is_some());
    }
}
