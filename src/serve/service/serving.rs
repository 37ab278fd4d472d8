//! A model being served: its registry row, its bundle, the batching worker of an ONNX model and
//! its drift window.

use super::batcher::{BatchError, Batcher};
use super::drift::Monitor;
use super::error::{Failure, Kind};
use crate::drift::Sample;
use crate::models::bundle::Bundle;
use crate::store::ModelRow;

/// A model being served.
pub struct Serving {
    pub row: ModelRow,
    pub bundle: Bundle,
    /// The batching worker of an ONNX model.
    pub batcher: Option<Batcher>,
    pub monitor: Monitor,
}

impl Serving {
    /// Scores `texts` on the model's batching worker (ONNX models).
    pub async fn predict_batched(&self, texts: &[String]) -> Result<Vec<Sample>, Failure> {
        let batcher = self.batcher.as_ref().expect("ONNX models have a batcher");
        // The worker thread needs texts it owns.
        let samples = batcher.predict(texts.to_vec()).await.map_err(|e| match e {
            BatchError::Busy => Failure::new(
                Kind::Unavailable,
                "busy",
                format!("model `{}` has a full queue; retry shortly", self.row.name),
            )
            .retry_after(1),
            BatchError::Failed(reason) => {
                tracing::error!("model {} {}: {reason}", self.row.name, self.row.version);
                Failure::internal(format!("model `{}` failed: {reason}", self.row.name))
            }
        })?;
        self.monitor.record(&samples);
        Ok(samples)
    }

    /// Scores `texts` in the calling thread (TF-IDF models).
    pub fn predict_now(&self, texts: &[String]) -> Result<Vec<Sample>, Failure> {
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let samples = self.bundle.model.predict(&refs).map_err(|e| {
            tracing::error!("model {} {}: {e}", self.row.name, self.row.version);
            Failure::internal(format!("model `{}` failed: {e}", self.row.name))
        })?;
        self.monitor.record(&samples);
        Ok(samples)
    }
}
