//! What tracking fails with.

#[derive(Debug, thiserror::Error)]
pub enum TrackingError {
    #[error("MLflow at {url}: {message}")]
    Http { url: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}
