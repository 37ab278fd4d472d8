//! The warp filters built from the table of routes: each request is matched, admitted (its id,
//! its key and its rate limit), handled, and then stamped, counted and logged.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use warp::filters::BoxedFilter;
use warp::http::{HeaderMap, Method, StatusCode};
use warp::hyper::body::{Bytes, HttpBody};
use warp::reply::Response;
use warp::{Filter, Rejection};

use super::context::{Ctx, Handled, Refused};
use super::error::{error_response, stamp, ApiError};
use super::handlers;
use super::listener::ClientAddr;
use super::spec::*;
use crate::serve::service::app::App;
use crate::serve::service::auth::{Caller, Role};

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
                    match authorize(&app, client, &headers, spec.access).await {
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

/// Checks the request's key for the route's access (see [`App::authorize`]).
async fn authorize(
    app: &Arc<App>,
    client: Option<IpAddr>,
    headers: &HeaderMap,
    access: Access,
) -> Result<Option<Caller>, ApiError> {
    let need = match access {
        Access::Public => return Ok(None),
        Access::Key(role) => role,
        Access::Prediction => Role::Predict,
    };
    let open = access == Access::Prediction && app.config.open_prediction;
    let key = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    Ok(Some(app.authorize(client, key, need, open).await?))
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
    let openapi = Bytes::from(super::openapi::document(&app.config).to_string());
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
        .or(e(&OPENAPI)
            .and(warp::any().map(move || openapi.clone()))
            .and_then(answer!(handlers::openapi, Bytes)))
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
                account(&app, start, &method, &mut r);
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

/// Stamps, counts and logs a response.
fn account(app: &App, start: Instant, method: &Method, r: &mut Response) {
    let handled = r.extensions_mut().remove::<Handled>().unwrap_or_else(|| Handled {
        request_id: app.request_id(),
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
        Method::GET | Method::HEAD | Method::POST | Method::PUT | Method::DELETE | Method::PATCH | Method::OPTIONS => {
            method.as_str()
        }
        _ => "OTHER",
    };
    let seconds = start.elapsed().as_secs_f64();
    let status = r.status().as_u16();
    app.metrics.request(&format!("{method_label} {route}"), status, seconds);
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
