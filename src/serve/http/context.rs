//! A request admitted to its route ([`Ctx`]) and a handler's answer ([`Reply`]) before it
//! becomes a response.

use std::sync::Arc;

use warp::http::{HeaderMap, HeaderValue, StatusCode};
use warp::hyper::body::Bytes;
use warp::reply::Response;

use super::error::{error_response, ApiError};
use super::spec::Spec;
use crate::serve::service::app::App;
use crate::serve::service::auth::Caller;

/// A request admitted to its route: its id, its path parameters and who sent it.
pub struct Ctx {
    pub app: Arc<App>,
    pub id: String,
    pub spec: &'static Spec,
    /// The request's path, as sent.
    pub path: String,
    pub params: Vec<String>,
    pub headers: HeaderMap,
    pub caller: Option<Caller>,
}

/// A handler's answer before it becomes a response.
pub struct Reply {
    status: StatusCode,
    body: Bytes,
    content_type: HeaderValue,
    headers: Vec<(&'static str, String)>,
    /// The model and version that answered a prediction, for the access log.
    served: Option<(String, String)>,
}

impl Reply {
    pub fn json<T: serde::Serialize>(body: &T) -> Reply {
        Reply::with_type(
            HeaderValue::from_static("application/json"),
            serde_json::to_vec(body).expect("API bodies serialize"),
        )
    }

    pub fn with_type(content_type: HeaderValue, body: impl Into<Bytes>) -> Reply {
        Reply {
            status: StatusCode::OK,
            body: body.into(),
            content_type,
            headers: Vec::new(),
            served: None,
        }
    }

    pub fn status(mut self, status: StatusCode) -> Reply {
        self.status = status;
        self
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Reply {
        self.headers.push((name, value.into()));
        self
    }

    pub fn served(mut self, model: &str, version: &str) -> Reply {
        self.served = Some((model.to_string(), version.to_string()));
        self
    }
}

pub type Answer = Result<Reply, ApiError>;

/// What the access log and the metrics need of a handled request, carried on its response.
#[derive(Clone)]
pub struct Handled {
    pub request_id: String,
    pub route: Option<&'static Spec>,
    pub key: Option<String>,
    pub served: Option<(String, String)>,
}

impl Ctx {
    /// Path parameter `i` (by position in the template).
    pub fn param(&self, i: usize) -> &str {
        &self.params[i]
    }

    /// Runs `work` on tokio's blocking threads: the database, files and models never hold up
    /// the threads that serve connections. A database that cannot be reached fails it within
    /// [`crate::store::REQUEST_WAIT`].
    pub async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&App) -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        let app = self.app.clone();
        tokio::task::spawn_blocking(move || crate::store::with_request_wait(|| work(&app)))
            .await
            .map_err(|e| {
                tracing::error!("request {}: {e}", self.id);
                ApiError::internal("the request's work failed; the error is logged")
            })
    }

    /// The request's query as `T` (percent-decoded).
    pub fn query<T: serde::de::DeserializeOwned>(&self, raw: &str) -> Result<T, ApiError> {
        serde_urlencoded::from_str(raw).map_err(|e| ApiError::field("query", e))
    }

    /// The body as `T`: a JSON object sent with `Content-Type: application/json`; a field that is
    /// wrong is named by its path.
    pub fn json<T: serde::de::DeserializeOwned>(&self, body: &Bytes) -> Result<T, ApiError> {
        if body.is_empty() {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "missing_body",
                "the body is empty: send a JSON object with `Content-Type: application/json`",
            ));
        }
        let ctype = self
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let essence = ctype.split(';').next().unwrap_or("").trim();
        if !essence.eq_ignore_ascii_case("application/json") {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!("send `Content-Type: application/json` (got `{ctype}`)"),
            ));
        }
        let malformed = |message: String| ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", message);
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(malformed("the body must be a JSON object".into()));
        }
        // One pass from the bytes: syntax errors are a broken body, data errors a wrong field.
        let mut de = serde_json::Deserializer::from_slice(body);
        let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let inner = e.inner();
            if inner.is_syntax() || inner.is_eof() {
                return malformed(format!("the body is not valid JSON: {inner}"));
            }
            let message = inner.to_string();
            // A missing field is reported at the body's root (`.`): name the field instead.
            let field = match message.strip_prefix("missing field `") {
                Some(rest) => rest.split('`').next().unwrap_or_default().to_string(),
                None => match message.strip_prefix("unknown field `") {
                    Some(rest) => rest.split('`').next().unwrap_or_default().to_string(),
                    None => e.path().to_string(),
                },
            };
            ApiError::field(&field, message)
        })?;
        de.end()
            .map_err(|e| malformed(format!("the body is not valid JSON: {e}")))?;
        Ok(value)
    }

    /// The response of `answer`, with the headers every response carries.
    pub fn finish(self, answer: Answer) -> Response {
        let key = self.caller.as_ref().map(|c| c.name());
        let (mut r, served) = match answer {
            Ok(reply) => {
                let mut r = Response::new(reply.body.into());
                *r.status_mut() = reply.status;
                let h = r.headers_mut();
                h.insert("content-type", reply.content_type);
                for (k, v) in reply.headers {
                    if let Ok(v) = HeaderValue::from_str(&v) {
                        h.insert(k, v);
                    }
                }
                (r, reply.served)
            }
            Err(e) => (error_response(e, &self.id), None),
        };
        if let Some(caller) = &self.caller {
            let h = r.headers_mut();
            h.insert("x-ratelimit-limit", caller.quota.limit.into());
            h.insert("x-ratelimit-remaining", caller.quota.remaining.into());
        }
        r.extensions_mut().insert(Handled {
            request_id: self.id,
            route: Some(self.spec),
            key,
            served,
        });
        r
    }
}

/// A request refused before its handler ran (authentication, limits, its body), carried through
/// warp's rejections with the request's id.
#[derive(Debug)]
pub struct Refused {
    pub error: ApiError,
    pub request_id: String,
    pub route: &'static Spec,
}

impl warp::reject::Reject for Refused {}
