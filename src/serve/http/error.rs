//! The API's one error type, and where the failures of the service become HTTP answers.

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::Serialize;
use warp::http::{HeaderValue, StatusCode};
use warp::reply::Response;

use crate::registry::RegistryError;
use crate::serve::service::app::App;
use crate::serve::service::error::{Failure, Kind};
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

impl From<Failure> for ApiError {
    fn from(f: Failure) -> Self {
        let status = match f.kind {
            Kind::Invalid => StatusCode::BAD_REQUEST,
            Kind::Unauthenticated => StatusCode::UNAUTHORIZED,
            Kind::Forbidden => StatusCode::FORBIDDEN,
            Kind::NotFound => StatusCode::NOT_FOUND,
            Kind::Conflict => StatusCode::CONFLICT,
            Kind::Unprocessable => StatusCode::UNPROCESSABLE_ENTITY,
            Kind::TooMany => StatusCode::TOO_MANY_REQUESTS,
            Kind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Kind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let mut e = ApiError::new(status, f.code, f.message);
        if let Some(seconds) = f.retry_after {
            e = e.with_header("retry-after", seconds.to_string());
        }
        if let Some(limit) = f.rate_limit {
            e = e
                .with_header("x-ratelimit-limit", limit.to_string())
                .with_header("x-ratelimit-remaining", "0");
        }
        if let Some(run) = f.run {
            e = e.with_header("location", format!("/training/{run}"));
        }
        e
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        Failure::from(e).into()
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        Failure::from(e).into()
    }
}

/// An error answer with the headers every response carries, for answers outside the routes.
pub fn stamped_error(e: ApiError, request_id: &str) -> Response {
    let mut r = error_response(e, request_id);
    stamp(&mut r, request_id);
    r
}

/// Adds the headers every response carries: its request id, and `nosniff` so that no browser
/// runs a JSON or text answer as a script or page.
pub fn stamp(r: &mut Response, request_id: &str) {
    let h = r.headers_mut();
    h.insert(
        "x-request-id",
        HeaderValue::from_str(request_id).expect("ids are ASCII"),
    );
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
}

pub fn error_response(e: ApiError, request_id: &str) -> Response {
    let mut r = Response::new(
        serde_json::to_vec(&e.body(request_id))
            .expect("errors serialize")
            .into(),
    );
    *r.status_mut() = e.status;
    let h = r.headers_mut();
    h.insert("content-type", HeaderValue::from_static("application/json"));
    for (k, v) in e.headers {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(k, v);
        }
    }
    r
}

/// The answer to a connection over `--max-connections`.
pub fn overloaded(app: &App) -> Response {
    let e = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "overloaded",
        format!(
            "the server has its limit of {} connections open (--max-connections); retry shortly",
            app.config.max_connections
        ),
    )
    .with_header("retry-after", "1");
    stamped_error(e, &app.request_id())
}

/// For the OpenAPI document: the body schema of errors.
pub fn error_schema(g: &mut SchemaGenerator) -> Schema {
    g.subschema_for::<ErrorBody>()
}
