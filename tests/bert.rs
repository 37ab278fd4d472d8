//! The BERT branch end to end on real reviews, with the real PyTorch, ONNX Runtime and server:
//! fine-tune MiniLM-L6 with `torchrun` (2 processes), export to ONNX with the parity check, score
//! in Rust, compare with Python ONNX Runtime, and serve beside the TF-IDF model.
//!
//! Needs the Python environment of `scripts/setup-python` (`scripts/test` provides it).

mod common;

use std::path::Path;

use common::prometheus::read_clean;
use common::{http, key, python, Project, Server};
use serde_json::{json, Value};

/// P(positive) from Python ONNX Runtime and the `tokenizers` package, one review at a time, cut to
/// the bundle's `max_length` as its `truncation` says.
fn python_probabilities(bundle: &Path, texts: &[&str]) -> Vec<f64> {
    let script = r#"
import json, sys
import numpy as np, onnxruntime as ort
from tokenizers import Tokenizer
bundle, max_length, truncation = sys.argv[1], int(sys.argv[2]), sys.argv[3]
budget = max_length - 2
head = {"head": budget, "head_tail": (budget + 2) // 4}[truncation]
tok = Tokenizer.from_file(f"{bundle}/tokenizer.json")
tok.no_truncation()
tok.no_padding()
sess = ort.InferenceSession(f"{bundle}/model.onnx", providers=["CPUExecutionProvider"])
for line in sys.stdin:
    ids = tok.encode(json.loads(line)["text"], add_special_tokens=False).ids
    if len(ids) > budget:
        ids = ids[:head] + ids[len(ids) - (budget - head):]
    ids = [tok.token_to_id("[CLS]"), *ids, tok.token_to_id("[SEP]")]
    feed = {k: np.array([v], dtype=np.int64) for k, v in
            [("input_ids", ids), ("attention_mask", [1] * len(ids)), ("token_type_ids", [0] * len(ids))]}
    z = sess.run(["logits"], feed)[0][0].astype(np.float64)
    print(json.dumps(float(1 / (1 + np.exp(z[0] - z[1])))))
"#;
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(bundle.join("manifest.json")).unwrap()).unwrap();
    let mut child = std::process::Command::new(python())
        .args(["-c", script])
        .arg(bundle)
        .arg(manifest["max_length"].to_string())
        .arg(manifest["truncation"].as_str().unwrap())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        for t in texts {
            writeln!(stdin, "{}", json!({ "text": t })).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect()
}

/// P(positive) from the bundle's MLflow flavor: `mlflow.pyfunc.load_model` on its directory.
fn pyfunc_probabilities(bundle: &Path, texts: &[&str]) -> Vec<f64> {
    let script = r#"
import json, sys
import mlflow.pyfunc
model = mlflow.pyfunc.load_model(sys.argv[1])
print(json.dumps(model.predict(json.load(sys.stdin))["score"].tolist()))
"#;
    let mut child = std::process::Command::new(python())
        .args(["-c", script])
        .arg(bundle)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(json!(texts).to_string().as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).unwrap()
}

const REVIEWS: [&str; 5] = [
    "One of the best films I have seen in years: moving, funny and beautifully acted.",
    "A boring, badly written mess. I want my two hours back.",
    "The plot was thin, but the performances carried it and the score is gorgeous.",
    "I walked out halfway. Wooden acting, a script full of clichés, and it looked cheap.",
    // Longer than the test's 64 tokens: its head and its tail are what the models see.
    "I had high hopes for this one. The opening twenty minutes are wonderful: a sharp, funny script, a \
     lovely score and two leads with real chemistry, and the photography of the old harbour town is \
     gorgeous. Then the plot arrives. A kidnapping subplot nobody asked for takes over, the villain \
     explains his plan three times, the jokes dry up, and the editing turns choppy and confusing. By the \
     last act I had stopped caring about anyone on screen. The ending is lazy, predictable and far too \
     long, and the final twist makes no sense at all. A dull, tedious waste of a promising start.",
];

#[test]
fn bert_branch_end_to_end() {
    let p = common::both_models();
    // Tracking to a server that is not there: the run's events, plots and per-epoch scores
    // included, are planned and queued.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = p
        .cmd(&["run", "pipelines/both.yaml", "--json"])
        .env("MLFLOW_TRACKING_URI", format!("http://{dead}"))
        .output()
        .unwrap();
    let run = common::Run::from(out);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let report = run.json();
    assert_eq!(report["tracking"]["status"], "queued", "{}", report["tracking"]);
    let outbox: Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(report["tracking"]["outbox"].as_str().unwrap()).join("outbox.json"))
            .unwrap(),
    )
    .unwrap();
    let text = outbox.to_string();
    assert!(text.contains("finetune_bert.epoch.valid_accuracy"), "per-epoch scores");
    assert!(text.contains("export_bert/roc_curve.png"), "plots of the BERT export");
    let finetune = common::stage(&report, "finetune_bert");
    assert_eq!(
        finetune["metrics"]["world_size"], 2,
        "torchrun ran 2 processes: {finetune}"
    );
    assert_eq!(finetune["metrics"]["train_reviews"], 256);

    // The bundle: ONNX model, tokenizer, parity checks inside their tolerances, Rust evaluation.
    let bundle = p.path("models/bert");
    let manifest: Value = serde_json::from_str(&p.read("models/bert/manifest.json")).unwrap();
    assert_eq!(manifest["kind"], "bert");
    assert_eq!(manifest["max_length"], 64);
    assert_eq!(manifest["truncation"], "head_tail");
    assert!(bundle.join("model.onnx").is_file() && bundle.join("tokenizer.json").is_file());
    let parity = manifest["onnx"]["parity"]["max_abs_logit_diff"].as_f64().unwrap();
    assert!(parity <= 1e-4, "PyTorch vs ONNX: {parity}");
    let runtimes = manifest["onnx"]["runtime_parity"]["max_abs_probability_diff"]
        .as_f64()
        .unwrap();
    assert!(runtimes <= 1e-4, "Rust vs Python ONNX Runtime: {runtimes}");
    let valid = manifest["metrics"]["reviews"].as_u64().unwrap();
    assert_eq!(
        valid, 80,
        "the whole validation part is scored: {}",
        manifest["metrics"]
    );
    let accuracy = manifest["metrics"]["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&accuracy));

    // `sentiflow predict` and Python ONNX Runtime agree on fresh reviews.
    let mut args = vec!["predict", "--model", "models/bert"];
    args.extend(REVIEWS);
    let predicted = p.sentiflow(&args);
    assert_eq!(predicted.code, 0, "{}", predicted.stderr);
    let rust: Vec<f64> = predicted
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["score"].as_f64().unwrap())
        .collect();
    let py = python_probabilities(&bundle, &REVIEWS);
    assert_eq!(rust.len(), REVIEWS.len());
    for (r, q) in rust.iter().zip(&py) {
        assert!((r - q).abs() <= 1e-4, "Rust {r} vs Python {q}");
    }
    // The bundle's MLflow python_function flavor scores as sentiflow does.
    let pyfunc = pyfunc_probabilities(&bundle, &REVIEWS);
    assert_eq!(pyfunc.len(), REVIEWS.len());
    let worst = rust.iter().zip(&pyfunc).map(|(r, q)| (r - q).abs()).fold(0.0, f64::max);
    assert!(worst <= 1e-4, "Rust vs mlflow.pyfunc: max |dp| {worst}");
    eprintln!("mlflow.pyfunc vs sentiflow predict: max |dp| {worst:.3e}");

    // Served beside the TF-IDF model; concurrent requests are batched and answer the same scores.
    let s = Server::start(&p, &["--batch-window-ms", "20"]);
    let k = key(&p, "predict");
    let auth = format!("Bearer {k}");
    let post = |body: &Value| {
        http(
            &s.addr,
            "POST",
            "/prediction",
            &[("Authorization", &auth), ("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        )
    };
    let tfidf = post(&json!({"text": REVIEWS[0]}));
    assert_eq!(tfidf.status, 200, "{}", tfidf.body);
    assert_eq!(tfidf.json()["model"], "tfidf");
    let served: Vec<Value> = std::thread::scope(|scope| {
        let handles: Vec<_> = REVIEWS
            .iter()
            .map(|t| scope.spawn(move || post(&json!({"text": t, "model": "bert"}))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap().json()).collect()
    });
    for (answer, expected) in served.iter().zip(&rust) {
        assert_eq!(answer["model"], "bert", "{answer}");
        assert_eq!(answer["version"], manifest["version"]);
        let score = answer["score"].as_f64().unwrap();
        assert!((score - expected).abs() <= 1e-4, "served {score} vs predict {expected}");
    }
    let best = http(
        &s.addr,
        "GET",
        "/best_model_parameter?model=bert",
        &[("Authorization", &auth)],
        b"",
    );
    assert_eq!(best.status, 200, "{}", best.body);
    assert_eq!(best.json()["parameters"]["max_length"], 64);
    assert_eq!(best.json()["parameters"]["truncation"], "head_tail");
    // After ONNX batches, /metrics still reads as one clean family per name.
    let metrics = http(&s.addr, "GET", "/metrics", &[], b"").body;
    let families = read_clean(&metrics);
    let texts = &families["sentiflow_onnx_batch_texts"];
    assert_eq!(texts.kind, "counter");
    let bert = texts
        .samples
        .iter()
        .find(|s| s["labels"]["model"] == "bert")
        .unwrap_or_else(|| panic!("{metrics}"));
    assert_eq!(bert["value"].as_f64(), Some(REVIEWS.len() as f64), "{metrics}");
    drop(s);

    full_queue_answers_503_with_retry_after(&p, &auth);
    missing_onnx_runtime_is_named(&p);
    gpu_without_its_runtime_is_explained(&p);
}

fn full_queue_answers_503_with_retry_after(p: &Project, auth: &str) {
    // One request waits at most; each request is a 64-review batch, so the worker stays busy.
    let s = Server::start(p, &["--batch-window-ms", "0", "--batch-queue", "1"]);
    let body = json!({"model": "bert", "texts": vec![REVIEWS[3]; 64]}).to_string();
    let statuses: Vec<(u16, Option<String>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                scope.spawn(|| {
                    let r = http(
                        &s.addr,
                        "POST",
                        "/prediction",
                        &[("Authorization", auth), ("Content-Type", "application/json")],
                        body.as_bytes(),
                    );
                    (r.status, r.header("retry-after").map(str::to_string))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(statuses.iter().any(|(s, _)| *s == 200), "{statuses:?}");
    let busy: Vec<_> = statuses.iter().filter(|(s, _)| *s == 503).collect();
    assert!(!busy.is_empty(), "{statuses:?}");
    assert!(
        busy.iter().all(|(_, retry)| retry.as_deref() == Some("1")),
        "{statuses:?}"
    );
    assert!(statuses.iter().all(|(s, _)| *s == 200 || *s == 503), "{statuses:?}");
}

fn missing_onnx_runtime_is_named(p: &Project) {
    let r = p
        .cmd(&["predict", "--model", "models/bert", "a fine film"])
        .env("ORT_DYLIB_PATH", p.path("no/libonnxruntime.so"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("ORT_DYLIB_PATH"), "{stderr}");
}

fn gpu_without_its_runtime_is_explained(p: &Project) {
    // The environment's onnxruntime is the CPU build: the CUDA execution provider cannot register.
    let r = p
        .cmd(&["predict", "--model", "models/bert", "--device", "cuda", "a fine film"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot run on cuda:0"), "{stderr}");
    assert!(stderr.contains("onnxruntime-gpu"), "{stderr}");
    assert!(r.stdout.is_empty(), "{}", String::from_utf8_lossy(&r.stdout));
}
