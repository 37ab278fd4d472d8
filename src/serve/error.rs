//! The API's one error type, and where the errors of the layers below become HTTP answers.

use schemars::JsonSchema;
use serde::Serialize;
use warp::http::StatusCode;

use crate::registry::RegistryError;
use crate::store::StoreError;

/// An error answered to a client as `{"error": {code, message, request_id}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub headers: Vec<(&'static str, String)>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            headers: Vec::new(),
        }
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// A field of the request that is missing or wrong.
    pub fn field(field: &str, message: impl std::fmt::Display) -> Self {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            format!("`{field}`: {message}"),
        )
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    pub fn body(&self, request_id: &str) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message.clone(),
                request_id: request_id.to_string(),
            },
        }
    }
}

/// The body of every error answer.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ErrorDetail {
    /// A stable, machine-readable code such as `invalid_field` or `rate_limited`.
    pub code: String,
    /// What was wrong and, where there is one, the likely fix.
    pub message: String,
    /// The id of the request, also in its `X-Request-Id` header and in the server's log.
    pub request_id: String,
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!("{e}");
        if e.is_unavailable() {
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage_unavailable",
                "the database cannot take writes now (full disk, read-only file or held lock); \
                 nothing was changed, retry later; the error is logged",
            )
            .with_header("retry-after", "30");
        }
        ApiError::internal("the database failed; the error is logged")
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Store(e) => e.into(),
            RegistryError::NotFound(version) => {
                ApiError::not_found("not_found", format!("no model version `{version}`"))
            }
            e @ RegistryError::AlreadyProduction(_) => {
                ApiError::new(StatusCode::CONFLICT, "already_in_production", e.to_string())
            }
            e @ (RegistryError::Unloadable { .. } | RegistryError::Refused { .. }) => {
                ApiError::new(StatusCode::CONFLICT, "bundle_unavailable", e.to_string())
            }
            e @ RegistryError::Storage { .. } => {
                tracing::error!("{e}");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "storage_unavailable",
                    "the artifact store (--artifacts) cannot be reached; nothing was changed, retry later; the \
                     error is logged",
                )
                .with_header("retry-after", "30")
            }
            e @ (RegistryError::Bundle { .. } | RegistryError::Copy { .. }) => {
                tracing::error!("{e}");
                ApiError::internal("the model registry failed; the error is logged")
            }
        }
    }
}

/// A request refused before its handler ran (authentication, limits, its body), carried through
/// warp's rejections with the request's id.
#[derive(Debug)]
pub struct Refused {
    pub error: ApiError,
    pub request_id: String,
    pub route: &'static super::routes::Spec,
}

impl warp::reject::Reject for Refused {}
