//! `sentiflow status`: which stages are up to date, why the others are stale, and which of those
//! the remote cache holds.

use std::path::PathBuf;

use super::cache::RemoteCache;
use super::exit;
use super::project::Globals;
use crate::cache::Cache;
use crate::pipeline::{lock, Override, Pipeline};

pub(super) fn status(
    global: &Globals,
    file: PathBuf,
    set: Vec<Override>,
    json: bool,
    check: bool,
    remote: RemoteCache,
) -> anyhow::Result<i32> {
    let (p, cache) = match remote.open_pipeline(global, &file, &set)? {
        Ok(opened) => opened,
        Err(code) => return Ok(code),
    };
    let status = lock::status(&p, &cache.hasher);
    cache.hasher.save()?;
    let fetchable = fetchable(&p, &cache, &status);
    if json {
        let list: Vec<_> = status
            .iter()
            .map(|(name, s)| {
                let mut v = serde_json::to_value(s).expect("status serializes");
                v["stage"] = name.clone().into();
                if let Some(remote) = &fetchable {
                    v["remote"] = remote.contains(name).into();
                }
                v
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else if !global.quiet {
        let width = status.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
        for (name, s) in &status {
            let note = match &fetchable {
                Some(remote) if remote.contains(name) => "; the remote cache has it (`run` fetches it)",
                _ => "",
            };
            println!("{name:width$}  {s}{note}");
        }
    }
    let stale = status.iter().any(|(_, s)| *s != lock::Staleness::UpToDate);
    Ok(if check && stale { exit::FAILED } else { exit::OK })
}

/// The stale stages whose entry, as the lock file records it, the remote cache holds: a run
/// fetches them instead of running them. `None` without a remote; a remote that does not answer
/// is reported once and leaves the set as far as it got.
fn fetchable(
    p: &Pipeline,
    cache: &Cache,
    status: &[(String, lock::Staleness)],
) -> Option<std::collections::BTreeSet<String>> {
    use lock::Staleness::*;
    cache.remote()?;
    let locked = lock::read(p);
    let mut found = std::collections::BTreeSet::new();
    for (name, s) in status {
        // Only these leave the recorded key current: the inputs and the definition are unchanged.
        if !matches!(s, OutputMissing { .. } | OutputModified { .. } | UpstreamStale { .. }) {
            continue;
        }
        let Some(key) = locked.stages.get(name).map(|l| &l.key) else {
            continue;
        };
        match cache.remote_has(key) {
            Ok(true) => {
                found.insert(name.clone());
            }
            Ok(false) => {}
            Err(e) => {
                eprintln!("warning: {e}");
                break;
            }
        }
    }
    Some(found)
}
