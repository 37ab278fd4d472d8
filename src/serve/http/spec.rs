//! The table of routes. The router, `405` answers with `Allow`, the metrics' route labels, the
//! access log and the OpenAPI document all read [`ROUTES`].

use schemars::{JsonSchema, Schema, SchemaGenerator};
use warp::http::Method;

use super::api::*;
use crate::serve::service::auth::Role;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Get,
    Post,
    Delete,
}

impl Verb {
    /// The methods it answers (`GET` routes answer `HEAD` too).
    pub fn allows(self, m: &Method) -> bool {
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
    pub fn params(&self, path: &str) -> Option<Vec<String>> {
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
    response: Some(schema::<crate::serve::service::drift::DriftOverview>),
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
