//! Review tables: the rows every stage passes on, stored as Parquet, and the readers for the
//! formats reviews arrive in.

pub mod partition;
pub mod read;
mod reviews;

pub use reviews::{DataError, Reviews, COLUMNS};
