//! `sentiflow dag`: prints a pipeline's stage graph as text, Graphviz or Mermaid.

use std::path::PathBuf;

use super::exit;
use super::project::load;
use crate::pipeline::graph::DagFormat;

pub(super) fn dag(file: PathBuf, format: DagFormat) -> anyhow::Result<i32> {
    let p = match load(&file, &[]) {
        Ok(p) => p,
        Err(code) => return Ok(code),
    };
    print!("{}", p.dag.render(&p.stages, format));
    Ok(exit::OK)
}
