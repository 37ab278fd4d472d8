//! `/metrics` after traffic to every route and a drift evaluation, read by the parsers Prometheus
//! users have: Python's `prometheus_client` and `promtool check metrics`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::prometheus::read_clean;
use common::{http, key, quickstart, Response, Server};
use serde_json::{json, Value};

const HELDOUT: &str = include_str!("fixtures/imdb_heldout.jsonl");

/// A route's latency buckets (upper bound, cumulative count) and its count.
type Histogram = (Vec<(f64, f64)>, Option<f64>);

fn label<'a>(sample: &'a Value, name: &str) -> &'a str {
    sample["labels"][name].as_str().unwrap_or("")
}

#[test]
fn metrics_after_traffic_to_every_route_are_one_clean_family_per_name() {
    let p = quickstart();
    let (admin, predictor) = (key(&p, "admin"), key(&p, "predict"));
    let s = Server::start(&p, &["--drift-period-s", "1"]);
    let send = |method: &str, path: &str, key: Option<&str>, body: Option<&Value>| -> Response {
        let auth = key.map(|k| format!("Bearer {k}"));
        let mut headers = vec![];
        if let Some(a) = &auth {
            headers.push(("Authorization", a.as_str()));
        }
        let body = body.map(Value::to_string).unwrap_or_default();
        if !body.is_empty() {
            headers.push(("Content-Type", "application/json"));
        }
        http(&s.addr, method, path, &headers, body.as_bytes())
    };
    let expect = |r: Response, status: u16| -> Value {
        assert_eq!(r.status, status, "{}", r.body);
        serde_json::from_str(&r.body).unwrap_or(Value::Null)
    };

    // Training through the API.
    let started = expect(
        send(
            "POST",
            "/training",
            Some(&admin),
            Some(&json!({"pipeline": "quickstart"})),
        ),
        202,
    );
    let id = started["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(180);
    while expect(send("GET", &format!("/training/{id}"), Some(&admin), None), 200)["status"] == "running" {
        assert!(Instant::now() < deadline, "training did not finish");
        std::thread::sleep(Duration::from_millis(100));
    }
    expect(send("GET", &format!("/training/{id}/logs"), Some(&admin), None), 200);
    // Promoting the served version again starts a fresh drift window: before any prediction.
    let models = expect(send("GET", "/models", Some(&predictor), None), 200);
    let trained = models["models"][0]["version"].as_str().unwrap().to_string();
    let promoted = send("POST", &format!("/models/{trained}/promote"), Some(&admin), None);
    assert!(promoted.status < 500, "{}", promoted.body);

    // Predictions (enough to judge the window) and feedback on enough of them to judge accuracy.
    let texts: Vec<String> = HELDOUT
        .lines()
        .take(40)
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let mut ids = Vec::new();
    for chunk in texts.chunks(20) {
        let answer = expect(
            send("POST", "/prediction", Some(&predictor), Some(&json!({"texts": chunk}))),
            200,
        );
        for prediction in answer["predictions"].as_array().unwrap() {
            ids.push(prediction["id"].as_str().unwrap().to_string());
        }
    }
    let single = expect(
        send(
            "POST",
            "/prediction",
            Some(&predictor),
            Some(&json!({"text": texts[0]})),
        ),
        200,
    );
    for id in &ids[..35] {
        let body = json!({"prediction_id": id, "label": "positive"});
        expect(send("POST", "/feedback", Some(&predictor), Some(&body)), 200);
    }

    // Every other route, and the errors.
    expect(send("GET", "/", None, None), 200);
    expect(send("GET", "/health", None, None), 200);
    expect(send("HEAD", "/health", None, None), 200);
    expect(send("GET", "/ready", None, None), 200);
    expect(send("GET", "/metrics", None, None), 200);
    expect(send("GET", "/openapi.json", None, None), 200);
    expect(send("GET", "/best_model_parameter", Some(&predictor), None), 200);
    expect(send("GET", "/models", Some(&predictor), None), 200);
    expect(send("GET", "/drift", Some(&predictor), None), 200);
    expect(send("GET", "/pipelines", Some(&admin), None), 200);
    let version = single["version"].as_str().unwrap();
    assert_eq!(version, trained);
    expect(send("GET", "/no/such/route", Some(&predictor), None), 404);
    expect(send("DELETE", "/health", None, None), 405);
    expect(send("GET", "/models", None, None), 401);

    // The periodic evaluation stores the window's report.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let drift = expect(send("GET", "/drift?history=1", Some(&predictor), None), 200);
        if drift["history"]
            .as_array()
            .is_some_and(|h| h.iter().any(|e| e["model"] == "tfidf"))
        {
            assert_eq!(drift["models"]["tfidf"]["samples"], 41, "{drift}");
            assert_eq!(drift["models"]["tfidf"]["performance"]["feedback"], 35, "{drift}");
            break;
        }
        assert!(Instant::now() < deadline, "no drift evaluation was stored: {drift}");
        std::thread::sleep(Duration::from_millis(200));
    }

    let r = send("GET", "/metrics", None, None);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = r.body;

    // One family per name, typed, and clean for promtool.
    let families = read_clean(&text);
    let expected = [
        ("sentiflow_requests", "counter"),
        ("sentiflow_request_duration_seconds", "histogram"),
        ("sentiflow_predictions", "counter"),
        ("sentiflow_training_runs", "counter"),
        ("sentiflow_stored_predictions", "gauge"),
        ("sentiflow_open_connections", "gauge"),
        ("sentiflow_refused_connections", "counter"),
        ("sentiflow_auth_throttled", "counter"),
        ("sentiflow_drift_value", "gauge"),
        ("sentiflow_drift_status", "gauge"),
        ("process_cpu_seconds", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_virtual_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
        ("process_max_fds", "gauge"),
        ("process_start_time_seconds", "gauge"),
    ];
    for (name, kind) in expected {
        let family = families.get(name).unwrap_or_else(|| panic!("no {name} in\n{text}"));
        assert_eq!(family.kind, kind, "{name}");
    }
    let value = |name: &str| families[name].samples[0]["value"].as_f64().unwrap();

    // Each request is counted under its route and status.
    let requests: BTreeSet<(&str, &str)> = families["sentiflow_requests"]
        .samples
        .iter()
        .map(|s| (label(s, "route"), label(s, "status")))
        .collect();
    for seen in [
        ("POST /training", "202"),
        ("GET /training/{id}", "200"),
        ("GET /training/{id}/logs", "200"),
        ("POST /prediction", "200"),
        ("POST /feedback", "200"),
        ("GET /", "200"),
        ("GET /health", "200"),
        ("HEAD /health", "200"),
        ("GET /ready", "200"),
        ("GET /metrics", "200"),
        ("GET /openapi.json", "200"),
        ("GET /best_model_parameter", "200"),
        ("GET /models", "200"),
        ("GET /drift", "200"),
        ("GET /pipelines", "200"),
        ("GET other", "404"),
        ("DELETE /health", "405"),
        ("GET /models", "401"),
    ] {
        assert!(requests.contains(&seen), "no {seen:?} in {requests:?}");
    }
    // Each route's histogram: cumulative buckets up to +Inf, which is its count.
    let mut routes: BTreeMap<&str, Histogram> = BTreeMap::new();
    for s in &families["sentiflow_request_duration_seconds"].samples {
        let entry = routes.entry(label(s, "route")).or_default();
        let v = s["value"].as_f64().unwrap();
        match s["name"].as_str().unwrap() {
            "sentiflow_request_duration_seconds_bucket" => {
                let le = label(s, "le");
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                };
                entry.0.push((le, v));
            }
            "sentiflow_request_duration_seconds_count" => entry.1 = Some(v),
            _ => {}
        }
    }
    assert!(routes.contains_key("POST /prediction"), "{routes:?}");
    for (route, (buckets, count)) in &routes {
        assert_eq!(buckets.len(), 13, "{route}: {buckets:?}");
        assert!(
            buckets.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
            "{route}: {buckets:?}"
        );
        assert_eq!(buckets.last().map(|b| b.0), Some(f64::INFINITY), "{route}");
        assert_eq!(buckets.last().map(|b| b.1), *count, "{route}");
    }
    let predicted: f64 = families["sentiflow_predictions"]
        .samples
        .iter()
        .filter(|s| label(s, "model") == "tfidf" && label(s, "version") == version)
        .map(|s| s["value"].as_f64().unwrap())
        .sum();
    assert_eq!(predicted, 41.0);
    let succeeded = families["sentiflow_training_runs"]
        .samples
        .iter()
        .find(|s| label(s, "outcome") == "succeeded");
    assert_eq!(succeeded.map(|s| s["value"].as_f64().unwrap()), Some(1.0));
    assert!(value("sentiflow_stored_predictions") >= 1.0);

    // The drift report as gauges: every statistic of the judged window, feedback accuracy too.
    let drift = |family: &str| -> BTreeSet<String> {
        families[family]
            .samples
            .iter()
            .filter(|s| label(s, "model") == "tfidf")
            .map(|s| label(s, "statistic").to_string())
            .collect()
    };
    let statistics = [
        "score_psi",
        "length_psi",
        "positive_rate_shift",
        "unknown_token_ratio",
        "accuracy",
    ];
    let values = drift("sentiflow_drift_value");
    let statuses = drift("sentiflow_drift_status");
    for statistic in statistics {
        assert!(values.contains(statistic), "{statistic} in {values:?}");
        assert!(statuses.contains(statistic), "{statistic} in {statuses:?}");
    }
    assert!(values.contains("samples") && statuses.contains("overall"));
    for s in &families["sentiflow_drift_status"].samples {
        assert!([0.0, 1.0, 2.0].contains(&s["value"].as_f64().unwrap()), "{s}");
    }

    // This process as the standard process metrics describe it.
    assert!(value("process_resident_memory_bytes") > 1e6);
    assert!(value("process_virtual_memory_bytes") >= value("process_resident_memory_bytes"));
    assert!(value("process_open_fds") >= 3.0);
    assert!(value("process_max_fds") >= value("process_open_fds"));
    assert!(value("process_cpu_seconds") > 0.0);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    let start = value("process_start_time_seconds");
    // Seconds since the epoch, not clock ticks or seconds since boot.
    assert!(start < now + 60.0 && start > now - 86_400.0, "{start} vs now {now}");
}
