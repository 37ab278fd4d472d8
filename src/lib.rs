//! sentiflow: train, tune, track and serve sentiment models from YAML pipelines.

pub mod blocking;
pub mod cache;
pub mod cli;
pub mod data;
pub mod drift;
pub mod executors;
pub mod models;
pub mod objects;
pub mod pipeline;
pub mod plot;
pub mod registry;
pub mod serve;
pub mod span;
pub mod stages;
pub mod store;
pub mod text;
pub mod tracking;
