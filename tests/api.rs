//! The HTTP API through the real binary on an ephemeral port, over real HTTP.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{exchange, http, key, post, quickstart, Project, Response, Server};
use serde_json::{json, Value};

fn bearer(k: &str) -> String {
    format!("Bearer {k}")
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

/// The container's layout: `data/`, `models/` and `reports/` are links into a volume outside
/// the project root. Without `--output-dirs` every training is refused (and says why in its
/// log); with the volume allowed, the quickstart trains and serves.
#[test]
fn a_project_whose_output_directories_link_into_a_volume_trains_when_the_volume_is_allowed() {
    let p = quickstart();
    let volume = tempfile::tempdir().unwrap();
    for d in ["data", "models", "reports"] {
        std::fs::create_dir_all(volume.path().join(d)).unwrap();
        std::os::unix::fs::symlink(volume.path().join(d), p.path(d)).unwrap();
    }
    let admin = key(&p, "admin");

    let s = Server::start(&p, &[]);
    let run = train(&s, &admin, json!({"pipeline": "quickstart"}));
    assert_eq!(run["status"], "failed", "{run}");
    let id = run["id"].as_str().unwrap();
    let logs = get(&s, &format!("/training/{id}/logs"), &admin).json();
    let lines: Vec<&str> = logs["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["line"].as_str().unwrap())
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("error: ") && l.contains("outside the project root") && l.contains("--output-dirs")),
        "the stage's error is in the run's log: {lines:?}"
    );
    drop(s);

    let allowed = volume.path().to_string_lossy().into_owned();
    let s = Server::start(&p, &["--output-dirs", &allowed]);
    let run = train(&s, &admin, json!({"pipeline": "quickstart"}));
    assert_eq!(run["status"], "succeeded", "{run}");
    assert!(volume.path().join("models/quickstart/tfidf/manifest.json").is_file());
    let r = post(&s, "/prediction", &admin, &json!({"text": REVIEW}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["label"], "positive");
}

/// A registered copy whose bytes changed on disk is never promoted nor served: every load checks
/// the files against the manifest, as a download from object storage does.
#[test]
fn a_damaged_registry_copy_is_refused() {
    let p = quickstart();
    let admin = key(&p, "admin");
    let s = Server::start(&p, &["--no-auto-promote"]);
    for seed in [1, 2] {
        let run = train(&s, &admin, json!({"pipeline": "quickstart", "params": {"seed": seed}}));
        assert_eq!(run["status"], "succeeded", "{run}");
    }
    let models = get(&s, "/models", &admin).json();
    let rows = models["models"].as_array().unwrap();
    let (v2, v1) = (&rows[0], &rows[1]);
    let r = post(
        &s,
        &format!("/models/{}/promote", v1["version"].as_str().unwrap()),
        &admin,
        &json!({}),
    );
    assert_eq!(r.status, 200, "{}", r.body);

    let weights = std::path::Path::new(v2["path"].as_str().unwrap()).join("weights.bin");
    let mut bytes = std::fs::read(&weights).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&weights, bytes).unwrap();
    let r = post(
        &s,
        &format!("/models/{}/promote", v2["version"].as_str().unwrap()),
        &admin,
        &json!({}),
    );
    assert_error(&r, 409, "bundle_unavailable");
    assert!(
        r.body.contains("weights.bin") && r.body.contains("register the bundle again"),
        "{}",
        r.body
    );
    let answer = post(&s, "/prediction", &admin, &json!({"text": REVIEW})).json();
    assert_eq!(answer["version"], v1["version"], "production is unchanged");
}

/// What a Python client generated by `openapi-python-client` from `/openapi.json` does: it is
/// generated without a warning, and it predicts and reads typed models, runs and parameters.
const GENERATED_CLIENT_CHECK: &str = r#"
import sys
from client import AuthenticatedClient
from client.api.default import get_best_model_parameter, get_models, get_training_id, post_prediction
from client.models import (
    BestModelParameter,
    ModelEntry,
    PredictionRequest,
    PredictionResponse,
    TfidfParameters,
    TrainingRun,
)

base, key, run_id, text = sys.argv[1:]
c = AuthenticatedClient(base_url=base, token=key)
answer = post_prediction.sync(client=c, body=PredictionRequest(text=text))
assert isinstance(answer, PredictionResponse), answer
best = get_best_model_parameter.sync(client=c)
assert isinstance(best, BestModelParameter) and isinstance(best.parameters, TfidfParameters), best
assert best.validation["accuracy"] > 0.5, best.validation
row = get_models.sync(client=c).models[0]
assert isinstance(row, ModelEntry) and row.tuning.folds == 3, row
run = get_training_id.sync(run_id, client=c)
assert isinstance(run, TrainingRun) and run.stages["train"].metrics["accuracy"] > 0.5, run
print(answer.label, answer.version)
"#;

#[test]
fn a_python_client_generated_from_the_openapi_document_predicts() {
    let p = quickstart();
    let admin = key(&p, "admin");
    let s = Server::start(&p, &[]);
    let run = train(&s, &admin, json!({"pipeline": "quickstart"}));
    assert_eq!(run["status"], "succeeded", "{run}");

    let dir = tempfile::tempdir().unwrap();
    let document = http(&s.addr, "GET", "/openapi.json", &[], b"").body;
    std::fs::write(dir.path().join("openapi.json"), document).unwrap();
    // The generator formats what it writes with ruff, from the same environment.
    let bin = common::python().parent().unwrap().to_path_buf();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let out = std::process::Command::new(bin.join("openapi-python-client"))
        .args([
            "generate",
            "--path",
            "openapi.json",
            "--output-path",
            "client",
            "--meta",
            "none",
        ])
        .env("PATH", &path)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    assert!(
        !said.contains("Warning") && !said.contains("Unable"),
        "generated with warnings: {said}"
    );

    std::fs::write(dir.path().join("check.py"), GENERATED_CLIENT_CHECK).unwrap();
    let base = format!("http://{}", s.addr);
    let out = std::process::Command::new(common::python())
        .args(["check.py", &base, &admin, run["id"].as_str().unwrap(), REVIEW])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("positive "));
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

    // A key's use is recorded off the request's path, and skipped while another write holds
    // the database, so it shows up shortly after a request rather than with its answer.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let (listed, keys) = loop {
        let listed = p.sentiflow(&["keys", "list", "--json"]);
        assert_eq!(listed.code, 0, "{}", listed.stderr);
        let keys = listed.json();
        if keys[0]["last_used_at"].is_string() || std::time::Instant::now() > deadline {
            break (listed, keys);
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert_eq!(get(&s, "/models", &dashboard).status, 200);
    };
    assert!(
        !listed.stdout.contains(&dashboard) && !listed.stdout.contains(&other),
        "no key is ever shown again"
    );
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
    assert_eq!(limited.header("x-ratelimit-remaining"), Some("0"));
    assert_eq!(
        http(&s.addr, "GET", "/health", &[], b"").status,
        200,
        "health is not limited"
    );
}

/// The value of an unlabelled metric.
fn metric(s: &Server, name: &str) -> u64 {
    let text = http(&s.addr, "GET", "/metrics", &[], b"").body;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

/// Whether a read on `c` ends because the server closed it (rather than timing out).
fn closed_by_server(read: std::io::Result<usize>) -> bool {
    matches!(read, Ok(0)) || matches!(read, Err(e) if e.kind() == ErrorKind::ConnectionReset)
}

#[test]
fn slow_clients_neither_starve_others_nor_stay_connected() {
    // The soft limit is often 1,024 open files; this process holds 2,000 connections.
    let mut files = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write only the struct given.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut files) };
    assert!(
        files.rlim_max >= 2_200,
        "this test needs 2,200 open files; the hard limit is {}: raise it (`ulimit -Hn`)",
        files.rlim_max
    );
    files.rlim_cur = files.rlim_max;
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &files) };

    let p = Project::new();
    // The default header timeout (10 s) keeps the slow clients connected while a fresh one asks.
    let s = Server::start(&p, &[]);
    let slow: Vec<TcpStream> = (0..2000)
        .map(|_| {
            let mut c = TcpStream::connect(&s.addr).unwrap();
            c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: 1").unwrap();
            c
        })
        .collect();
    let r = http(&s.addr, "GET", "/health", &[], b"");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        metric(&s, "sentiflow_open_connections") >= 2000,
        "the slow clients were connected meanwhile"
    );
    drop(slow);

    // A client sending a header line every 300 ms is cut off by the header timeout all the same,
    // and one sending nothing by the idle timeout.
    let s = Server::start(&p, &["--header-timeout-s", "1", "--idle-timeout-s", "2"]);
    let mut dribbling = TcpStream::connect(&s.addr).unwrap();
    dribbling.write_all(b"GET /health HTTP/1.1\r\n").unwrap();
    dribbling.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    for lines in 0.. {
        match dribbling.read(&mut [0; 64]) {
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            read => {
                assert!(
                    closed_by_server(read),
                    "the server answered a request whose headers never ended"
                );
                break;
            }
        }
        assert!(
            lines < 100,
            "a client sending a header line every 300 ms was never cut off"
        );
        if dribbling.write_all(b"X-Slow: 1\r\n").is_err() {
            break;
        }
    }
    let mut silent = TcpStream::connect(&s.addr).unwrap();
    silent.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    assert!(
        closed_by_server(silent.read(&mut [0; 64])),
        "a connection that sends nothing is closed"
    );
    let metrics = http(&s.addr, "GET", "/metrics", &[], b"").body;
    for timeout in ["header", "idle"] {
        assert!(
            metrics.contains(&format!(
                "sentiflow_connection_timeouts_total{{timeout=\"{timeout}\"}} 1"
            )),
            "{metrics}"
        );
    }
}

#[test]
fn connections_over_the_cap_are_answered_503_until_some_close() {
    let p = Project::new();
    let s = Server::start(&p, &["--max-connections", "5"]);
    let held: Vec<TcpStream> = (0..5).map(|_| TcpStream::connect(&s.addr).unwrap()).collect();
    let r = http(&s.addr, "GET", "/health", &[], b"");
    assert_error(&r, 503, "overloaded");
    assert_eq!(r.header("retry-after"), Some("1"));
    drop(held);
    // The server sees the held connections close as it reads them: ask until it answers.
    let served = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        http(&s.addr, "GET", "/health", &[], b"").status == 200
    });
    assert!(served, "the server serves again once connections close");
    assert!(metric(&s, "sentiflow_refused_connections_total") >= 1);
}

#[test]
fn unknown_keys_from_one_address_are_throttled_until_the_window_ends() {
    let p = Project::new();
    let predictor = key(&p, "predict");
    let s = Server::start(&p, &["--auth-fail-limit", "3", "--auth-fail-window-s", "3"]);
    assert_eq!(get(&s, "/models", &predictor).status, 200);
    let guesses: Vec<Response> = (0..6).map(|i| get(&s, "/models", &format!("sf_guess{i}"))).collect();
    assert_error(&guesses[0], 401, "unauthorized");
    let limited = guesses
        .iter()
        .find(|r| r.status == 429)
        .expect("a burst of unknown keys is throttled");
    assert_error(limited, 429, "auth_throttled");
    let wait: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=3).contains(&wait), "{wait}");
    // Throttled, the address is refused before any key is looked up, even a valid one; open
    // endpoints still answer.
    assert_error(&get(&s, "/models", &predictor), 429, "auth_throttled");
    assert_eq!(http(&s.addr, "GET", "/health", &[], b"").status, 200);
    assert!(metric(&s, "sentiflow_auth_throttled_total") >= 2);
    std::thread::sleep(Duration::from_secs(wait));
    assert_eq!(
        get(&s, "/models", &predictor).status,
        200,
        "the lockout ends with its window"
    );
}

#[test]
fn head_bodyless_posts_and_security_headers() {
    use base64::Engine;
    use sha2::Digest;
    let p = Project::new();
    let auth = bearer(&key(&p, "admin"));
    let s = Server::start(&p, &[]);

    let r = http(&s.addr, "HEAD", "/health", &[], b"");
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, ""),
        "HEAD answers as GET, without the body"
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(
        http(&s.addr, "HEAD", "/models", &[("Authorization", &auth)], b"").status,
        200
    );
    let r = http(&s.addr, "HEAD", "/prediction", &[], b"");
    assert_eq!((r.status, r.header("allow")), (405, Some("POST")));
    let r = http(&s.addr, "DELETE", "/health", &[], b"");
    assert_error(&r, 405, "method_not_allowed");
    assert_eq!(r.header("allow"), Some("GET, HEAD"));

    // A POST with no body needs no Content-Length; one that needs a body says so.
    let bodyless = |path: &str| {
        exchange(
            &s.addr,
            format!("POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
    };
    assert_error(&bodyless("/models/v-none/promote"), 404, "not_found");
    assert_error(&bodyless("/prediction"), 400, "missing_body");
    let chunked = exchange(
        &s.addr,
        format!(
            "POST /prediction HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Type: application/json\r\n\
             Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n4\r\n{{}}  \r\n0\r\n\r\n"
        )
        .as_bytes(),
    );
    assert_error(&chunked, 411, "length_required");

    // The page may run its own inline script and nothing else, and never in a frame.
    let page = http(&s.addr, "GET", "/", &[], b"");
    let csp = page.header("content-security-policy").expect("the page has a CSP");
    let ui = include_str!("../src/serve/http/ui.html");
    let script = ui.split_once("<script>").unwrap().1.split_once("</script>").unwrap().0;
    let hash = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(script));
    assert!(csp.contains(&format!("script-src 'sha256-{hash}';")), "{csp}");
    assert!(
        csp.contains("default-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert_eq!(page.header("x-frame-options"), Some("DENY"));
    for r in [&page, &chunked, &http(&s.addr, "GET", "/health", &[], b"")] {
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    }
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
    assert_eq!(r.header("location"), Some(format!("/training/{id}").as_str()));

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
fn runs_are_listed_newest_first_and_a_running_one_can_be_cancelled() {
    let p = Project::new();
    p.write(
        "pipelines/slow.yaml",
        "name: slow\nstages:\n  wait: {uses: command, with: {run: 'sleep 30; echo done > out/w', outs: [out/w]}}\n",
    );
    p.write(
        "pipelines/echo.yaml",
        "name: echo\nparams: {word: hi}\nstages:\n  say: {uses: command, with: {run: 'echo ${params.word} > said.txt', outs: [said.txt]}}\n",
    );
    let (admin, predictor) = (key(&p, "admin"), key(&p, "predict"));
    let s = Server::start(&p, &[]);
    let mut ids: Vec<String> = Vec::new();
    for word in ["a", "b", "c"] {
        let run = train(&s, &admin, json!({"pipeline": "echo", "params": {"word": word}}));
        assert_eq!(run["status"], "succeeded", "{run}");
        assert_eq!(run["trigger"], "api", "{run}");
        ids.push(run["id"].as_str().unwrap().to_string());
    }
    let r = post(&s, "/training", &admin, &json!({"pipeline": "slow"}));
    assert_eq!(r.status, 202, "{}", r.body);
    let slow = r.json()["id"].as_str().unwrap().to_string();
    ids.push(slow.clone());
    ids.reverse();

    let list = |query: &str| {
        let r = get(&s, &format!("/training{query}"), &admin);
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
    };
    let listed = |page: &Value| -> Vec<String> {
        page["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect()
    };
    let all = list("");
    assert_eq!(
        (all["total"].clone(), all["limit"].clone(), all["offset"].clone()),
        (json!(4), json!(20), json!(0))
    );
    assert_eq!(listed(&all), ids, "newest first");
    let newest = &all["runs"][0];
    let mut fields: Vec<&str> = newest.as_object().unwrap().keys().map(String::as_str).collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "created_at",
            "duration_s",
            "error",
            "finished_at",
            "id",
            "mlflow_run_id",
            "pipeline",
            "status",
            "trigger"
        ]
    );
    assert_eq!(
        (newest["status"].as_str(), newest["trigger"].as_str()),
        (Some("running"), Some("api"))
    );
    assert!(
        newest["duration_s"].is_number() && newest["finished_at"].is_null(),
        "{newest}"
    );
    assert!(all["runs"][1]["duration_s"].as_f64().unwrap() >= 0.0);

    assert_eq!(list("?pipeline=echo")["total"], 3);
    assert_eq!(listed(&list("?status=running")), [slow.as_str()]);
    assert_eq!(list("?trigger=drift")["total"], 0);
    assert_eq!(
        listed(&list("?pipeline=echo&status=succeeded&trigger=api&limit=2&offset=1")),
        ids[2..4]
    );
    let page = list("?limit=2&offset=1");
    assert_eq!(
        (page["total"].clone(), page["limit"].clone(), page["offset"].clone()),
        (json!(4), json!(2), json!(1))
    );
    assert_eq!(listed(&page), ids[1..3]);

    let r = get(&s, "/training?colour=red", &admin);
    assert_error(&r, 400, "invalid_field");
    assert!(r.body.contains("unknown field `colour`"), "{}", r.body);
    let r = get(&s, "/training?limit=101", &admin);
    assert_error(&r, 400, "invalid_field");
    assert!(r.body.contains("`limit`"), "{}", r.body);
    assert_error(&get(&s, "/training?status=paused", &admin), 400, "invalid_field");
    assert_error(&get(&s, "/training", &predictor), 403, "forbidden");

    // Cancel: the command stops at once, and the run ends `cancelled`.
    let clock = Instant::now();
    let r = post(&s, &format!("/training/{slow}/cancel"), &admin, &json!({}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), json!({"id": slow, "status": "cancelled"}));
    let run = loop {
        let run = get(&s, &format!("/training/{slow}"), &admin).json();
        if run["status"] != "running" {
            break run;
        }
        assert!(clock.elapsed() < Duration::from_secs(20), "not cancelled: {run}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(run["status"], "cancelled", "{run}");
    assert!(!p.path("out/w").exists());
    assert_error(
        &post(&s, &format!("/training/{slow}/cancel"), &admin, &json!({})),
        409,
        "not_running",
    );
    assert_error(
        &post(&s, "/training/run-unknown/cancel", &admin, &json!({})),
        404,
        "not_found",
    );
    assert_error(
        &post(&s, &format!("/training/{}/cancel", ids[1]), &admin, &json!({})),
        409,
        "not_running",
    );
    let cancelled = list("?status=cancelled");
    assert_eq!(listed(&cancelled), [slow.as_str()]);
    assert!(cancelled["runs"][0]["finished_at"].is_string(), "{cancelled}");
    // The pipeline is free again.
    let r = post(&s, "/training", &admin, &json!({"pipeline": "slow"}));
    assert_eq!(r.status, 202, "{}", r.body);
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
    // Promotion needs no body, so no Content-Length either.
    let promote = format!(
        "POST /models/{}/promote HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {admin}\r\nConnection: close\r\n\r\n",
        versions[0]
    );
    assert_eq!(exchange(&s.addr, promote.as_bytes()).status, 200);

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

#[test]
fn hostile_training_parameters_are_refused_and_nothing_outside_is_read_or_quoted() {
    let p = quickstart();
    let admin = key(&p, "admin");
    p.write(
        "pipelines/echo.yaml",
        "name: echo\nparams: {word: hi}\nstages:\n  say: {uses: command, with: {run: 'echo ${params.word} > said.txt', outs: [said.txt]}}\n",
    );
    std::os::unix::fs::symlink("/etc/passwd", p.path("passwd.csv")).unwrap();
    p.write("notes.csv", "secret-token:abc123:/home/me\nsecond,line\n");
    let s = Server::start(&p, &[]);
    let train_with = |params: Value| {
        post(
            &s,
            "/training",
            &admin,
            &json!({"pipeline": "quickstart", "params": params}),
        )
    };

    let r = post(&s, "/training", &admin, &json!({"params": {}}));
    assert_error(&r, 400, "invalid_field");
    assert!(r.body.contains("`pipeline`: missing field `pipeline`"), "{}", r.body);
    // Parameters are typed JSON scalars: nesting is named, not parsed.
    let r = train_with(json!({"seed": [[1]]}));
    assert_error(&r, 400, "invalid_field");
    assert!(r.body.contains("params.seed"), "{}", r.body);
    assert!(r.body.contains("a string, number or boolean"), "{}", r.body);
    let r = train_with(json!({"seed": format!("{}x", "- ".repeat(5000))}));
    assert_error(&r, 422, "invalid_pipeline");
    assert!(r.body.contains("`params.seed` takes an integer"), "{}", r.body);

    // Data outside the project root, directly or through a link, is refused before the run.
    for data in ["/etc/passwd", "passwd.csv", "../../../../../etc/passwd"] {
        let r = train_with(json!({"data": data}));
        assert_error(&r, 403, "data_not_allowed");
        assert!(!r.body.contains("root:"), "{}", r.body);
    }
    // A file inside the project that is not review data fails without being quoted.
    let run = train(
        &s,
        &admin,
        json!({"pipeline": "quickstart", "params": {"data": "notes.csv"}}),
    );
    assert_eq!(run["status"], "failed", "{run}");
    assert!(
        run["error"]
            .as_str()
            .unwrap()
            .contains("does not look like a CSV header"),
        "{run}"
    );
    assert!(!run.to_string().contains("secret-token"), "{run}");

    // A value that reaches a shell command may not carry shell syntax.
    let r = post(
        &s,
        "/training",
        &admin,
        &json!({"pipeline": "echo", "params": {"word": "hi; touch pwned"}}),
    );
    assert_error(&r, 400, "invalid_field");
    assert!(
        r.body.contains("params.word") && r.body.contains("stage `say`"),
        "{}",
        r.body
    );
    let r = post(
        &s,
        "/training",
        &admin,
        &json!({"pipeline": "echo", "params": {"wrod": "hi"}}),
    );
    assert_error(&r, 404, "unknown_parameter");
    assert!(r.body.contains("did you mean `word`"), "{}", r.body);
    let run = train(&s, &admin, json!({"pipeline": "echo", "params": {"word": "hello-2"}}));
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(p.read("said.txt"), "hello-2\n");
    assert!(!p.path("pwned").exists());
    assert_eq!(http(&s.addr, "GET", "/health", &[], b"").status, 200);
}

#[test]
fn the_openapi_document_types_every_answer_and_swagger_ui_reads_it() {
    let p = Project::new();
    let s = Server::start(&p, &["--max-batch", "16"]);
    let doc = http(&s.addr, "GET", "/openapi.json", &[], b"").json();
    let schemas = &doc["components"]["schemas"];
    let resolve = |schema: &Value| match schema["$ref"].as_str() {
        Some(r) => schemas[r.rsplit('/').next().unwrap()].clone(),
        None => schema.clone(),
    };
    let mut typed = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            for (status, answer) in op["responses"].as_object().unwrap() {
                let schema = resolve(&answer["content"]["application/json"]["schema"]);
                assert!(
                    schema["properties"].is_object(),
                    "{method} {path} {status} has no typed body: {schema}"
                );
                if status.starts_with('2') {
                    typed += 1;
                }
                if status == "429" || status == "503" {
                    assert!(answer["headers"]["Retry-After"].is_object(), "{method} {path} {status}");
                }
            }
        }
    }
    assert_eq!(typed, 19, "every documented operation has a typed success");
    for (path, method) in [
        ("/prediction", "post"),
        ("/best_model_parameter", "get"),
        ("/training", "post"),
    ] {
        let op = &doc["paths"][path][method];
        let answer = resolve(
            &op["responses"][if path == "/training" { "202" } else { "200" }]["content"]["application/json"]["schema"],
        );
        let request = resolve(&op["requestBody"]["content"]["application/json"]["schema"]);
        assert!(
            answer["examples"].is_array() || request["examples"].is_array(),
            "{path} has an example"
        );
        assert_eq!(op["security"][0], json!({"bearer": []}), "{path}");
    }
    let request = resolve(&doc["paths"]["/prediction"]["post"]["requestBody"]["content"]["application/json"]["schema"]);
    assert_eq!(
        request["properties"]["texts"]["maxItems"], 16,
        "the server's own limits"
    );
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");

    let r = http(&s.addr, "GET", "/docs", &[], b"");
    assert_eq!((r.status, r.header("location")), (308, Some("/docs/")));
    let r = http(&s.addr, "GET", "/docs/", &[], b"");
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/html"));
    assert!(r.body.contains("swagger-ui"), "{}", r.body);
    let init = http(&s.addr, "GET", "/docs/swagger-initializer.js", &[], b"").body;
    assert!(init.contains("/openapi.json"), "{init}");
    assert!(
        init.contains(r#""validatorUrl": "none""#),
        "no request to swagger.io: {init}"
    );
    assert_error(&http(&s.addr, "GET", "/docs/nothing.js", &[], b""), 404, "not_found");
}

#[test]
fn each_request_is_logged_once_as_json_and_no_key_is_ever_logged() {
    let p = quickstart();
    let admin = key(&p, "admin");
    let labelled = p.sentiflow(&["keys", "create", "--role", "predict", "--label", "ci-bot"]);
    assert_eq!(labelled.code, 0, "{}", labelled.stderr);
    let predictor = labelled.stdout.trim().to_string();
    let s = Server::start_env(&p, &["--log-format", "json"], &[("SENTIFLOW_LOG", "info")]);
    let run = train(&s, &admin, json!({"pipeline": "quickstart"}));
    assert_eq!(run["status"], "succeeded", "{run}");

    let mut ids = Vec::new();
    let r = post(&s, "/prediction", &predictor, &json!({"text": REVIEW}));
    assert_eq!(r.status, 200, "{}", r.body);
    let version = r.json()["version"].as_str().unwrap().to_string();
    let prediction_id = r.header("x-request-id").unwrap().to_string();
    ids.push(prediction_id.clone());
    let bogus = "sf_0000000000000000000000000000000000000000000000000000000000000000";
    let refused = post(&s, "/prediction", bogus, &json!({"text": REVIEW}));
    assert_eq!(refused.status, 401);
    ids.push(refused.header("x-request-id").unwrap().to_string());
    for path in ["/health", "/nowhere", "/models/v1/promote"] {
        ids.push(
            http(&s.addr, "GET", path, &[], b"")
                .header("x-request-id")
                .unwrap()
                .to_string(),
        );
    }

    let access = |log: &[String]| -> Vec<Value> {
        log.iter()
            .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .filter(|l| l["target"] == "sentiflow::access")
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let lines = access(&s.log.lock().unwrap());
        let logged = |id: &String| lines.iter().filter(|l| l["request_id"] == id.as_str()).count();
        if ids.iter().all(|id| logged(id) == 1) || Instant::now() > deadline {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    for id in &ids {
        let n = lines.iter().filter(|l| l["request_id"] == id.as_str()).count();
        assert_eq!(n, 1, "request {id} is logged once: {lines:?}");
    }
    let mut seen: Vec<&str> = lines.iter().map(|l| l["request_id"].as_str().unwrap()).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), lines.len(), "one line per request");
    let line = lines
        .iter()
        .find(|l| l["request_id"] == prediction_id.as_str())
        .unwrap();
    assert_eq!(line["method"], "POST");
    assert_eq!(line["route"], "/prediction");
    assert_eq!(line["status"], 200);
    assert_eq!(line["key"], "ci-bot");
    assert_eq!(line["model"], "tfidf");
    assert_eq!(line["version"], version.as_str());
    assert!(line["bytes"].as_u64().unwrap() > 50, "{line}");
    assert!(line["duration_ms"].as_f64().unwrap() >= 0.0, "{line}");
    assert!(line["timestamp"].is_string(), "{line}");
    let by_id = |i: usize| lines.iter().find(|l| l["request_id"] == ids[i].as_str()).unwrap();
    assert_eq!(
        (by_id(1)["status"].as_u64(), by_id(1)["key"].is_null()),
        (Some(401), true)
    );
    assert_eq!(by_id(3)["route"], "other");
    assert_eq!(by_id(4)["status"], 405, "{}", by_id(4));
    assert_eq!(
        by_id(4)["route"],
        "/models/{version}/promote",
        "a wrong method counts under its path"
    );

    let log = s.log.lock().unwrap().join("\n");
    for secret in [admin.as_str(), predictor.as_str(), bogus] {
        assert!(!log.contains(secret), "a key in the log");
    }
    let run_id = run["id"].as_str().unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("training finished") && l.contains(run_id)),
        "the training logs with its run id"
    );
}
