//! `sentiflow tracking sync`: sends the runs queued in the cache to MLflow.

use super::exit;
use super::project::{open_cache, Globals};

pub(super) fn sync(global: &Globals, uri: Option<String>) -> anyhow::Result<i32> {
    let cwd = std::env::current_dir()?;
    let cache = open_cache(&global.cache_dir, &cwd)?;
    let results = crate::tracking::sync(cache.dir(), uri.as_deref());
    if results.is_empty() {
        println!(
            "nothing to send: no queued runs in {}",
            cache.dir().join("tracking").display()
        );
    }
    let mut failed = 0;
    for r in &results {
        match &r.result {
            Ok(run) => println!("sent {} ({}) as MLflow run {run}", r.pipeline, r.outbox.display()),
            Err(e) => {
                failed += 1;
                println!(
                    "still queued: {} ({}): {} events left: {e}",
                    r.pipeline,
                    r.outbox.display(),
                    r.pending
                );
            }
        }
    }
    Ok(if failed == 0 { exit::OK } else { exit::FAILED })
}
