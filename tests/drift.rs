//! Drift monitoring on real reviews: a TF-IDF model trained on the 400-review fixture (half of it
//! kept for validation, the reference), then 300 other IMDB reviews, as they are and shifted.

mod common;

use common::{http, key, Project, Response, Server};
use serde_json::{json, Value};

const HELDOUT: &str = include_str!("fixtures/imdb_heldout.jsonl");

struct Review {
    text: String,
    positive: bool,
}

fn heldout() -> Vec<Review> {
    HELDOUT
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            Review {
                text: v["text"].as_str().unwrap().to_string(),
                positive: v["label"] == "positive",
            }
        })
        .collect()
}

/// The first sentence of a review.
fn snippet(text: &str) -> String {
    let end = text.find(['.', '!', '?']).map_or(text.len(), |i| i + 1);
    text[..end].to_string()
}

/// Every word's letters reversed and shifted: words the model has never seen.
fn scrambled(text: &str) -> String {
    text.split_whitespace()
        .map(|w| {
            w.chars()
                .rev()
                .map(|c| {
                    if c.is_ascii_lowercase() {
                        (b'a' + (c as u8 - b'a' + 7) % 26) as char
                    } else {
                        c
                    }
                })
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn project() -> Project {
    let p = common::quickstart();
    // No refit: the reference scores are those of the fit on the training half, and a model
    // refitted on twice as many reviews scores more confidently than that (on IMDB's 25,000 the
    // refit adds a quarter and the scores stay within the reference: bench/unseen_movies.py).
    let yaml = p
        .read("pipelines/quickstart.yaml")
        .replace("validation: 0.2", "validation: 0.5")
        .replace("refit: true", "refit: false")
        .replace("out: models/quickstart/tfidf", "out: models/tfidf");
    p.write("pipelines/quickstart.yaml", &yaml);
    let run = p.sentiflow(&["run", "pipelines/quickstart.yaml"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    p
}

fn offline(p: &Project, rows: &[Value]) -> Value {
    let body: String = rows.iter().map(|r| format!("{r}\n")).collect();
    p.write("stream.jsonl", &body);
    let r = p.sentiflow(&[
        "drift",
        "--model",
        "models/tfidf",
        "--input",
        "stream.jsonl",
        "--chart",
        "drift.png",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let png = std::fs::read(p.path("drift.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    r.json()
}

fn stat<'a>(report: &'a Value, name: &str) -> &'a str {
    report["statistics"][name]["status"].as_str().unwrap()
}

#[test]
fn offline_reports_flag_the_statistic_that_moved() {
    let p = project();
    let reviews = heldout();
    let texts =
        |f: &dyn Fn(&Review) -> String| -> Vec<Value> { reviews.iter().map(|r| json!({"text": f(r)})).collect() };

    let same = offline(&p, &texts(&|r| r.text.clone()));
    assert_eq!(same["status"], "ok", "held-out reviews: {same}");
    assert_eq!(same["samples"], 300);

    let short = offline(&p, &texts(&|r| snippet(&r.text)));
    assert_eq!(stat(&short, "length_psi"), "alert", "{short}");

    let foreign = offline(&p, &texts(&|r| scrambled(&r.text)));
    assert_eq!(stat(&foreign, "unknown_token_ratio"), "alert", "{foreign}");

    let negative: Vec<Value> = reviews
        .iter()
        .filter(|r| !r.positive)
        .map(|r| json!({"text": r.text}))
        .collect();
    let negative = offline(&p, &negative);
    assert_eq!(stat(&negative, "positive_rate_shift"), "alert", "{negative}");
    assert_eq!(stat(&negative, "length_psi"), "ok", "{negative}");

    let labelled = |flip: bool| -> Vec<Value> {
        reviews
            .iter()
            .map(|r| json!({"text": r.text, "label": if r.positive != flip { "positive" } else { "negative" }}))
            .collect()
    };
    let right = offline(&p, &labelled(false));
    assert_eq!(right["performance"]["status"], "ok", "{right}");
    let wrong = offline(&p, &labelled(true));
    assert_eq!(wrong["performance"]["status"], "alert", "{wrong}");
    assert_eq!(wrong["status"], "alert");
}

/// Requests to a running server with a new `predict` key.
struct Client<'a> {
    server: &'a Server,
    auth: String,
}

impl<'a> Client<'a> {
    fn new(p: &Project, server: &'a Server) -> Client<'a> {
        let auth = format!("Bearer {}", key(p, "predict"));
        Client { server, auth }
    }

    fn post(&self, path: &str, body: Value) -> Response {
        let headers = [
            ("Authorization", self.auth.as_str()),
            ("Content-Type", "application/json"),
        ];
        http(&self.server.addr, "POST", path, &headers, body.to_string().as_bytes())
    }

    /// Predicts `texts` in batches of 50; the id of each prediction, in order.
    fn predict_all<T: AsRef<str>>(&self, texts: &[T]) -> Vec<String> {
        let mut ids = Vec::new();
        for chunk in texts.chunks(50) {
            let batch: Vec<&str> = chunk.iter().map(AsRef::as_ref).collect();
            let r = self.post("/prediction", json!({ "texts": batch }));
            assert_eq!(r.status, 200, "{}", r.body);
            let answer = r.json();
            ids.extend(
                answer["predictions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p["id"].as_str().unwrap().to_string()),
            );
        }
        ids
    }

    fn get(&self, path: &str) -> Response {
        http(
            &self.server.addr,
            "GET",
            path,
            &[("Authorization", self.auth.as_str())],
            b"",
        )
    }
}

#[test]
fn the_server_watches_live_predictions_and_feedback() {
    let p = project();
    let s = Server::start(&p, &["--drift-window", "300", "--drift-period-s", "1"]);
    let client = Client::new(&p, &s);
    let post = |path: &str, body: Value| client.post(path, body);
    let drift = || {
        let r = client.get("/drift?history=1");
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
    };
    let reviews = heldout();

    // Held-out reviews: ok. Each prediction has an id for feedback.
    let texts: Vec<&str> = reviews.iter().map(|r| r.text.as_str()).collect();
    let ids: Vec<(String, bool)> = client
        .predict_all(&texts)
        .into_iter()
        .zip(reviews.iter().map(|r| r.positive))
        .collect();
    let report = drift();
    assert_eq!(report["models"]["tfidf"]["status"], "ok", "{report}");
    assert_eq!(report["models"]["tfidf"]["samples"], 300);

    // Wrong labels for every prediction: the accuracy status degrades.
    for (id, positive) in &ids {
        let label = if *positive { "negative" } else { "positive" };
        let r = post("/feedback", json!({"prediction_id": id, "label": label}));
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let again = post("/feedback", json!({"prediction_id": ids[0].0, "label": "positive"}));
    assert_eq!(again.status, 409, "{}", again.body);
    let unknown = post("/feedback", json!({"prediction_id": "nope", "label": "positive"}));
    assert_eq!(unknown.status, 404, "{}", unknown.body);
    let report = drift();
    assert_eq!(report["models"]["tfidf"]["performance"]["status"], "alert", "{report}");

    // One-sentence snippets fill the window: the length statistic alerts, in /metrics too.
    let snippets: Vec<String> = reviews.iter().map(|r| snippet(&r.text)).collect();
    client.predict_all(&snippets);
    let report = drift();
    assert_eq!(stat(&report["models"]["tfidf"], "length_psi"), "alert", "{report}");
    let metrics = http(&s.addr, "GET", "/metrics", &[], b"").body;
    assert!(
        metrics.contains("sentiflow_drift_status{model=\"tfidf\",statistic=\"length_psi\"} 2"),
        "{metrics}"
    );

    // Evaluations and predictions are stored; the texts themselves are not.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let history = drift()["history"].as_array().unwrap().clone();
    assert!(!history.is_empty());
    assert_eq!(history[0]["model"], "tfidf");
    let db = rusqlite::Connection::open(p.path("sentiflow.db")).unwrap();
    let (rows, texts, hashes): (i64, i64, i64) = db
        .query_row(
            "SELECT count(*), count(text), sum(length(text_sha256) = 64) FROM predictions",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!((rows, texts, hashes), (600, 0, 600));
}

#[test]
fn stored_predictions_are_kept_within_the_retention_setting() {
    let p = project();
    let s = Server::start(&p, &["--keep-predictions", "100", "--drift-period-s", "1"]);
    let client = Client::new(&p, &s);
    let post = |path: &str, body: Value| client.post(path, body);
    let reviews = heldout();
    let texts: Vec<&str> = reviews.iter().map(|r| r.text.as_str()).collect();
    let ids = client.predict_all(&texts);
    for id in [&ids[0], &ids[299]] {
        assert_eq!(
            post("/feedback", json!({"prediction_id": id, "label": "positive"})).status,
            200
        );
    }
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let db = rusqlite::Connection::open(p.path("sentiflow.db")).unwrap();
    let strings = |sql: &str| -> Vec<String> {
        let mut q = db.prepare(sql).unwrap();
        q.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
    };
    let kept = strings("SELECT id FROM predictions ORDER BY rowid");
    assert_eq!(kept, ids[200..], "the newest 100 are kept");
    let feedback = strings("SELECT prediction_id FROM feedback");
    assert_eq!(feedback, [ids[299].clone()], "feedback goes with its prediction");
    let metrics = http(&s.addr, "GET", "/metrics", &[], b"").body;
    assert!(metrics.contains("sentiflow_stored_predictions 100"), "{metrics}");
}

#[test]
fn a_database_that_cannot_take_writes_fails_only_the_requests_that_write() {
    let p = project();
    let s = Server::start(&p, &[]);
    let client = Client::new(&p, &s);
    let post = |path: &str, body: Value| client.post(path, body);
    let review = &heldout()[0].text;
    let id = post("/prediction", json!({"text": review})).json()["id"]
        .as_str()
        .unwrap()
        .to_string();

    let fresh = Client::new(&p, &s);
    // Another process holds the write lock for longer than the server's busy timeout (5 s).
    let mut db = rusqlite::Connection::open(p.path("sentiflow.db")).unwrap();
    let tx = db
        .transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)
        .unwrap();
    // A fresh key's first use is recorded, which now fails and is only counted.
    let r = fresh.post("/prediction", json!({"text": review}));
    assert_eq!(r.status, 200, "{}", r.body);
    // Feedback is a write: it is refused with 503 and a reason, and nothing is half-done.
    let r = post("/feedback", json!({"prediction_id": id, "label": "positive"}));
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "storage_unavailable", "{}", r.body);
    assert!(r.header("retry-after").is_some());
    tx.rollback().unwrap();
    let metrics = http(&s.addr, "GET", "/metrics", &[], b"").body;
    assert!(
        metrics.contains("sentiflow_store_write_failures_total{what=\"key_last_used\"} 1"),
        "{metrics}"
    );
    assert_eq!(
        post("/feedback", json!({"prediction_id": id, "label": "positive"})).status,
        200
    );
}

/// Requests with a new `admin` key.
fn admin_get(p: &Project, s: &Server) -> impl Fn(&str) -> Value {
    let auth = format!("Bearer {}", key(p, "admin"));
    let addr = s.addr.clone();
    move |path: &str| {
        let r = http(&addr, "GET", path, &[("Authorization", auth.as_str())], b"");
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
    }
}

#[test]
fn a_drift_alert_retrains_the_configured_pipeline_once_per_cooldown() {
    let p = project();
    p.write(
        "pipelines/retrain.yaml",
        "name: retrain\nparams: {tag: x}\nstages:\n  note: {uses: command, with: {run: 'echo ${params.tag} >> retrained.txt', outs: [retrained.txt]}}\n",
    );
    p.write(
        "serve.yaml",
        "drift_window: 300\nretrain:\n  pipeline: retrain\n  params: {tag: drift}\n  on: [drift_alert]\n  cooldown: 1h\n",
    );
    let s = Server::start(&p, &["--config", "serve.yaml", "--drift-period-s", "1"]);
    let client = Client::new(&p, &s);
    let admin = admin_get(&p, &s);
    let reviews = heldout();

    // Reviews like the reference: no alert, no run.
    let texts: Vec<&str> = reviews.iter().map(|r| r.text.as_str()).collect();
    client.predict_all(&texts);
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert_eq!(admin("/training")["total"], 0);

    // One-sentence snippets: the served model's drift alerts, and the policy starts one run.
    let snippets: Vec<String> = reviews.iter().map(|r| snippet(&r.text)).collect();
    client.predict_all(&snippets);
    assert_eq!(admin("/drift")["models"]["tfidf"]["status"], "alert");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let run = loop {
        let page = admin("/training?trigger=drift");
        if page["total"] == 1 && page["runs"][0]["status"] != "running" {
            break page["runs"][0].clone();
        }
        assert!(std::time::Instant::now() < deadline, "no drift run: {page}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(
        (run["pipeline"].as_str(), run["status"].as_str()),
        (Some("retrain"), Some("succeeded")),
        "{run}"
    );
    assert_eq!(p.read("retrained.txt"), "drift\n", "with the policy's params");
    assert_eq!(
        admin(&format!("/training/{}", run["id"].as_str().unwrap()))["trigger"],
        "drift"
    );

    // Further alert periods: the cooldown holds, and each decision is logged and counted.
    std::thread::sleep(std::time::Duration::from_millis(3500));
    let page = admin("/training?trigger=drift");
    assert_eq!(page["total"], 1, "{page}");
    assert_eq!(admin("/training")["total"], 1);
    let log = s.log.lock().unwrap().join("\n");
    assert!(log.contains("retraining retrain on drift: started run"), "{log}");
    assert!(
        log.contains("retraining retrain on drift: skipped: cooldown until"),
        "{log}"
    );
    let metrics = http(&s.addr, "GET", "/metrics", &[], b"").body;
    assert!(
        metrics.contains("sentiflow_retrain_total{trigger=\"drift\",outcome=\"started\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sentiflow_retrain_total{trigger=\"drift\",outcome=\"cooldown\"}"),
        "{metrics}"
    );
}

#[test]
fn a_schedule_retrains_every_period_and_a_restart_keeps_its_place() {
    let p = project();
    p.write(
        "pipelines/retrain.yaml",
        "name: retrain\nstages:\n  note: {uses: command, with: {run: 'date +%s%N >> ticks.txt', outs: [ticks.txt]}}\n",
    );
    let args = [
        "--retrain-pipeline",
        "retrain",
        "--retrain-every",
        "3s",
        "--retrain-cooldown",
        "1s",
    ];
    let started = |admin: &dyn Fn(&str) -> Value| -> Vec<chrono::DateTime<chrono::FixedOffset>> {
        let page = admin("/training?trigger=schedule&limit=100");
        let runs = page["runs"].as_array().unwrap();
        assert!(
            runs.iter().all(|r| r["status"] != "failed"),
            "scheduled runs succeed: {page}"
        );
        let mut at: Vec<_> = runs
            .iter()
            .map(|r| chrono::DateTime::parse_from_rfc3339(r["created_at"].as_str().unwrap()).unwrap())
            .collect();
        at.sort();
        at
    };
    let s = Server::start(&p, &args);
    let admin = admin_get(&p, &s);
    let boot = chrono::Utc::now();
    std::thread::sleep(std::time::Duration::from_millis(8500));
    let first = started(&admin);
    // At 3 s and 6 s after the start (give or take the 1 s tick): two runs, three at most.
    assert!((2..=3).contains(&first.len()), "{first:?}");
    assert!(
        first[0] >= boot + chrono::Duration::milliseconds(2500),
        "not before one period: {first:?}"
    );
    for pair in first.windows(2) {
        assert!(
            pair[1] - pair[0] >= chrono::Duration::milliseconds(2900),
            "a period apart: {first:?}"
        );
    }
    drop(s);

    // A server started more than a period after the last scheduled run trains at once: it counts
    // from that run in the database, not from its own start.
    std::thread::sleep(std::time::Duration::from_millis(3500));
    let restart = chrono::Utc::now();
    let s = Server::start(&p, &args);
    let admin = admin_get(&p, &s);
    std::thread::sleep(std::time::Duration::from_millis(2000));
    let all = started(&admin);
    assert_eq!(all.len(), first.len() + 1, "{all:?}");
    assert!(
        all[first.len()] < restart + chrono::Duration::milliseconds(2000),
        "{all:?}"
    );
    let log = s.log.lock().unwrap().join("\n");
    assert!(log.contains("retraining retrain on schedule: started run"), "{log}");
}

#[test]
fn a_wrong_retraining_policy_stops_serve_with_where_and_why() {
    let p = Project::new();
    p.write(
        "pipelines/retrain.yaml",
        "name: retrain\nstages:\n  note: {uses: command, with: {run: 'echo x > x.txt', outs: [x.txt]}}\n",
    );
    let serve = |extra: &[&str]| {
        let mut args = vec!["serve", "--addr", "127.0.0.1:0", "--config", "serve.yaml"];
        args.extend_from_slice(extra);
        p.sentiflow(&args)
    };
    p.write(
        "serve.yaml",
        "admin_rps: 5\nretrain:\n  pipeline: retrain\n  on: [drift_alert]\n  cooldwn: 1h\n",
    );
    let r = serve(&[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("serve.yaml:5:3: "), "{}", r.stderr);
    assert!(
        r.stderr.contains("unknown field `cooldwn`") && r.stderr.contains("`cooldown`"),
        "{}",
        r.stderr
    );

    p.write("serve.yaml", "retrain:\n  pipeline: retrain\n  every: 7 days\n");
    let r = serve(&[]);
    assert!(
        r.stderr.contains("serve.yaml:3:10: ") && r.stderr.contains("`7 days` is not a duration"),
        "{}",
        r.stderr
    );

    p.write("serve.yaml", "promotion:\n  min_shadow: 5\n  max_disagrement: 0.1\n");
    let r = serve(&[]);
    assert!(
        r.stderr.contains("serve.yaml:3:3: ") && r.stderr.contains("max_disagrement"),
        "{}",
        r.stderr
    );

    p.write("serve.yaml", "retrain:\n  pipeline: nope\n");
    let r = serve(&[]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("no pipeline `nope`") && r.stderr.contains("retrain"),
        "{}",
        r.stderr
    );

    p.write("serve.yaml", "admin_rps: 5\n");
    let r = serve(&["--retrain-every", "7d"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("--retrain-pipeline"), "{}", r.stderr);
}
