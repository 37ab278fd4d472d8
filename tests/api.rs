//! The HTTP API through the real binary on an ephemeral port, over real HTTP.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{http, key, quickstart, Response, Server};
use serde_json::{json, Value};

fn bearer(k: &str) -> String {
    format!("Bearer {k}")
}

fn post(s: &Server, path: &str, key: &str, body: &Value) -> Response {
    let auth = bearer(key);
    http(
        &s.addr,
        "POST",
        path,
        &[("Authorization", &auth), ("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
}

fn get(s: &Server, path: &str, key: &str) -> Response {
    let auth = bearer(key);
    http(&s.addr, "GET", path, &[("Authorization", &auth)], b"")
}

/// Starts a training run of `pipeline` and waits for it to end; returns the run.
fn train(s: &Server, admin: &str, body: Value) -> Value {
    let r = post(s, "/training", admin, &body);
    assert_eq!(r.status, 202, "{}", r.body);
    let location = r.header("location").unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let run = get(s, &location, admin).json();
        if run["status"] != "running" {
            return run;
        }
        assert!(Instant::now() < deadline, "training did not finish: {run}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_error(r: &Response, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.body);
    let body = r.json();
    assert_eq!(body["error"]["code"], code, "{}", r.body);
    assert!(!body["error"]["message"].as_str().unwrap().is_empty());
    assert_eq!(
        body["error"]["request_id"].as_str(),
        r.header("x-request-id"),
        "the request id is in the body and a header"
    );
}

const REVIEW: &str = "I went in expecting little and came out moved. The performances are superb, the script is sharp and funny, and the final act is beautiful. One of the best films of the year.";

#[test]
fn train_predict_and_inspect_over_http() {
    let p = quickstart();
    let (admin, predictor) = (key(&p, "admin"), key(&p, "predict"));
    let s = Server::start(&p, &[]);

    assert_eq!(
        http(&s.addr, "GET", "/health", &[], b"").status,
        200,
        "health needs no key"
    );
    assert_eq!(http(&s.addr, "GET", "/ready", &[], b"").status, 503, "no model yet");
    let r = post(&s, "/prediction", &predictor, &json!({"text": REVIEW}));
    assert_error(&r, 404, "model_not_found");

    let run = train(&s, &admin, json!({"pipeline": "quickstart"}));
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["stages"]["export_tfidf"]["state"], "ran");
    assert!(run["stages"]["train"]["metrics"]["accuracy"].as_f64().unwrap() > 0.5);
    let id = run["id"].as_str().unwrap();
    let logs = get(&s, &format!("/training/{id}/logs"), &admin).json();
    assert!(
        logs["lines"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["line"].as_str().unwrap().contains("promoted")),
        "{logs}"
    );

    assert_eq!(http(&s.addr, "GET", "/ready", &[], b"").status, 200);
    let r = post(&s, "/prediction", &predictor, &json!({"text": REVIEW}));
    assert_eq!(r.status, 200, "{}", r.body);
    let single = r.json();
    assert_eq!(single["label"], "positive");
    assert_eq!(single["model"], "tfidf");
    let score = single["score"].as_f64().unwrap();
    assert!((single["probabilities"]["positive"].as_f64().unwrap() - score).abs() < 1e-12);

    let r = post(
        &s,
        "/prediction",
        &predictor,
        &json!({"texts": [REVIEW, "Dreadful, boring and far too long. Avoid."]}),
    );
    let batch = r.json();
    assert_eq!(batch["predictions"][1]["label"], "negative", "{batch}");
    assert_eq!(batch["version"], single["version"]);

    let best = get(&s, "/best_model_parameter", &predictor).json();
    assert_eq!(best["version"], single["version"]);
    assert_eq!(best["pipeline"], "quickstart");
    assert_eq!(best["run_id"], id);
    assert!(best["parameters"]["model"]["C"].is_number(), "{best}");
    assert_eq!(best["cv"]["folds"], 3);
    let models = get(&s, "/models", &predictor).json();
    assert_eq!(models["models"][0]["status"], "production");

    let metrics = http(&s.addr, "GET", "/metrics", &[], b"").body;
    assert!(
        metrics.contains("sentiflow_requests_total{route=\"POST /prediction\",status=\"200\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sentiflow_predictions_total{model=\"tfidf\""),
        "{metrics}"
    );
    assert!(
        metrics.contains("sentiflow_training_runs_total{outcome=\"succeeded\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sentiflow_request_duration_seconds_bucket{route=\"POST /prediction\",le=\"+Inf\"} 3"),
        "{metrics}"
    );

    let doc = http(&s.addr, "GET", "/openapi.json", &[], b"").json();
    assert_eq!(doc["openapi"], "3.1.0");
    for path in ["/best_model_parameter", "/prediction", "/training"] {
        assert!(doc["paths"][path].is_object(), "{path} is documented");
    }
}

#[test]
fn bad_requests_get_clear_json_errors_and_the_server_keeps_serving() {
    let p = quickstart();
    let (admin, predictor) = (key(&p, "admin"), key(&p, "predict"));
    let s = Server::start(&p, &["--max-text-chars", "2000"]);
    assert_eq!(
        train(&s, &admin, json!({"pipeline": "quickstart"}))["status"],
        "succeeded"
    );

    assert_error(
        &http(
            &s.addr,
            "POST",
            "/prediction",
            &[("Content-Type", "application/json")],
            b"{\"text\":\"x\"}",
        ),
        401,
        "unauthorized",
    );
    assert_error(
        &post(&s, "/prediction", "sf_not_a_key", &json!({"text": "x"})),
        401,
        "unauthorized",
    );
    assert_error(
        &post(&s, "/training", &predictor, &json!({"pipeline": "quickstart"})),
        403,
        "forbidden",
    );
    assert_error(&get(&s, "/models", "wrong"), 401, "unauthorized");

    let auth = bearer(&predictor);
    let r = http(
        &s.addr,
        "POST",
        "/prediction",
        &[("Authorization", &auth), ("Content-Type", "text/plain")],
        b"hello",
    );
    assert_error(&r, 415, "unsupported_media_type");
    let r = http(
        &s.addr,
        "POST",
        "/prediction",
        &[("Authorization", &auth), ("Content-Type", "application/json")],
        b"{\"text\": ",
    );
    assert_error(&r, 400, "malformed_json");
    assert_error(
        &post(&s, "/prediction", &predictor, &json!({"txt": "hello"})),
        400,
        "invalid_field",
    );
    let r = post(&s, "/prediction", &predictor, &json!({"texts": ["fine", 3]}));
    assert_error(&r, 400, "invalid_field");
    assert!(r.body.contains("texts[1]"), "the field is named: {}", r.body);
    assert_error(
        &post(&s, "/prediction", &predictor, &json!({"text": "   "})),
        422,
        "empty_text",
    );
    assert_error(
        &post(&s, "/prediction", &predictor, &json!({"text": "long ".repeat(500)})),
        422,
        "text_too_long",
    );
    assert_error(
        &post(&s, "/prediction", &predictor, &json!({"texts": vec!["ok"; 65]})),
        422,
        "invalid_batch",
    );
    assert_error(
        &post(&s, "/prediction", &predictor, &json!({"text": "ok", "model": "nope"})),
        404,
        "model_not_found",
    );
    assert_error(
        &post(&s, "/training", &admin, &json!({"pipeline": "../pipelines/quickstart"})),
        404,
        "pipeline_not_found",
    );
    assert_error(
        &post(
            &s,
            "/training",
            &admin,
            &json!({"pipeline": "quickstart", "params": {"nope": 1}}),
        ),
        404,
        "unknown_parameter",
    );
    assert_error(
        &post(
            &s,
            "/training",
            &admin,
            &json!({"pipeline": "quickstart", "stages": ["nope"]}),
        ),
        404,
        "unknown_stage",
    );
    assert_error(
        &post(&s, "/prediction", &predictor, &json!({"text": "ok", "extra": 1})),
        400,
        "invalid_field",
    );
    assert_error(
        &post(&s, "/prediction", &predictor, &json!({"text": "ok", "model": null})),
        400,
        "invalid_field",
    );
    let r = http(
        &s.addr,
        "DELETE",
        "/prediction",
        &[("Authorization", &bearer(&admin))],
        b"",
    );
    assert_error(&r, 405, "method_not_allowed");
    assert_eq!(r.header("allow"), Some("POST"));
    assert_error(&get(&s, "/training/run-unknown", &admin), 404, "not_found");
    assert_error(&get(&s, "/nowhere", &admin), 404, "not_found");
    let r = http(
        &s.addr,
        "POST",
        "/prediction",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
            ("Content-Length", "9000000"),
        ],
        b"",
    );
    assert_error(&r, 413, "payload_too_large");

    let r = post(&s, "/prediction", &predictor, &json!({"text": REVIEW}));
    assert_eq!(r.status, 200, "still serving after bad requests: {}", r.body);
}

#[test]
fn keys_are_listed_without_secrets_and_a_revoked_key_is_refused_at_once() {
    let p = quickstart();
    let r = p.sentiflow(&["keys", "create", "--role", "predict", "--label", "dashboard"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let dashboard = r.stdout.trim().to_string();
    let other = key(&p, "predict");
    let s = Server::start(&p, &[]);
    assert_eq!(get(&s, "/models", &dashboard).status, 200);
    assert_eq!(get(&s, "/models", &other).status, 200);

    let listed = p.sentiflow(&["keys", "list", "--json"]);
    assert_eq!(listed.code, 0, "{}", listed.stderr);
    assert!(
        !listed.stdout.contains(&dashboard) && !listed.stdout.contains(&other),
        "no key is ever shown again"
    );
    let keys = listed.json();
    assert_eq!(keys[0]["label"], "dashboard");
    assert!(keys[0]["last_used_at"].is_string(), "use is recorded: {keys}");
    assert!(keys[0]["revoked_at"].is_null());

    let r = p.sentiflow(&["keys", "revoke", "dashboard"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_error(&get(&s, "/models", &dashboard), 401, "unauthorized");
    assert_eq!(get(&s, "/models", &other).status, 200, "other keys keep working");
    assert!(p.sentiflow(&["keys", "list", "--json"]).json()[0]["revoked_at"].is_string());
    let r = p.sentiflow(&["keys", "revoke", "dashbord"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("did you mean `dashboard`?"), "{}", r.stderr);
}

#[test]
fn rate_limits_answer_429_with_retry_after() {
    let p = quickstart();
    let predictor = key(&p, "predict");
    let s = Server::start(&p, &["--predict-rps", "5"]);
    let statuses: Vec<Response> = (0..8).map(|_| get(&s, "/models", &predictor)).collect();
    assert!(statuses[..5].iter().all(|r| r.status == 200), "the burst is the rate");
    let limited = statuses
        .iter()
        .find(|r| r.status == 429)
        .expect("a request over the limit");
    assert_error(limited, 429, "rate_limited");
    assert!(limited.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(limited.header("x-ratelimit-limit"), Some("5"));
    assert_eq!(
        http(&s.addr, "GET", "/health", &[], b"").status,
        200,
        "health is not limited"
    );
}

#[test]
fn one_run_per_pipeline_and_state_survives_restarts() {
    let p = quickstart();
    p.write(
        "pipelines/slow.yaml",
        "name: slow\nstages:\n  wait: {uses: command, with: {run: 'echo started; sleep 30; echo done > out/w', outs: [out/w]}}\n",
    );
    let admin = key(&p, "admin");
    let mut s = Server::start(&p, &[]);
    assert_eq!(
        train(&s, &admin, json!({"pipeline": "quickstart"}))["status"],
        "succeeded"
    );
    let version = get(&s, "/models", &admin).json()["models"][0]["version"].clone();

    let r = post(&s, "/training", &admin, &json!({"pipeline": "slow"}));
    assert_eq!(r.status, 202);
    let id = r.json()["id"].as_str().unwrap().to_string();
    let r = post(&s, "/training", &admin, &json!({"pipeline": "slow"}));
    assert_error(&r, 409, "already_running");
    assert!(r.json()["error"]["message"].as_str().unwrap().contains(&id));

    // SIGTERM while training: the server stops promptly and records the run as interrupted.
    let clock = Instant::now();
    assert!(s.stop().success());
    assert!(clock.elapsed() < Duration::from_secs(15));
    let s = Server::start(&p, &[]);
    let run = get(&s, &format!("/training/{id}"), &admin).json();
    assert_eq!(run["status"], "interrupted", "{run}");
    assert_eq!(get(&s, "/models", &admin).json()["models"][0]["version"], version);
    assert_eq!(
        http(&s.addr, "GET", "/ready", &[], b"").status,
        200,
        "the production model is served again"
    );
    let r = post(&s, "/prediction", &admin, &json!({"text": REVIEW}));
    assert_eq!(r.json()["version"], version);
}

#[test]
fn promotion_under_load_fails_no_request() {
    let p = quickstart();
    let admin = key(&p, "admin");
    let s = Server::start(
        &p,
        &["--no-auto-promote", "--predict-rps", "100000", "--admin-rps", "100000"],
    );
    // Two versions: the same pipeline with two seeds; the first is promoted by hand.
    assert_eq!(
        train(&s, &admin, json!({"pipeline": "quickstart", "params": {"seed": 1}}))["status"],
        "succeeded"
    );
    assert_eq!(
        train(&s, &admin, json!({"pipeline": "quickstart", "params": {"seed": 2}}))["status"],
        "succeeded"
    );
    let models = get(&s, "/models", &admin).json();
    let versions: Vec<String> = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["version"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(versions.len(), 2, "{models}");
    assert_eq!(
        post(&s, &format!("/models/{}/promote", versions[0]), &admin, &json!({})).status,
        200
    );

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (addr, admin, stop, failures, seen) = (
                s.addr.clone(),
                admin.clone(),
                stop.clone(),
                failures.clone(),
                seen.clone(),
            );
            std::thread::spawn(move || {
                let auth = bearer(&admin);
                let body = json!({"text": REVIEW}).to_string();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) && n < 2000 {
                    let r = http(
                        &addr,
                        "POST",
                        "/prediction",
                        &[("Authorization", &auth), ("Content-Type", "application/json")],
                        body.as_bytes(),
                    );
                    if r.status != 200 {
                        failures.fetch_add(1, Ordering::Relaxed);
                    } else {
                        let answer = r.json();
                        let version = answer["version"].as_str().unwrap().to_string();
                        seen.lock().unwrap().insert((version, answer["score"].to_string()));
                    }
                    n += 1;
                }
            })
        })
        .collect();
    for i in 0..10 {
        std::thread::sleep(Duration::from_millis(30));
        let r = post(
            &s,
            &format!("/models/{}/promote", versions[(i + 1) % 2]),
            &admin,
            &json!({}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "no request failed during promotions"
    );
    // Both versions were served, each always with its own model's score.
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_ne!(seen.iter().next().unwrap().0, seen.iter().last().unwrap().0, "{seen:?}");
}

#[test]
fn a_killed_server_loses_nothing_committed() {
    let p = quickstart();
    p.write(
        "pipelines/slow.yaml",
        "name: slow\nstages:\n  wait: {uses: command, with: {run: 'sleep 5; echo done > out/w', outs: [out/w]}}\n",
    );
    let admin = key(&p, "admin");
    // Settings can come from a config file.
    p.write("sentiflow.yaml", "admin_rps: 500\nmax_batch: 3\n");
    let mut s = Server::start(&p, &["--config", "sentiflow.yaml"]);
    assert_eq!(
        train(&s, &admin, json!({"pipeline": "quickstart"}))["status"],
        "succeeded"
    );
    assert_error(
        &post(&s, "/prediction", &admin, &json!({"texts": ["a", "b", "c", "d"]})),
        422,
        "invalid_batch",
    );
    assert_eq!(get(&s, "/models", &admin).header("x-ratelimit-limit"), Some("500"));
    let r = post(&s, "/training", &admin, &json!({"pipeline": "slow"}));
    let id = r.json()["id"].as_str().unwrap().to_string();
    s.child.kill().unwrap(); // SIGKILL: no shutdown code runs
    s.child.wait().unwrap();

    let s = Server::start(&p, &[]);
    let run = get(&s, &format!("/training/{id}"), &admin).json();
    assert_eq!(run["status"], "interrupted", "{run}");
    assert_eq!(get(&s, "/models", &admin).json()["models"].as_array().unwrap().len(), 1);
    assert_eq!(post(&s, "/prediction", &admin, &json!({"text": REVIEW})).status, 200);
}
