//! `sentiflow serve`: settles the server's settings (flags, environment, config file sections)
//! and serves predictions, the model registry and training over HTTP.

use super::cache::RemoteCache;
use super::exit;
use super::project::Globals;
use crate::serve::Offload;

pub(super) fn serve(global: &Globals, mut config: crate::serve::Config, remote: RemoteCache) -> anyhow::Result<i32> {
    let sections = match global.config.as_deref().map(crate::serve::policy::Sections::load) {
        Some(Ok(sections)) => sections,
        Some(Err(e)) => {
            eprintln!("error: {e}");
            return Ok(exit::INVALID);
        }
        None => Default::default(),
    };
    if let Err(e) = crate::serve::settle(&mut config, sections) {
        eprintln!("error: {e}");
        return Ok(exit::INVALID);
    }
    let executors = match global.executors(false) {
        Ok(e) => e,
        Err(code) => return Ok(code),
    };
    let offload = Offload {
        executors,
        remote_cache: remote.parts(),
    };
    let cache_dir = global.cache_dir.clone().unwrap_or_else(|| config.root().join("cache"));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let app = crate::serve::App::new(config, cache_dir, global.output_dirs.clone(), offload)?;
        crate::serve::serve(app).await
    })?;
    Ok(exit::OK)
}
