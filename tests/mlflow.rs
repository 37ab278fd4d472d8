//! Tracking against a real MLflow server (PyPI, installed by `scripts/test`), read back with the
//! MLflow Python client.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, quickstart};

fn tool(env: &str, name: &str) -> PathBuf {
    let path = std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin").join(name));
    assert!(
        path.exists(),
        "{name} not found at {}: run the tests with scripts/test, which installs requirements-dev.txt into .venv",
        path.display()
    );
    path
}

struct MlflowServer {
    child: Child,
    uri: String,
    _dir: tempfile::TempDir,
}

impl MlflowServer {
    fn start() -> MlflowServer {
        MlflowServer::start_in(tempfile::tempdir().unwrap(), free_port())
    }

    /// A server on `port` with its store in `dir` (a restart keeps the runs).
    fn start_in(dir: tempfile::TempDir, port: u16) -> MlflowServer {
        let child = Command::new(tool("SENTIFLOW_MLFLOW", "mlflow"))
            .args([
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--workers",
                "1",
            ])
            .arg("--backend-store-uri")
            .arg(format!("sqlite:///{}", dir.path().join("mlflow.db").display()))
            .arg("--artifacts-destination")
            .arg(dir.path().join("artifacts"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so that stopping it stops its workers too.
            .process_group(0)
            .spawn()
            .unwrap();
        let uri = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(120);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
            || common::http(&format!("127.0.0.1:{port}"), "GET", "/health", &[], b"").status != 200
        {
            assert!(Instant::now() < deadline, "the MLflow server did not start");
            std::thread::sleep(Duration::from_millis(200));
        }
        MlflowServer { child, uri, _dir: dir }
    }

    /// Kills the server; returns its store and port for a restart.
    fn stop(mut self) -> (tempfile::TempDir, u16) {
        self.kill();
        let port = self.uri.rsplit(':').next().unwrap().parse().unwrap();
        let dir = std::mem::replace(&mut self._dir, tempfile::tempdir().unwrap());
        (dir, port)
    }
}

impl MlflowServer {
    fn kill(&mut self) {
        // SAFETY: signalling the process group of our own child.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl Drop for MlflowServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads the quickstart's run back with MLflow's client. Given held-out reviews and `sentiflow
/// predict`'s output for them, also checks the git tags, loads the registered version with
/// `mlflow.pyfunc` and compares its predictions.
const CHECK: &str = r#"
import json, sys
from mlflow.tracking import MlflowClient
c = MlflowClient(sys.argv[1])
exp = c.get_experiment_by_name("quickstart")
runs = c.search_runs([exp.experiment_id])
parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
assert len(parents) == 1, parents
p = parents[0]
children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id]
assert len(children) == 4, f"one child run per tuning trial, got {len(children)}"
assert p.info.status == "FINISHED", p.info.status
assert p.info.run_name == f"quickstart-{p.info.run_id[:8]}", p.info.run_name
assert p.data.params["train.seed"] == "42", p.data.params
assert p.data.params["params.data"] == "tests/fixtures/imdb_sample.tar.gz", p.data.params
assert 0.5 < p.data.metrics["train.accuracy"] <= 1.0, p.data.metrics
assert p.data.metrics["load.rows"] == 400, p.data.metrics
tags = p.data.tags
assert len(tags["sentiflow.key.train"]) == 64, tags
data_hash = tags["sentiflow.data.tests/fixtures/imdb_sample.tar.gz"]
assert tags["mlflow.source.name"] == "pipelines/quickstart.yaml", tags
assert tags["mlflow.source.type"] == "LOCAL", tags
assert tags["mlflow.user"], tags
if len(sys.argv) > 2:
    assert len(tags["mlflow.source.git.commit"]) == 40, tags
    assert tags["sentiflow.git.dirty"] == "false", tags

# Datasets: the loaded archive for training, the split's validation part.
inputs = {i.tags[0].value: i.dataset for i in p.inputs.dataset_inputs}
assert sorted(inputs) == ["training", "validation"], p.inputs
train, valid = inputs["training"], inputs["validation"]
assert train.name == "imdb_sample.tar.gz" and train.digest == data_hash[:16], train
assert json.loads(train.source)["uri"].endswith("tests/fixtures/imdb_sample.tar.gz"), train.source
assert json.loads(train.profile)["num_rows"] == 400, train.profile
assert "text" in [col["name"] for col in json.loads(train.schema)["mlflow_colspec"]], train.schema
assert valid.name == "data/quickstart/split/valid.parquet" and len(valid.digest) == 16, valid
assert json.loads(valid.profile)["num_rows"] == p.data.metrics["split.valid_rows"], valid.profile

top = sorted(a.path for a in c.list_artifacts(p.info.run_id))
assert top == ["train", "tune"], top
assert "tune/trials.csv" in [a.path for a in c.list_artifacts(p.info.run_id, "tune")]
import os, tempfile
plots = ["train/confusion_matrix.png", "train/roc_curve.png", "tune/score_vs_C.png"]
with tempfile.TemporaryDirectory() as d:
    for path in plots:
        local = c.download_artifacts(p.info.run_id, path, d)
        head = open(local, "rb").read(8)
        assert head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(local) > 2000, (path, head)
child = children[0]
assert {"model.model", "model.C", "vectorizer"} <= set(child.data.params), child.data.params
assert child.info.run_name.startswith(child.data.params["model.model"] + " C="), child.info.run_name
assert "accuracy_mean" in child.data.metrics and "roc_auc_std" in child.data.metrics, child.data.metrics
assert len(c.get_metric_history(child.info.run_id, "fold_score")) == 3

# The bundle is a logged model of the run, with its validation metrics on the validation data.
models = c.search_logged_models(experiment_ids=[exp.experiment_id])
assert len(models) == 1, models
m = models[0]
assert m.name == "tfidf" and m.source_run_id == p.info.run_id and m.status == "READY", m
assert m.model_type == "sentiflow-tfidf" and "model.C" in m.params, m
assert [o.model_id for o in p.outputs.model_outputs] == [m.model_id], p.outputs
accuracy = [x for x in m.metrics if x.key == "export_tfidf.accuracy"]
assert len(accuracy) == 1 and 0.5 < accuracy[0].value <= 1.0, m.metrics
assert accuracy[0].dataset_digest == valid.digest, accuracy
files = {a.path for a in c.list_logged_model_artifacts(m.model_id)}
assert {"MLmodel", "manifest.json", "weights.bin", "sentiflow_pyfunc.py", "requirements.txt"} <= files, files
versions = c.search_model_versions("name='quickstart-tfidf'")
assert [(v.run_id, v.source) for v in versions] == [(p.info.run_id, f"models:/{m.model_id}")], versions
assert "quickstart-tfidf" in m.tags["mlflow.modelVersions"], m.tags

if len(sys.argv) > 2:
    import mlflow, numpy as np
    mlflow.set_tracking_uri(sys.argv[1])
    reviews = [json.loads(line) for line in open(sys.argv[2])]
    rust = [json.loads(line) for line in open(sys.argv[3])]
    model = mlflow.pyfunc.load_model(f"models:/quickstart-tfidf/{versions[0].version}")
    out = model.predict([r["text"] for r in reviews])
    assert list(out.columns) == ["label", "score"], out.columns
    assert list(out["label"]) == [r["label"] for r in rust]
    diff = np.abs(out["score"].to_numpy() - np.array([r["score"] for r in rust]))
    assert diff.max() <= 1e-6, diff.max()
    # A pandas column, as `mlflow models serve` passes it.
    import pandas as pd
    column = model.predict(pd.DataFrame({"text": [r["text"] for r in reviews[:5]]}))
    assert list(column["score"]) == list(out["score"][:5])
    print(f"pyfunc: {len(reviews)} reviews, same labels, max |dp| {diff.max():.3e}")
print("ok", p.info.run_id)
"#;

/// Makes the project a git repository with everything committed, as a checkout is.
fn commit_all(p: &common::Project) {
    for args in [
        &["init", "-q"][..],
        &["add", "-A"],
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.com",
            "commit",
            "-qm",
            "init",
        ],
    ] {
        let status = Command::new("git").args(args).current_dir(p.root()).status().unwrap();
        assert!(status.success(), "git {args:?}");
    }
}

#[test]
fn pipeline_runs_trials_artifacts_and_models_reach_mlflow() {
    let server = MlflowServer::start();
    let p = quickstart();
    commit_all(&p);
    let out = p
        .cmd(&["run", "pipelines/quickstart.yaml"])
        .env("MLFLOW_TRACKING_URI", &server.uri)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("tracked as MLflow run"), "{stderr}");

    // The registered version, loaded by MLflow's pyfunc, scores held-out reviews as sentiflow does.
    let heldout = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/imdb_heldout.jsonl");
    let predicted = p.sentiflow(&[
        "predict",
        "--model",
        "models/quickstart/tfidf",
        "--input",
        heldout.to_str().unwrap(),
    ]);
    assert_eq!(predicted.code, 0, "{}", predicted.stderr);
    p.write("predictions.jsonl", &predicted.stdout);
    let report = check(&server.uri, &[heldout, p.path("predictions.jsonl")]);
    eprintln!("{report}");
}

fn check(uri: &str, args: &[PathBuf]) -> String {
    let python = tool("SENTIFLOW_MLFLOW", "mlflow").with_file_name("python");
    let check = Command::new(python)
        .arg("-c")
        .arg(CHECK)
        .arg(uri)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&check.stdout).into_owned();
    assert!(
        check.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    stdout
}

#[test]
fn a_tracking_server_that_is_down_does_not_fail_the_pipeline() {
    let p = quickstart();
    let uri = format!("http://127.0.0.1:{}", free_port());
    let started = Instant::now();
    let out = p
        .cmd(&["run", "pipelines/quickstart.yaml", "--json"])
        .env("MLFLOW_TRACKING_URI", &uri)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(30), "retries are bounded");
    assert!(stderr.contains("sentiflow tracking sync"), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["tracking"]["status"], "queued", "{report}");
    let outbox = std::path::PathBuf::from(report["tracking"]["outbox"].as_str().unwrap());
    assert!(outbox.join("outbox.json").is_file());
    assert!(p.path("models/quickstart/tfidf/manifest.json").is_file());
}

/// The server dies while the pipeline runs; the run is queued, `tracking sync` fails while the
/// server is down and sends everything once it is back, even after the bundle was overwritten.
#[test]
fn a_run_queued_while_the_server_was_down_is_sent_by_sync() {
    let server = MlflowServer::start();
    let p = quickstart();
    let mut yaml = p.read("pipelines/quickstart.yaml");
    yaml.push_str("  pause:\n    uses: command\n    needs: [export_tfidf]\n    with: {run: \"sleep 2\"}\n");
    p.write("pipelines/quickstart.yaml", &yaml);
    let run = p
        .cmd(&["run", "pipelines/quickstart.yaml", "--json"])
        .env("MLFLOW_TRACKING_URI", &server.uri)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !p.path("models/quickstart/tfidf/manifest.json").is_file() {
        assert!(Instant::now() < deadline, "the pipeline did not get to its export");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (store, port) = server.stop();
    let out = run.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["tracking"]["status"], "queued", "{report}");

    // A later export replaces the bundle the outbox still has to upload.
    std::fs::remove_dir_all(p.path("models/quickstart/tfidf")).unwrap();

    let down = p.sentiflow(&["tracking", "sync"]);
    assert_eq!(down.code, 1, "{}{}", down.stdout, down.stderr);
    assert!(down.stdout.contains("still queued"), "{}", down.stdout);

    let server = MlflowServer::start_in(store, port);
    let sent = p.sentiflow(&["tracking", "sync"]);
    assert_eq!(sent.code, 0, "{}{}", sent.stdout, sent.stderr);
    assert!(sent.stdout.contains("sent quickstart"), "{}", sent.stdout);
    check(&server.uri, &[]);
    let again = p.sentiflow(&["tracking", "sync"]);
    assert!(again.stdout.contains("nothing to send"), "{}", again.stdout);
}

/// The MLflow version that alias `alias` of registered model `model` points at.
fn alias(uri: &str, model: &str, alias: &str) -> serde_json::Value {
    let addr = uri.trim_start_matches("http://");
    let path = format!("/api/2.0/mlflow/registered-models/alias?name={model}&alias={alias}");
    let r = common::http(addr, "GET", &path, &[], b"");
    assert_eq!(r.status, 200, "{model}@{alias}: {}", r.body);
    r.json()["model_version"]["version"].clone()
}

#[test]
fn promotion_and_candidates_set_the_registered_models_aliases() {
    use serde_json::json;
    let server = MlflowServer::start();
    let p = quickstart();
    let admin = common::key(&p, "admin");
    let env = [
        ("SENTIFLOW_LOG", "warn,sentiflow::serve=info"),
        ("MLFLOW_TRACKING_URI", server.uri.as_str()),
    ];
    let s = common::Server::start_env(&p, &["--promotion-min-shadow", "100000"], &env);
    let auth = format!("Bearer {admin}");
    let train = |seed: u64| {
        let body = json!({"pipeline": "quickstart", "params": {"seed": seed}}).to_string();
        let headers = [("Authorization", auth.as_str()), ("Content-Type", "application/json")];
        let r = common::http(&s.addr, "POST", "/training", &headers, body.as_bytes());
        assert_eq!(r.status, 202, "{}", r.body);
        let location = r.header("location").unwrap().to_string();
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let run = common::http(&s.addr, "GET", &location, &[("Authorization", auth.as_str())], b"").json();
            if run["status"] != "running" {
                assert_eq!(run["status"], "succeeded", "{run}");
                break;
            }
            assert!(Instant::now() < deadline, "{run}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // The first version is promoted; the second, with a gate, is the candidate.
    train(1);
    assert_eq!(alias(&server.uri, "quickstart-tfidf", "production"), "1");
    train(2);
    assert_eq!(alias(&server.uri, "quickstart-tfidf", "candidate"), "2");
    assert_eq!(alias(&server.uri, "quickstart-tfidf", "production"), "1");
}
