//! Candidates under evaluation on real reviews: with a promotion gate, a newly trained version
//! scores production's traffic in the background and is promoted once its figures meet the gate;
//! one trained on flipped labels never is. Canaries answer their share, and a full shadow queue
//! drops shadow work, never a request.

mod common;

use std::time::{Duration, Instant};

use common::{http, key, post, Project, Response, Server};
use serde_json::{json, Value};

const HELDOUT: &str = include_str!("fixtures/imdb_heldout.jsonl");

/// The held-out reviews and their labels.
fn reviews() -> Vec<(String, String)> {
    HELDOUT
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["text"].as_str().unwrap().to_string(),
                v["label"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn send(s: &Server, method: &str, path: &str, key: &str) -> Response {
    let auth = format!("Bearer {key}");
    http(&s.addr, method, path, &[("Authorization", &auth)], b"")
}

fn get(s: &Server, path: &str, key: &str) -> Value {
    let r = send(s, "GET", path, key);
    assert_eq!(r.status, 200, "{path}: {}", r.body);
    r.json()
}

/// Trains `pipeline` with `params` and waits for the run to succeed.
fn train(s: &Server, admin: &str, pipeline: &str, params: Value) {
    let r = post(s, "/training", admin, &json!({"pipeline": pipeline, "params": params}));
    assert_eq!(r.status, 202, "{}", r.body);
    let location = r.header("location").unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let run = get(s, &location, admin);
        if run["status"] != "running" {
            assert_eq!(run["status"], "succeeded", "{run}");
            return;
        }
        assert!(Instant::now() < deadline, "training did not finish: {run}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The registered version `version` as `GET /models` lists it.
fn model(s: &Server, admin: &str, version: &str) -> Value {
    let models = get(s, "/models", admin);
    models["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["version"] == version)
        .cloned()
        .unwrap_or_else(|| panic!("no {version} in {models}"))
}

/// The version of the newest registered model.
fn newest(s: &Server, admin: &str) -> String {
    get(s, "/models", admin)["models"][0]["version"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The prediction answer of `text`; every prediction must succeed.
fn predict(s: &Server, key: &str, text: &str) -> Value {
    let r = post(s, "/prediction", key, &json!({"text": text}));
    assert_eq!(r.status, 200, "a prediction failed: {}", r.body);
    r.json()
}

fn metric(s: &Server, name: &str) -> f64 {
    let text = http(&s.addr, "GET", "/metrics", &[], b"").body;
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

/// The quickstart pipeline with one model to tune, so that two trainings on the same reviews
/// (refitted on all of them) fit the same weights; `gate_b` splits them otherwise for validation,
/// which gives other validation figures, so another version. And a copy of the reviews with
/// every label flipped.
fn project() -> Project {
    let p = common::quickstart();
    let base = p
        .read("pipelines/quickstart.yaml")
        .replace("        - {model: nbsvm, C: [0.1, 1]}\n", "")
        .replace("C: [1, 10]", "C: [10]");
    p.write("pipelines/gate.yaml", &base.replace("name: quickstart", "name: gate"));
    p.write(
        "pipelines/gate_b.yaml",
        &base
            .replace("name: quickstart", "name: gate_b")
            .replace("validation: 0.2", "validation: 0.25"),
    );
    let flip = "set -e; mkdir flip; tar xzf tests/fixtures/imdb_sample.tar.gz -C flip; cd flip/aclImdb/train; \
                mv pos x; mv neg pos; mv x neg; mv urls_pos.txt u; mv urls_neg.txt urls_pos.txt; mv u urls_neg.txt; \
                cd ../..; tar czf ../tests/fixtures/flipped.tar.gz aclImdb";
    let status = std::process::Command::new("sh")
        .args(["-c", flip])
        .current_dir(p.root())
        .status()
        .unwrap();
    assert!(status.success());
    p
}

const GATE: [&str; 10] = [
    "--promotion-min-shadow",
    "200",
    "--promotion-max-disagreement",
    "0.15",
    "--drift-period-s",
    "1",
    "--predict-rps",
    "100000",
    "--admin-rps",
    "100000",
];

fn start(p: &Project, extra: &[&str]) -> Server {
    let mut args = GATE.to_vec();
    args.extend_from_slice(extra);
    Server::start(p, &args)
}

#[test]
fn candidates_are_shadowed_gated_canaried_and_never_fail_a_prediction() {
    let p = project();
    let admin = key(&p, "admin");
    let reviews = reviews();
    let mut s = start(&p, &[]);

    // The first version of a name is served at once.
    train(&s, &admin, "gate", json!({}));
    let production = newest(&s, &admin);
    let row = model(&s, &admin, &production);
    assert_eq!(row["status"], "production", "{row}");
    assert_eq!(row["reason"]["by"], "accuracy", "{row}");

    // A version trained on flipped labels becomes the candidate, not production.
    train(&s, &admin, "gate", json!({"data": "tests/fixtures/flipped.tar.gz"}));
    let flipped = newest(&s, &admin);
    assert_ne!(flipped, production);
    assert_eq!(model(&s, &admin, &flipped)["status"], "candidate");

    // A canary at 10%: that share of the answers name the candidate.
    let r = post(
        &s,
        &format!("/models/{flipped}/canary"),
        &admin,
        &json!({"percent": 60}),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.json()["error"]["message"].as_str().unwrap().contains("percent"),
        "{}",
        r.body
    );
    let r = post(
        &s,
        &format!("/models/{flipped}/canary"),
        &admin,
        &json!({"percent": 10}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), json!({"version": flipped, "percent": 10}));
    assert_eq!(
        get(&s, &format!("/models/{flipped}/shadow"), &admin)["canary_percent"],
        10
    );
    let mut by_candidate = 0;
    for i in 0..2000 {
        let answer = predict(&s, &admin, &reviews[i % reviews.len()].0);
        let version = answer["version"].as_str().unwrap();
        assert!(version == production || version == flipped, "{answer}");
        by_candidate += usize::from(version == flipped);
    }
    assert!(
        (140..=260).contains(&by_candidate),
        "{by_candidate} of 2000 by the canary"
    );
    let r = send(&s, "DELETE", &format!("/models/{flipped}/canary"), &admin);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), json!({"version": flipped, "percent": 0}));
    assert_eq!(
        send(&s, "GET", &format!("/models/{flipped}/canary"), &admin).header("allow"),
        Some("POST, DELETE")
    );
    let mut answered = Vec::new();
    for (text, label) in reviews.iter().take(200) {
        let answer = predict(&s, &admin, text);
        assert_eq!(answer["version"], production.as_str(), "the canary stopped: {answer}");
        answered.push((answer["id"].as_str().unwrap().to_string(), label.clone()));
    }
    // Feedback on shadowed predictions measures both versions.
    std::thread::sleep(Duration::from_millis(500));
    for (id, label) in &answered {
        let r = post(&s, "/feedback", &admin, &json!({"prediction_id": id, "label": label}));
        assert_eq!(r.status, 200, "{}", r.body);
    }

    // Its shadow figures: it disagrees with production on most reviews, and the gate says so.
    let deadline = Instant::now() + Duration::from_secs(20);
    let report = loop {
        let report = get(&s, &format!("/models/{flipped}/shadow"), &admin);
        if report["shadowed"].as_u64().unwrap() >= 1800 && report["feedback"].as_u64().unwrap() >= 200 {
            break report;
        }
        assert!(Instant::now() < deadline, "the shadow figures did not arrive: {report}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(report["version"], flipped.as_str());
    assert_eq!(report["model"], "tfidf");
    assert_eq!(report["production_version"], production.as_str());
    assert!(report["disagreement"].as_f64().unwrap() > 0.5, "{report}");
    assert!(report["accuracy_gain"].as_f64().unwrap() < 0.0, "{report}");
    for field in [
        "agreement",
        "accuracy",
        "production_accuracy",
        "latency_p50_ms",
        "latency_p99_ms",
    ] {
        assert!(report[field].is_number(), "{field}: {report}");
    }
    assert_eq!(report["dropped"], 0, "{report}");
    assert_eq!(report["gate"]["met"], false, "{report}");
    let row = model(&s, &admin, &flipped);
    assert_eq!(row["status"], "candidate", "{row}");
    let failed: Vec<&str> = row["gate"]["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["condition"].as_str().unwrap())
        .collect();
    assert_eq!(failed, ["max_disagreement"], "{row}");
    assert!(
        row["gate"]["failed"][0]["message"].as_str().unwrap().contains('%'),
        "{row}"
    );

    // A full shadow queue drops shadow work, not predictions; the candidate survives a restart.
    s.stop();
    let s = start(&p, &["--shadow-queue", "1"]);
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let (addr, admin) = (s.addr.clone(), admin.clone());
            let texts: Vec<String> = reviews.iter().skip(w * 32).take(32).map(|r| r.0.clone()).collect();
            std::thread::spawn(move || {
                let auth = format!("Bearer {admin}");
                let body = json!({"texts": texts}).to_string();
                (0..40)
                    .filter(|_| {
                        let headers = [("Authorization", auth.as_str()), ("Content-Type", "application/json")];
                        http(&addr, "POST", "/prediction", &headers, body.as_bytes()).status != 200
                    })
                    .count()
            })
        })
        .collect();
    let failures: usize = workers.into_iter().map(|w| w.join().unwrap()).sum();
    assert_eq!(failures, 0, "predictions failed while the shadow queue was full");
    assert!(metric(&s, "sentiflow_shadow_dropped_total") > 0.0);

    // Rejected: no longer shadowed, and only a candidate can be rejected.
    let r = post(&s, &format!("/models/{flipped}/reject"), &admin, &json!({}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["rejected"]["status"], "rejected");
    let r = post(&s, &format!("/models/{flipped}/reject"), &admin, &json!({}));
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "not_a_candidate");
    drop(s);

    // A version of the same reviews agrees with production, and the gate promotes it.
    let s = start(&p, &[]);
    train(&s, &admin, "gate_b", json!({}));
    let candidate = newest(&s, &admin);
    assert_eq!(model(&s, &admin, &candidate)["status"], "candidate");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut i = 0;
    loop {
        let answer = predict(&s, &admin, &reviews[i % reviews.len()].0);
        i += 1;
        let promoted = if answer["version"] == candidate.as_str() {
            true
        } else {
            assert_eq!(answer["version"], production.as_str(), "{answer}");
            i % 50 == 0 && model(&s, &admin, &candidate)["status"] == "production"
        };
        if promoted {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not promoted: {}",
            model(&s, &admin, &candidate)
        );
    }
    assert!(i >= 200, "promoted after {i} predictions, before the gate's 200");
    let row = model(&s, &admin, &candidate);
    assert_eq!(row["status"], "production", "{row}");
    assert_eq!(row["reason"]["by"], "gate", "{row}");
    let figures = &row["reason"]["shadow"];
    assert!(figures["shadowed"].as_u64().unwrap() >= 200, "{row}");
    assert!(figures["disagreement"].as_f64().unwrap() <= 0.15, "{row}");
    assert_eq!(figures["production_version"], production.as_str(), "{row}");
    assert_eq!(model(&s, &admin, &production)["status"], "archived");
    assert_eq!(predict(&s, &admin, &reviews[0].0)["version"], candidate.as_str());
}

/// Which versions answered `n` predictions, by version.
fn answered_by(s: &Server, key: &str, n: usize) -> std::collections::BTreeMap<String, usize> {
    let reviews = reviews();
    let mut by = std::collections::BTreeMap::new();
    for i in 0..n {
        let answer = predict(s, key, &reviews[i % reviews.len()].0);
        *by.entry(answer["version"].as_str().unwrap().to_string()).or_default() += 1;
    }
    by
}

/// Trains `gate_b` with `seed` and gives the version it registered.
fn candidate(s: &Server, admin: &str, seed: u64) -> String {
    train(s, admin, "gate_b", json!({"seed": seed}));
    let version = newest(s, admin);
    assert_eq!(model(s, admin, &version)["status"], "candidate");
    version
}

/// What `GET /models` says is what predictions get: a canary is accepted only where it routes,
/// a newer candidate ends the older one's canary for good, a promotion retires the candidates
/// older than it, and promoting production again changes nothing.
#[test]
fn canaries_and_promotions_do_what_they_say() {
    let p = project();
    let admin = key(&p, "admin");
    // A gate that is never met: every promotion here is the operator's.
    let s = Server::start(
        &p,
        &[
            "--promotion-min-shadow",
            "1000000",
            "--predict-rps",
            "100000",
            "--admin-rps",
            "100000",
        ],
    );
    train(&s, &admin, "gate", json!({}));
    let production = newest(&s, &admin);
    let before = model(&s, &admin, &production);
    assert_eq!(before["status"], "production");
    let r = post(&s, &format!("/models/{production}/promote"), &admin, &json!({}));
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "already_in_production", "{}", r.body);
    assert_eq!(model(&s, &admin, &production), before, "nothing changed");

    // Of two candidates, the newer is under evaluation: the older cannot take a canary.
    let (x, y) = (candidate(&s, &admin, 1), candidate(&s, &admin, 2));
    let r = post(&s, &format!("/models/{x}/canary"), &admin, &json!({"percent": 10}));
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "not_under_evaluation", "{}", r.body);
    assert!(
        r.body.contains(&y),
        "the answer names the candidate under evaluation: {}",
        r.body
    );
    assert_eq!(model(&s, &admin, &x)["canary_percent"], 0);

    let r = post(&s, &format!("/models/{y}/canary"), &admin, &json!({"percent": 50}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(model(&s, &admin, &y)["canary_percent"], 50);
    let by = answered_by(&s, &admin, 40);
    assert_eq!(by.get(&y), Some(&20), "half the answers by the canary: {by:?}");

    // A newer candidate ends Y's canary, and rejecting it does not bring the canary back.
    let z = candidate(&s, &admin, 3);
    assert_eq!(model(&s, &admin, &y)["canary_percent"], 0);
    assert_eq!(answered_by(&s, &admin, 40).get(&production), Some(&40));
    let r = post(&s, &format!("/models/{z}/reject"), &admin, &json!({}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(model(&s, &admin, &y)["canary_percent"], 0);
    assert_eq!(answered_by(&s, &admin, 40).get(&production), Some(&40));

    // Promoting Y retires X, the candidate older than it: nothing can promote X over Y now.
    let r = post(&s, &format!("/models/{y}/promote"), &admin, &json!({}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(model(&s, &admin, &x)["status"], "archived");
    assert_eq!(model(&s, &admin, &production)["status"], "archived");
    let r = post(&s, &format!("/models/{x}/canary"), &admin, &json!({"percent": 10}));
    assert_eq!(r.json()["error"]["code"], "not_a_candidate", "{}", r.body);
    assert_eq!(answered_by(&s, &admin, 20).get(&y), Some(&20));
    drop(s);

    // Without a gate, a canary is loaded to answer its share: at 100%, every answer.
    let s = Server::start(
        &p,
        &["--no-auto-promote", "--predict-rps", "100000", "--admin-rps", "100000"],
    );
    let w = candidate(&s, &admin, 4);
    let r = post(&s, &format!("/models/{w}/canary"), &admin, &json!({"percent": 100}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(model(&s, &admin, &w)["canary_percent"], 100);
    assert_eq!(answered_by(&s, &admin, 30).get(&w), Some(&30));
}
