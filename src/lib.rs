//! sentiflow: train, tune, track and serve sentiment models from YAML pipelines.

pub mod cache;
pub mod cli;
pub mod pipeline;
pub mod stages;
