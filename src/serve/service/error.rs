//! What the service refuses or fails at, said without HTTP: the HTTP face maps each [`Kind`] to
//! a status and the hints to headers.

use crate::registry::RegistryError;
use crate::store::StoreError;

/// The sort of failure, which decides how a client should react.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A field of the request is missing or wrong.
    Invalid,
    /// No key, or an unknown one.
    Unauthenticated,
    /// The key's role does not allow it, or the data is out of bounds.
    Forbidden,
    NotFound,
    /// The state of a model or a run does not allow it now.
    Conflict,
    /// Well formed, yet it cannot be done (a pipeline that does not validate).
    Unprocessable,
    /// Too many requests: a rate limit, or too many unknown keys.
    TooMany,
    /// A part it needs (the database, the artifact store, a model's queue) cannot take it now.
    Unavailable,
    Internal,
}

/// A request the service refused or failed, with a stable `code` and a message that says what
/// was wrong and, where there is one, the likely fix.
#[derive(Debug, Clone)]
pub struct Failure {
    pub kind: Kind,
    pub code: &'static str,
    pub message: String,
    /// Seconds after which the same request may succeed.
    pub retry_after: Option<u64>,
    /// The rate limit that was exceeded, in requests per second.
    pub rate_limit: Option<u32>,
    /// The training run in the way.
    pub run: Option<String>,
}

impl Failure {
    pub fn new(kind: Kind, code: &'static str, message: impl Into<String>) -> Self {
        Failure {
            kind,
            code,
            message: message.into(),
            retry_after: None,
            rate_limit: None,
            run: None,
        }
    }

    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// A field of the request that is missing or wrong.
    pub fn field(field: &str, message: impl std::fmt::Display) -> Self {
        Failure::new(Kind::Invalid, "invalid_field", format!("`{field}`: {message}"))
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Failure::new(Kind::NotFound, code, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Failure::new(Kind::Internal, "internal", message)
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        tracing::error!("{e}");
        if e.is_unavailable() {
            return Failure::new(
                Kind::Unavailable,
                "storage_unavailable",
                "the database cannot take writes now (full disk, read-only file or held lock); \
                 nothing was changed, retry later; the error is logged",
            )
            .retry_after(30);
        }
        Failure::internal("the database failed; the error is logged")
    }
}

impl From<RegistryError> for Failure {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Store(e) => e.into(),
            RegistryError::NotFound(version) => {
                Failure::not_found("not_found", format!("no model version `{version}`"))
            }
            e @ RegistryError::AlreadyProduction(_) => {
                Failure::new(Kind::Conflict, "already_in_production", e.to_string())
            }
            e @ (RegistryError::Unloadable { .. } | RegistryError::Refused { .. }) => {
                Failure::new(Kind::Conflict, "bundle_unavailable", e.to_string())
            }
            e @ RegistryError::Storage { .. } => {
                tracing::error!("{e}");
                Failure::new(
                    Kind::Unavailable,
                    "storage_unavailable",
                    "the artifact store (--artifacts) cannot be reached; nothing was changed, retry later; the \
                     error is logged",
                )
                .retry_after(30)
            }
            e @ (RegistryError::Bundle { .. } | RegistryError::Copy { .. }) => {
                tracing::error!("{e}");
                Failure::internal("the model registry failed; the error is logged")
            }
        }
    }
}
