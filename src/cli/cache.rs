//! `sentiflow cache gc|push|pull`, and the remote cache options that `run` and `status` share.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use super::exit;
use super::project::{load, open_cache, Globals};
use crate::cache::{Cache, Remote, Transfer};
use crate::pipeline::{lock, Override, Pipeline};

/// A remote copy of the cache, shared by machines.
#[derive(clap::Args)]
pub(super) struct RemoteCache {
    /// Remote stage cache: s3://BUCKET/PREFIX (endpoint and keys from AWS_ENDPOINT_URL,
    /// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ALLOW_HTTP) or file:///DIR. A
    /// stage missing from the local cache is fetched from it; a stage that runs is pushed to it.
    #[arg(long = "remote-cache", env = "SENTIFLOW_REMOTE_CACHE", value_name = "URL")]
    url: Option<String>,
    /// The team's secret for the remote cache: run entries are signed with it, and one that is
    /// not is refused and its stage run again. Without it, whoever can write the bucket can make
    /// an entry name other objects. Prefer the variable: a flag shows in the process list.
    #[arg(
        long = "remote-cache-secret",
        env = "SENTIFLOW_REMOTE_CACHE_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    secret: Option<String>,
}

impl RemoteCache {
    pub(super) fn given(&self) -> bool {
        self.url.is_some()
    }

    /// The URL and the secret, for a server that opens the remote for each training.
    pub(super) fn parts(&self) -> Option<(String, Option<String>)> {
        Some((self.url.clone()?, self.secret.clone()))
    }

    /// The pipeline of `file` with `set` applied, and its cache with this remote attached; `Err`
    /// holds the exit code of a failure already reported.
    pub(super) fn open_pipeline(
        &self,
        global: &Globals,
        file: &Path,
        set: &[Override],
    ) -> anyhow::Result<Result<(Pipeline, Cache), i32>> {
        let p = match load(file, set) {
            Ok(p) => p,
            Err(code) => return Ok(Err(code)),
        };
        Ok(self
            .attach(open_cache(&global.cache_dir, &p.root)?)
            .map(|cache| (p, cache)))
    }

    /// `cache` with this remote, if one is given; a URL that cannot be used is the caller's
    /// mistake.
    pub(super) fn attach(&self, cache: Cache) -> Result<Cache, i32> {
        let Some(url) = &self.url else { return Ok(cache) };
        match Remote::open(url, self.secret.as_deref()) {
            Ok(remote) => Ok(cache.with_remote(remote)),
            Err(e) => {
                eprintln!("error: {e}");
                Err(exit::INVALID)
            }
        }
    }
}

pub(super) fn gc(global: &Globals, dry_run: bool) -> anyhow::Result<i32> {
    let cwd = std::env::current_dir()?;
    let cache = open_cache(&global.cache_dir, &cwd)?;
    let r = cache.gc(dry_run)?;
    println!(
        "{} {} run entries and {} objects ({:.1} MiB); kept {} run entries and {} objects",
        if dry_run { "would remove" } else { "removed" },
        r.runs_removed,
        r.objects_removed,
        r.bytes_freed as f64 / (1 << 20) as f64,
        r.runs_kept,
        r.objects_kept
    );
    Ok(exit::OK)
}

#[derive(Clone, Copy, PartialEq)]
pub(super) enum Direction {
    Push,
    Pull,
}

/// `cache push` and `cache pull`: the entries of `file`'s stages (the keys its lock file records)
/// or all of them, copied to or from the remote cache. Unlike a run, they fail when the remote
/// does.
pub(super) fn sync_remote(
    cache_dir: &Option<PathBuf>,
    quiet: bool,
    file: Option<&Path>,
    remote: &RemoteCache,
    direction: Direction,
) -> anyhow::Result<i32> {
    let Some(url) = &remote.url else {
        eprintln!("error: no remote cache: give --remote-cache s3://BUCKET/PREFIX or set SENTIFLOW_REMOTE_CACHE");
        return Ok(exit::INVALID);
    };
    let (root, keys) = match file {
        Some(file) => {
            let p = match load(file, &[]) {
                Ok(p) => p,
                Err(code) => return Ok(code),
            };
            let keys: Vec<String> = lock::read(&p).stages.into_values().map(|s| s.key).collect();
            if keys.is_empty() {
                eprintln!(
                    "error: {} has no lock file recording its stages' keys yet: run it first",
                    file.display()
                );
                return Ok(exit::INVALID);
            }
            (p.root, Some(keys))
        }
        None => (std::env::current_dir()?, None),
    };
    let cache = match remote.attach(open_cache(cache_dir, &root)?) {
        Ok(cache) => cache,
        Err(code) => return Ok(code),
    };
    let verb = match direction {
        Direction::Push => "pushing to",
        Direction::Pull => "pulling from",
    };
    let keys = match (keys, direction) {
        (Some(keys), _) => keys,
        (None, Direction::Push) => cache.keys()?,
        (None, Direction::Pull) => cache.remote().expect("attached").run_keys()?,
    };
    let mut total = Transfer::default();
    let mut absent = 0;
    for key in &keys {
        // A local entry that cannot be read is as good as absent (and `lookup` removed it).
        let local = cache.lookup(key).ok().flatten();
        let done = match (direction, local) {
            (Direction::Push, Some(entry)) => Some(cache.push(key, &entry)),
            (Direction::Push, None) => None,
            (Direction::Pull, Some(_)) => Some(Ok(Transfer::default())),
            (Direction::Pull, None) => cache.fetch(key).transpose().map(|r| r.map(|(_, t)| t)),
        };
        match done {
            Some(t) => {
                let t = t.with_context(|| format!("{verb} {url}"))?;
                total.runs += t.runs;
                total.objects += t.objects;
                total.bytes += t.bytes;
            }
            None => absent += 1,
        }
    }
    if !quiet {
        let (done, place, lacking) = match direction {
            Direction::Push => ("pushed", "to", "not in the local cache"),
            Direction::Pull => ("pulled", "from", "not in the remote cache"),
        };
        let note = match absent {
            0 => String::new(),
            n => format!("; {n} {lacking}"),
        };
        println!(
            "{done} {} run entries and {} objects ({:.1} MiB) {place} {url}; {} were there already{note}",
            total.runs,
            total.objects,
            total.bytes as f64 / (1 << 20) as f64,
            keys.len() - total.runs - absent,
        );
    }
    Ok(exit::OK)
}
