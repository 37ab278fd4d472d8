//! The table of routes and the warp filters built from it. The router, `405` answers with
//! `Allow`, the metrics' route labels, the access log and the OpenAPI document all read
//! [`ROUTES`].

use std::sync::Arc;
use std::time::Instant;

use schemars::{JsonSchema, Schema, SchemaGenerator};
use warp::filters::BoxedFilter;
use warp::http::{HeaderMap, HeaderValue, Method, StatusCode};
use warp::hyper::body::{Bytes, HttpBody};
use warp::reply::Response;
use warp::{Filter, Rejection};

use super::api::*;
use super::error::{ApiError, ErrorBody, Refused};
use super::listener::ClientAddr;
use super::{handlers, App};
use crate::serve::auth::Role;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Get,
    Post,
    Delete,
}

impl Verb {
    /// The methods it answers (`GET` routes answer `HEAD` too).
    fn allows(self, m: &Method) -> bool {
        match self {
            Verb::Get => m == Method::GET || m == Method::HEAD,
            Verb::Post => m == Method::POST,
            Verb::Delete => m == Method::DELETE,
        }
    }

    pub fn allow_header(self) -> &'static str {
        match self {
            Verb::Get => "GET, HEAD",
            Verb::Post => "POST",
            Verb::Delete => "DELETE",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::Post => "post",
            Verb::Delete => "delete",
        }
    }
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Public,
    Key(Role),
    /// A `predict` key, or none when the server runs with `--open-prediction`.
    Prediction,
}

type SchemaFn = fn(&mut SchemaGenerator) -> Schema;

fn schema<T: JsonSchema>(g: &mut SchemaGenerator) -> Schema {
    g.subschema_for::<T>()
}

/// One route: how it is matched and authorized, and how the OpenAPI document describes it.
#[derive(Debug)]
pub struct Spec {
    pub verb: Verb,
    /// The path, with `{name}` for a segment that is a parameter.
    pub path: &'static str,
    pub access: Access,
    pub summary: &'static str,
    /// Whether the OpenAPI document lists it (the JSON API; not the pages or `/metrics`).
    pub documented: bool,
    pub query: Option<SchemaFn>,
    pub request: Option<SchemaFn>,
    pub status: u16,
    pub response: Option<SchemaFn>,
    /// Error statuses it may answer, besides those of its access (`401`, `403`, `429`).
    pub errors: &'static [u16],
    /// Whether those errors answer with the route's own body rather than an error (`/ready`).
    pub errors_with_body: bool,
}

impl Spec {
    /// The path parameters when `path` is this route's (a trailing `/` is ignored).
    fn params(&self, path: &str) -> Option<Vec<String>> {
        let mut params = Vec::new();
        let mut given = path.trim_end_matches('/').split('/');
        for want in self.path.trim_end_matches('/').split('/') {
            let seg = given.next()?;
            if want.starts_with('{') {
                if seg.is_empty() {
                    return None;
                }
                params.push(percent_decode(seg));
            } else if want != seg {
                return None;
            }
        }
        given.next().is_none().then_some(params)
    }
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()
}

const fn route(verb: Verb, path: &'static str, access: Access, summary: &'static str) -> Spec {
    Spec {
        verb,
        path,
        access,
        summary,
        documented: true,
        query: None,
        request: None,
        status: 200,
        response: None,
        errors: &[],
        errors_with_body: false,
    }
}

use Access::{Key, Prediction, Public};
use Verb::{Delete, Get, Post};

pub static PAGE: Spec = Spec {
    documented: false,
    ..route(Get, "/", Public, "The web page")
};
pub static DOCS: Spec = Spec {
    documented: false,
    ..route(Get, "/docs", Public, "Swagger UI over this document")
};
pub static DOCS_FILE: Spec = Spec {
    documented: false,
    ..route(Get, "/docs/{file}", Public, "Swagger UI's files")
};
pub static METRICS: Spec = Spec {
    documented: false,
    ..route(Get, "/metrics", Public, "Prometheus metrics")
};
pub static HEALTH: Spec = Spec {
    response: Some(schema::<Health>),
    ..route(Get, "/health", Public, "Liveness")
};
pub static READY: Spec = Spec {
    response: Some(schema::<Ready>),
    errors: &[503],
    errors_with_body: true,
    ..route(Get, "/ready", Public, "Whether a model is served (503 until one is)")
};
pub static OPENAPI: Spec = Spec {
    response: Some(schema::<OpenApiDocument>),
    ..route(Get, "/openapi.json", Public, "This document")
};
pub static BEST_MODEL_PARAMETER: Spec = Spec {
    query: Some(schema::<ModelQuery>),
    response: Some(schema::<BestModelParameter>),
    errors: &[404],
    ..route(
        Get,
        "/best_model_parameter",
        Key(Role::Predict),
        "Best hyper-parameters behind a served model",
    )
};
pub static PREDICTION: Spec = Spec {
    request: Some(schema::<PredictionRequest>),
    response: Some(schema::<PredictionResponse>),
    errors: &[400, 404, 411, 413, 415, 422, 500, 503],
    ..route(Post, "/prediction", Prediction, "Score one text or a batch")
};
pub static FEEDBACK: Spec = Spec {
    request: Some(schema::<FeedbackRequest>),
    response: Some(schema::<FeedbackResponse>),
    errors: &[400, 404, 409, 411, 413, 415, 503],
    ..route(
        Post,
        "/feedback",
        Prediction,
        "The true label of an earlier prediction (drift monitoring)",
    )
};
pub static PIPELINES: Spec = Spec {
    response: Some(schema::<Pipelines>),
    ..route(
        Get,
        "/pipelines",
        Key(Role::Admin),
        "Pipelines the server can run, with parameters and stages",
    )
};
pub static DRIFT: Spec = Spec {
    query: Some(schema::<DriftQuery>),
    response: Some(schema::<super::drift::DriftOverview>),
    errors: &[400],
    ..route(
        Get,
        "/drift",
        Key(Role::Predict),
        "Drift of each served model's recent predictions against its reference",
    )
};
pub static MODELS: Spec = Spec {
    response: Some(schema::<Models>),
    ..route(Get, "/models", Key(Role::Predict), "Registered model versions")
};
pub static PROMOTE: Spec = Spec {
    response: Some(schema::<Promoted>),
    errors: &[404, 409, 503],
    ..route(
        Post,
        "/models/{version}/promote",
        Key(Role::Admin),
        "Serve this version",
    )
};
pub static SHADOW: Spec = Spec {
    response: Some(schema::<ShadowReport>),
    errors: &[404],
    ..route(
        Get,
        "/models/{version}/shadow",
        Key(Role::Predict),
        "A candidate's shadow figures and where it stands with the promotion gate",
    )
};
pub static REJECT: Spec = Spec {
    response: Some(schema::<Rejected>),
    errors: &[404, 409],
    ..route(
        Post,
        "/models/{version}/reject",
        Key(Role::Admin),
        "Reject a candidate: its shadow traffic and canary end",
    )
};
pub static CANARY: Spec = Spec {
    request: Some(schema::<CanaryRequest>),
    response: Some(schema::<Canary>),
    errors: &[400, 404, 409, 411, 413, 415],
    ..route(
        Post,
        "/models/{version}/canary",
        Key(Role::Admin),
        "Answer a share of its name's predictions with a candidate",
    )
};
pub static CANARY_STOP: Spec = Spec {
    response: Some(schema::<Canary>),
    errors: &[404],
    ..route(
        Delete,
        "/models/{version}/canary",
        Key(Role::Admin),
        "Stop a candidate's canary",
    )
};
pub static TRAINING: Spec = Spec {
    request: Some(schema::<TrainingRequest>),
    status: 202,
    response: Some(schema::<TrainingStarted>),
    errors: &[400, 403, 404, 409, 411, 413, 415, 422, 503],
    ..route(Post, "/training", Key(Role::Admin), "Start a pipeline run")
};
pub static TRAINING_LIST: Spec = Spec {
    query: Some(schema::<TrainingQuery>),
    response: Some(schema::<TrainingRuns>),
    errors: &[400],
    ..route(
        Get,
        "/training",
        Key(Role::Admin),
        "Training runs, newest first, by pipeline, status and trigger",
    )
};
pub static TRAINING_STATUS: Spec = Spec {
    response: Some(schema::<TrainingRun>),
    errors: &[404],
    ..route(Get, "/training/{id}", Key(Role::Admin), "A run's status and stages")
};
pub static TRAINING_LOGS: Spec = Spec {
    response: Some(schema::<TrainingLogs>),
    errors: &[404],
    ..route(Get, "/training/{id}/logs", Key(Role::Admin), "A run's log lines")
};
pub static TRAINING_CANCEL: Spec = Spec {
    response: Some(schema::<TrainingCancelled>),
    errors: &[404, 409, 503],
    ..route(
        Post,
        "/training/{id}/cancel",
        Key(Role::Admin),
        "Cancel a running run (it stops at the engine's next stop check)",
    )
};

/// Every route.
pub static ROUTES: [&Spec; 23] = [
    &PAGE,
    &DOCS,
    &DOCS_FILE,
    &METRICS,
    &HEALTH,
    &READY,
    &OPENAPI,
    &BEST_MODEL_PARAMETER,
    &PREDICTION,
    &FEEDBACK,
    &PIPELINES,
    &DRIFT,
    &MODELS,
    &PROMOTE,
    &SHADOW,
    &REJECT,
    &CANARY,
    &CANARY_STOP,
    &TRAINING,
    &TRAINING_LIST,
    &TRAINING_STATUS,
    &TRAINING_LOGS,
    &TRAINING_CANCEL,
];

/// A request admitted to its route: its id, its path parameters and who sent it.
pub struct Ctx {
    pub app: Arc<App>,
    pub id: String,
    pub spec: &'static Spec,
    /// The request's path, as sent.
    pub path: String,
    pub params: Vec<String>,
    pub headers: HeaderMap,
    pub caller: Option<super::auth::Caller>,
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
struct Handled {
    request_id: String,
    route: Option<&'static Spec>,
    key: Option<String>,
    served: Option<(String, String)>,
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
    fn finish(self, answer: Answer) -> Response {
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
            caller.quota.annotate(&mut r);
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

/// An error answer with the headers every response carries, for answers outside the routes.
pub fn stamped_error(e: ApiError, request_id: &str) -> Response {
    let mut r = error_response(e, request_id);
    stamp(&mut r, request_id);
    r
}

/// Adds the headers every response carries: its request id, and `nosniff` so that no browser
/// runs a JSON or text answer as a script or page.
fn stamp(r: &mut Response, request_id: &str) {
    let h = r.headers_mut();
    h.insert(
        "x-request-id",
        HeaderValue::from_str(request_id).expect("ids are ASCII"),
    );
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
}

fn error_response(e: ApiError, request_id: &str) -> Response {
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

/// Matches `spec` against the request's method and path, then admits it: a request id, and the
/// caller's key checked and rate-limited for the route's access.
fn endpoint(app: &Arc<App>, spec: &'static Spec) -> BoxedFilter<(Ctx,)> {
    let app = app.clone();
    warp::method()
        .and(warp::path::full())
        .and_then(move |m: Method, path: warp::path::FullPath| async move {
            match spec.params(path.as_str()) {
                Some(params) if spec.verb.allows(&m) => Ok((path.as_str().to_string(), params)),
                _ => Err(warp::reject::not_found()),
            }
        })
        .untuple_one()
        .and(warp::ext::optional::<ClientAddr>())
        .and(warp::header::headers_cloned())
        .and_then(
            move |path: String, params: Vec<String>, client: Option<ClientAddr>, headers: HeaderMap| {
                let app = app.clone();
                async move {
                    let id = app.request_id();
                    let client = client.map(|c| c.0.ip());
                    match app.authorize(client, &headers, spec.access).await {
                        Ok(caller) => Ok(Ctx {
                            app,
                            id,
                            spec,
                            path,
                            params,
                            headers,
                            caller,
                        }),
                        Err(error) => Err(warp::reject::custom(Refused {
                            error,
                            request_id: id,
                            route: spec,
                        })),
                    }
                }
            },
        )
        .boxed()
}

/// The body of a request: sized by `Content-Length` (chunked ones are refused with `411`), or
/// none when the request has neither it nor `Transfer-Encoding` (HTTP/1.1's framing), which a
/// route then reports as a missing body if it needs one.
fn body() -> BoxedFilter<(Bytes,)> {
    let sized = warp::body::content_length_limit(MAX_BODY).and(warp::body::bytes());
    let empty = warp::header::headers_cloned().and_then(|h: HeaderMap| async move {
        if h.contains_key("content-length") || h.contains_key("transfer-encoding") {
            Err(warp::reject::not_found())
        } else {
            Ok(Bytes::new())
        }
    });
    sized.or(empty).unify().boxed()
}

fn query() -> BoxedFilter<(String,)> {
    warp::query::raw().or(warp::any().map(String::new)).unify().boxed()
}

/// Largest request body accepted.
pub const MAX_BODY: u64 = 8 * 1024 * 1024;

macro_rules! answer {
    ($handler:expr) => {
        |ctx: Ctx| async move {
            let answer = $handler(&ctx).await;
            Ok::<_, Rejection>(ctx.finish(answer))
        }
    };
    ($handler:expr, $extra:ty) => {
        |ctx: Ctx, extra: $extra| async move {
            let answer = $handler(&ctx, extra).await;
            Ok::<_, Rejection>(ctx.finish(answer))
        }
    };
}

/// Every route of the API; each answer carries a request id, is counted and is logged.
pub fn routes(app: Arc<App>) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let e = |spec| endpoint(&app, spec);
    // Boxed in groups: one unboxed chain of every route is a type the compiler takes many
    // minutes over (its time grows with each `or` link).
    let pages = e(&PAGE)
        .and_then(answer!(handlers::page))
        .or(e(&DOCS).and_then(answer!(handlers::docs)))
        .unify()
        .or(e(&DOCS_FILE).and_then(answer!(handlers::docs)))
        .unify()
        .or(e(&METRICS).and_then(answer!(handlers::metrics)))
        .unify()
        .or(e(&HEALTH).and_then(answer!(handlers::health)))
        .unify()
        .or(e(&READY).and_then(answer!(handlers::ready)))
        .unify()
        .or(e(&OPENAPI).and_then(answer!(handlers::openapi)))
        .unify()
        .boxed();
    let models = e(&BEST_MODEL_PARAMETER)
        .and(query())
        .and_then(answer!(handlers::best_model_parameter, String))
        .or(e(&PREDICTION)
            .and(body())
            .and_then(answer!(handlers::prediction, Bytes)))
        .unify()
        .or(e(&FEEDBACK).and(body()).and_then(answer!(handlers::feedback, Bytes)))
        .unify()
        .or(e(&PIPELINES).and_then(answer!(handlers::pipelines)))
        .unify()
        .or(e(&DRIFT).and(query()).and_then(answer!(handlers::drift, String)))
        .unify()
        .or(e(&MODELS).and_then(answer!(handlers::models)))
        .unify()
        .or(e(&PROMOTE).and_then(answer!(handlers::promote)))
        .unify()
        // Boxed halfway: each `or` nests the filter's type, and long chains type-check slowly.
        .boxed()
        .or(e(&SHADOW).and_then(answer!(handlers::shadow_report)))
        .unify()
        .or(e(&REJECT).and_then(answer!(handlers::reject)))
        .unify()
        .or(e(&CANARY).and(body()).and_then(answer!(handlers::canary, Bytes)))
        .unify()
        .or(e(&CANARY_STOP).and_then(answer!(handlers::canary_stop)))
        .unify()
        .boxed();
    let training = e(&TRAINING)
        .and(body())
        .and_then(answer!(handlers::training, Bytes))
        .or(e(&TRAINING_LIST)
            .and(query())
            .and_then(answer!(handlers::training_list, String)))
        .unify()
        .or(e(&TRAINING_STATUS).and_then(answer!(handlers::training_status)))
        .unify()
        .or(e(&TRAINING_LOGS).and_then(answer!(handlers::training_logs)))
        .unify()
        .or(e(&TRAINING_CANCEL).and_then(answer!(handlers::training_cancel)))
        .unify()
        .boxed();
    let api = pages.or(models).unify().or(training).unify().boxed();
    // A rejection is answered below, where the request's method and path are known.
    let api = api
        .map(Ok)
        .recover(|r| async move { Ok::<_, Rejection>(Err(r)) })
        .unify();
    warp::any()
        .map(Instant::now)
        .and(warp::method())
        .and(warp::path::full())
        .and(api)
        .map(
            move |start: Instant, method: Method, path: warp::path::FullPath, answer: Result<Response, Rejection>| {
                let mut r = answer.unwrap_or_else(|rejection| refused(&app, &method, path.as_str(), rejection));
                app.account(start, &method, &mut r);
                r
            },
        )
}

/// The answer to a request no route admitted: refused by its route, or a path or method that
/// no route has, or a body warp refused.
fn refused(app: &App, method: &Method, path: &str, rejection: Rejection) -> Response {
    if let Some(r) = rejection.find::<Refused>() {
        let mut response = error_response(r.error.clone(), &r.request_id);
        response.extensions_mut().insert(Handled {
            request_id: r.request_id.clone(),
            route: Some(r.route),
            key: None,
            served: None,
        });
        return response;
    }
    let id = app.request_id();
    let e = if rejection.find::<warp::reject::PayloadTooLarge>().is_some() {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is larger than {MAX_BODY} bytes"),
        )
    } else if rejection.find::<warp::reject::LengthRequired>().is_some() {
        ApiError::new(
            StatusCode::LENGTH_REQUIRED,
            "length_required",
            "chunked request bodies are not accepted: send the body with a Content-Length header",
        )
    } else {
        unrouted(method, path)
    };
    let mut response = error_response(e, &id);
    response.extensions_mut().insert(Handled {
        request_id: id,
        // A refused body, or a method the path does not answer, counts under the path's route.
        route: ROUTES
            .iter()
            .find(|s| s.verb.allows(method) && s.params(path).is_some())
            .or_else(|| ROUTES.iter().find(|s| s.params(path).is_some()))
            .copied(),
        key: None,
        served: None,
    });
    response
}

/// `405` with `Allow` when another method has the path, else `404`.
fn unrouted(method: &Method, path: &str) -> ApiError {
    let allowed: Vec<&str> = ROUTES
        .iter()
        .filter(|s| s.params(path).is_some())
        .map(|s| s.verb.allow_header())
        .collect();
    if allowed.is_empty() {
        return ApiError::not_found("not_found", format!("no route {path}; see /openapi.json"));
    }
    let allow = allowed.join(", ");
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {path}; use {allow}"),
    )
    .with_header("allow", allow)
}

impl App {
    /// Stamps, counts and logs a response.
    fn account(&self, start: Instant, method: &Method, r: &mut Response) {
        let handled = r.extensions_mut().remove::<Handled>().unwrap_or_else(|| Handled {
            request_id: self.request_id(),
            route: None,
            key: None,
            served: None,
        });
        stamp(r, &handled.request_id);
        let route = match handled.route {
            Some(spec) => spec.path,
            None => "other",
        };
        let method_label = match *method {
            Method::GET
            | Method::HEAD
            | Method::POST
            | Method::PUT
            | Method::DELETE
            | Method::PATCH
            | Method::OPTIONS => method.as_str(),
            _ => "OTHER",
        };
        let seconds = start.elapsed().as_secs_f64();
        let status = r.status().as_u16();
        self.metrics
            .request(&format!("{method_label} {route}"), status, seconds);
        let bytes = r.body().size_hint().exact().unwrap_or(0);
        let (model, version) = match &handled.served {
            Some((m, v)) => (Some(m.as_str()), Some(v.as_str())),
            None => (None, None),
        };
        tracing::info!(
            target: "sentiflow::access",
            request_id = %handled.request_id,
            method = method_label,
            route,
            status,
            duration_ms = (seconds * 1e6).round() / 1e3,
            bytes,
            key = handled.key.as_deref(),
            model,
            version,
            "request"
        );
    }
}

/// For the OpenAPI document: the body schema of errors.
pub fn error_schema(g: &mut SchemaGenerator) -> Schema {
    g.subschema_for::<ErrorBody>()
}
