//! What a server does, without HTTP: the served models, keys and limits, trainings, the
//! retraining policy, candidates and shadow traffic, drift and metrics. Each file builds on the
//! ones it imports and none imports back up: the components (`auth`, `batcher`, `drift`,
//! `metrics`, `policy`, `shadow`, `training`) know only the store and each other's types;
//! `app` composes them; `runs` and `background` work through the `app`.

pub mod app;
pub mod auth;
pub mod background;
pub mod batcher;
pub mod config;
pub mod drift;
pub mod error;
pub mod metrics;
pub mod policy;
pub mod runs;
pub mod serving;
pub mod shadow;
pub mod training;
