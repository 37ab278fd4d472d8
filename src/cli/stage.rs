//! `sentiflow stage exec KEY`: the worker command an executor's job runs.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use super::cache::RemoteCache;
use super::exit;
use crate::cache::Cache;
use crate::pipeline::worker::{self, Done, WorkerError};

static CANCEL: AtomicBool = AtomicBool::new(false);

pub(super) fn exec(
    key: &str,
    trial: Option<usize>,
    client_version: &str,
    scratch: Option<PathBuf>,
    remote: RemoteCache,
) -> anyhow::Result<i32> {
    if !remote.given() {
        eprintln!("error: no remote cache: the worker takes its task from --remote-cache s3://BUCKET/PREFIX");
        return Ok(exit::INVALID);
    }
    // Engines stop a job with SIGTERM (Ray's stop, scancel): the stage ends as on Ctrl-C, and
    // nothing is published.
    ctrlc::set_handler(|| CANCEL.store(true, Ordering::SeqCst))?;
    let base = scratch.unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base)?;
    let dir = tempfile::Builder::new().prefix("sentiflow-stage-").tempdir_in(&base)?;
    let cache = match remote.attach(Cache::open(&dir.path().join("cache"))?) {
        Ok(cache) => cache,
        Err(code) => return Ok(code),
    };
    let project = dir.path().join("project");
    std::fs::create_dir_all(&project)?;
    let log = |line: &str| println!("{line}");
    println!("sentiflow {} on {}: task {key}", env!("CARGO_PKG_VERSION"), hostname());
    match worker::exec(&cache, key, trial, client_version, &project, &CANCEL, &log) {
        Ok(Done::Already) => Ok(exit::OK),
        Ok(Done::Ran { transfer }) => {
            println!(
                "published the result: {} objects ({} bytes) and the run entry",
                transfer.objects, transfer.bytes
            );
            Ok(exit::OK)
        }
        Err(WorkerError::Interrupted) => {
            eprintln!("interrupted: nothing published");
            Ok(exit::INTERRUPTED)
        }
        Err(e @ WorkerError::Version { .. }) => {
            eprintln!("error: {e}");
            Ok(exit::INVALID)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(exit::FAILED)
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "this machine".into())
}
