//! The TF-IDF branch end to end on real IMDB reviews (a 400-review sample of the training set),
//! and each stage's handling of bad input.

mod common;

use std::path::Path;

use common::{quickstart, stage, Project};
use serde_json::Value;

const FIXTURE: &str = "tests/fixtures/imdb_sample.tar.gz";

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn quickstart_trains_exports_and_predicts() {
    let p = quickstart();
    let r = p.sentiflow(&["run", "pipelines/quickstart.yaml", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let report = r.json();
    assert_eq!(stage(&report, "load")["metrics"]["rows"], 400);
    assert_eq!(stage(&report, "split")["metrics"]["valid_rows"], 80);
    let acc = stage(&report, "train")["metrics"]["accuracy"].as_f64().unwrap();
    assert!(
        acc > 0.7,
        "a model trained on 320 real reviews should beat chance clearly: {acc}"
    );
    assert_eq!(stage(&report, "tune")["metrics"]["trials"], 4);

    let bundle = p.path("models/quickstart/tfidf");
    let manifest: Value = serde_json::from_slice(&std::fs::read(bundle.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["format"], "sentiflow-bundle/1");
    assert_eq!(manifest["labels"], serde_json::json!(["negative", "positive"]));
    assert_eq!(manifest["metrics"]["accuracy"].as_f64().unwrap(), acc);
    assert!(manifest["files"]["weights.bin"].is_string());
    assert!(
        !manifest["inputs"].as_object().unwrap().is_empty(),
        "provenance hashes are recorded"
    );

    let r = p.sentiflow(&[
        "predict",
        "--model",
        "models/quickstart/tfidf",
        "A wonderful, moving film: great acting and a beautiful story. I loved it.",
        "Awful. Boring plot, terrible acting, a complete waste of time.",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let lines: Vec<Value> = r.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["id"], 1);
    assert_eq!(lines[0]["label"], "positive");
    assert_eq!(lines[1]["label"], "negative");
    let s0 = lines[0]["score"].as_f64().unwrap();
    assert!(s0 > 0.5 && s0 <= 1.0);

    p.write(
        "in.jsonl",
        "{\"id\": \"a\", \"text\": \"great film, loved it\"}\n\n{\"id\": 7, \"text\": \"worst movie ever, awful\"}\n",
    );
    let r = p.sentiflow(&["predict", "--model", "models/quickstart/tfidf", "--input", "in.jsonl"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let lines: Vec<Value> = r.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(
        (lines[0]["id"].clone(), lines[1]["id"].clone()),
        (Value::from("a"), Value::from(7))
    );

    // An unchanged rerun restores nothing and runs nothing.
    let lock = p.read("pipelines/quickstart.lock");
    let r = p.sentiflow(&["run", "pipelines/quickstart.yaml", "--json"]);
    let report = r.json();
    assert!(report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["state"] == "cached"));

    // A forced rerun runs every stage again and leaves the committed lock file as it was.
    let r = p.sentiflow(&["run", "pipelines/quickstart.yaml", "--force", "--json"]);
    assert!(r.json()["stages"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["state"] == "ran"));
    assert_eq!(p.read("pipelines/quickstart.lock"), lock);
}

/// The movies of one part of a split.
fn movies(p: &Project, part: &str) -> std::collections::BTreeSet<String> {
    let reviews = sentiflow::data::Reviews::read_parquet(&p.path(part)).unwrap();
    assert_eq!(reviews.without_movie(), 0, "{part}: every review has its movie");
    reviews.movie.into_iter().flatten().collect()
}

#[test]
fn grouped_split_keeps_each_movie_on_one_side_and_the_labels_balanced() {
    let p = quickstart();
    let r = p.sentiflow(&["run", "pipelines/quickstart.yaml", "--stage", "split", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let report = r.json();
    assert_eq!(stage(&report, "load")["metrics"]["movies"], 352);
    let m = &stage(&report, "split")["metrics"];
    let (train, valid) = (
        movies(&p, "data/quickstart/split/train.parquet"),
        movies(&p, "data/quickstart/split/valid.parquet"),
    );
    assert!(
        train.is_disjoint(&valid),
        "shared: {:?}",
        train.intersection(&valid).collect::<Vec<_>>()
    );
    assert_eq!(
        (m["train_movies"].as_u64(), m["valid_movies"].as_u64()),
        (Some(train.len() as u64), Some(valid.len() as u64))
    );
    let valid_rows = m["valid_rows"].as_f64().unwrap();
    assert!((valid_rows - 80.0).abs() <= 4.0, "about 20 % of 400: {m}");
    for part in ["train", "valid"] {
        let share = m[format!("{part}_positive_share")].as_f64().unwrap();
        assert!((share - 0.5).abs() < 0.03, "{part}: {share}");
    }
}

#[test]
fn refit_changes_the_weights_but_not_the_reported_validation_metrics() {
    let refitted = quickstart();
    let plain = quickstart();
    let yaml = plain.read("pipelines/quickstart.yaml");
    assert!(yaml.contains("refit: true"));
    plain.write(
        "pipelines/quickstart.yaml",
        &yaml.replace("refit: true", "refit: false"),
    );
    let mut cleaned = 0;
    for p in [&refitted, &plain] {
        let r = p.sentiflow(&["run", "pipelines/quickstart.yaml", "--json"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        cleaned = stage(&r.json(), "clean")["metrics"]["rows"].as_u64().unwrap();
    }
    let manifest =
        |p: &Project| -> Value { serde_json::from_str(&p.read("models/quickstart/tfidf/manifest.json")).unwrap() };
    let (a, b) = (manifest(&refitted), manifest(&plain));
    assert_eq!(
        a["metrics"], b["metrics"],
        "validation metrics come from the fit on the training part"
    );
    let valid_rows = a["metrics"]["confusion"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .map(|v| v.as_u64().unwrap())
        .sum::<u64>();
    assert_eq!(
        a["fitted_on"],
        serde_json::json!({"parts": ["train", "valid"], "rows": cleaned})
    );
    assert_eq!(
        b["fitted_on"],
        serde_json::json!({"parts": ["train"], "rows": cleaned - valid_rows})
    );
    let weights = |p: &Project| std::fs::read(p.path("models/quickstart/tfidf/weights.bin")).unwrap();
    assert_ne!(weights(&refitted), weights(&plain));
    assert_ne!(a["features"], b["features"], "the vocabulary is refitted too");
}

#[test]
fn grouping_needs_the_movie_of_every_review() {
    let p = Project::new();
    for (class, label) in [("pos", 9), ("neg", 2)] {
        for i in 0..6 {
            p.write(
                &format!("imdb/aclImdb/train/{class}/{i}_{label}.txt"),
                &format!("review {i} is {class}"),
            );
        }
    }
    let grouped = |data: &str, load_extra: &str| {
        let yaml = format!("name: g\nstages:\n  load: {{uses: load, with: {{path: {data}, out: out/r.parquet{load_extra}}}}}\n  split: {{uses: split, needs: [load], with: {{validation: 0.25, group: movie, out: out/s}}}}\n");
        p.write("pipelines/g.yaml", &yaml);
        p.sentiflow(&["run", "pipelines/g.yaml", "--json"]).json()
    };
    // No url files: the split says why it cannot group, instead of splitting at random.
    let report = grouped("imdb", "");
    let e = error_of(&report, "split");
    assert!(
        e.contains("grouping by movie is impossible: 12 of 12 reviews have no movie"),
        "{e}"
    );
    assert!(e.contains("urls_pos.txt") && e.contains("group_column"), "{e}");

    // With them, one movie per pair of reviews.
    for class in ["pos", "neg"] {
        let urls: String = (0..6)
            .map(|i| format!("http://www.imdb.com/title/tt{:07}/usercomments\n", i / 2))
            .collect();
        p.write(&format!("imdb/aclImdb/train/urls_{class}.txt"), &urls);
    }
    let report = grouped("imdb", "");
    assert_eq!(stage(&report, "load")["metrics"]["movies"], 3, "{report}");
    assert_eq!(stage(&report, "split")["state"], "ran", "{report}");
    let (train, valid) = (movies(&p, "out/s/train.parquet"), movies(&p, "out/s/valid.parquet"));
    assert!(
        train.is_disjoint(&valid) && train.len() + valid.len() == 3,
        "{train:?} {valid:?}"
    );

    // CSV: the movie comes from `group_column`.
    let mut csv = String::from("review,sentiment,film\n");
    for i in 0..12 {
        csv.push_str(&format!(
            "\"review {i}\",{},m{}\n",
            if i % 2 == 0 { "positive" } else { "negative" },
            i / 4
        ));
    }
    p.write("r.csv", &csv);
    let report = grouped("r.csv", ", group_column: film");
    assert_eq!(stage(&report, "load")["metrics"]["movies"], 3, "{report}");
    assert_eq!(stage(&report, "split")["state"], "ran", "{report}");
    let report = grouped("r.csv", "");
    assert!(
        error_of(&report, "split").contains("12 of 12 reviews have no movie"),
        "{report}"
    );
}

#[test]
fn bundles_are_byte_identical_whatever_the_parallelism() {
    let a = quickstart();
    let b = quickstart();
    assert_eq!(
        a.sentiflow(&["run", "pipelines/quickstart.yaml", "--jobs", "1"]).code,
        0
    );
    assert_eq!(
        b.sentiflow(&["run", "pipelines/quickstart.yaml", "--jobs", "2"]).code,
        0
    );
    let (fa, fb) = (
        files(&a.path("models/quickstart/tfidf")),
        files(&b.path("models/quickstart/tfidf")),
    );
    assert_eq!(fa.len(), 15, "model files, manifest and MLflow flavor");
    for ((na, ca), (nb, cb)) in fa.iter().zip(&fb) {
        assert_eq!(na, nb);
        assert!(ca == cb, "{na} differs between --jobs 1 and --jobs 2");
    }
    assert_eq!(
        a.read("pipelines/quickstart.lock")
            .lines()
            .filter(|l| l.contains("key:"))
            .collect::<Vec<_>>(),
        b.read("pipelines/quickstart.lock")
            .lines()
            .filter(|l| l.contains("key:"))
            .collect::<Vec<_>>()
    );
}

#[test]
fn predict_reports_bad_input_clearly() {
    let p = quickstart();
    assert_eq!(p.sentiflow(&["run", "pipelines/quickstart.yaml"]).code, 0);
    let r = p.sentiflow(&["predict", "--model", "nowhere", "text"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("nowhere: not a model bundle"), "{}", r.stderr);
    p.write("bad.jsonl", "{\"id\": 1, \"text\": \"fine\"}\n{\"id\": 2}\n");
    let r = p.sentiflow(&["predict", "--model", "models/quickstart/tfidf", "--input", "bad.jsonl"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("bad.jsonl:2: missing string field `text`"),
        "{}",
        r.stderr
    );
    p.write("bad.jsonl", "not json\n");
    let r = p.sentiflow(&["predict", "--model", "models/quickstart/tfidf", "--input", "bad.jsonl"]);
    assert!(r.stderr.contains("bad.jsonl:1: invalid JSON"), "{}", r.stderr);
}

/// Runs a load → clean → split → vectorize → tune pipeline over `data` (a path in the project).
fn run_small(p: &Project, data: &str, load_extra: &str, folds: usize) -> (i32, Value) {
    let yaml = format!(
        "name: small\nstages:\n  load:\n    uses: load\n    with: {{path: {data}, out: out/reviews.parquet{load_extra}}}\n  clean:\n    uses: clean\n    needs: [load]\n    with: {{out: out/clean.parquet}}\n  split:\n    uses: split\n    needs: [clean]\n    with: {{validation: 0.25, out: out/split}}\n  vectorize:\n    uses: vectorize\n    needs: [split]\n    with: {{ngram: [1, 1], min_df: 1, out: out/tfidf}}\n  tune:\n    uses: tune\n    needs: [vectorize]\n    with: {{folds: {folds}, models: [{{model: logreg, C: [1]}}], out: out/tune}}\n"
    );
    p.write("pipelines/small.yaml", &yaml);
    let r = p.sentiflow(&["run", "pipelines/small.yaml", "--json"]);
    (r.code, r.json())
}

fn error_of(report: &Value, name: &str) -> String {
    stage(report, name)["error"].as_str().unwrap_or_default().to_string()
}

fn csv_rows(n: usize) -> String {
    let mut s = String::from("review,sentiment\n");
    for i in 0..n {
        let (text, label) = if i % 2 == 0 {
            ("a truly great and lovely film", "positive")
        } else {
            ("a dull and awful mess", "negative")
        };
        s.push_str(&format!("\"{text} number {i}\",{label}\n"));
    }
    s
}

#[test]
fn csv_jsonl_and_parquet_load_with_rejections_counted() {
    let p = Project::new();
    let mut csv = csv_rows(20);
    csv.push_str("\"no label here\",\n,positive\n\"maybe\",unsure\n");
    p.write("reviews.csv", &csv);
    let (code, report) = run_small(&p, "reviews.csv", "", 2);
    assert_eq!(code, 0, "{report}");
    let m = &stage(&report, "load")["metrics"];
    assert_eq!(m["rows"], 20);
    assert_eq!(m["rejected_no_label"], 2);
    assert_eq!(m["rejected_empty"], 1);

    let mut jsonl = String::new();
    for i in 0..20 {
        jsonl.push_str(&format!(
            "{{\"t\": \"review {i} {}\", \"y\": {}}}\n",
            if i % 2 == 0 { "good" } else { "bad" },
            i % 2
        ));
    }
    jsonl.push_str("{broken\n");
    p.write("reviews.jsonl", &jsonl);
    let (code, report) = run_small(&p, "reviews.jsonl", ", text_column: t, label_column: y", 2);
    assert_eq!(code, 0, "{report}");
    assert_eq!(stage(&report, "load")["metrics"]["rows"], 20);
    assert_eq!(stage(&report, "load")["metrics"]["rejected_unreadable"], 1);

    // The Parquet table a load stage writes is itself loadable.
    std::fs::copy(p.path("out/reviews.parquet"), p.path("again.parquet")).unwrap();
    let (code, report) = run_small(
        &p,
        "again.parquet",
        ", text_column: text, label_column: label, id_column: id",
        2,
    );
    assert_eq!(code, 0, "{report}");
    assert_eq!(stage(&report, "load")["metrics"]["rows"], 20);
}

#[test]
fn imdb_directories_and_archives_load_alike() {
    let p = Project::new();
    for (class, label) in [("pos", 9), ("neg", 2)] {
        for i in 0..6 {
            p.write(
                &format!("imdb/aclImdb/train/{class}/{i}_{label}.txt"),
                &format!("review {i} is {class}<br />ok"),
            );
        }
    }
    p.write("imdb/aclImdb/train/unsup/0_0.txt", "unlabelled, ignored");
    std::fs::write(p.path("imdb/aclImdb/train/pos/99_10.txt"), b"bad \xff bytes").unwrap();
    p.write("imdb/aclImdb/train/neg/98_1.txt", "   ");
    let (code, report) = run_small(&p, "imdb", "", 2);
    assert_eq!(code, 0, "{report}");
    let m = &stage(&report, "load")["metrics"];
    assert_eq!(
        (m["rows"].clone(), m["positive"].clone()),
        (Value::from(12), Value::from(6))
    );
    assert_eq!(
        (m["rejected_non_utf8"].clone(), m["rejected_empty"].clone()),
        (Value::from(1), Value::from(1))
    );

    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::copy(repo.join(FIXTURE), p.path("sample.tar.gz")).unwrap();
    let (code, report) = run_small(&p, "sample.tar.gz", "", 5);
    assert_eq!(code, 0, "{report}");
    assert_eq!(stage(&report, "load")["metrics"]["rows"], 400);
}

#[test]
fn bad_inputs_fail_with_clear_errors() {
    let p = Project::new();
    p.write("empty.csv", "");
    let (code, report) = run_small(&p, "empty.csv", "", 2);
    assert_eq!(code, 1);
    assert!(error_of(&report, "load").contains("no column `review`"), "{report}");

    p.write("cols.csv", "text,label\nhello,positive\n");
    let (_, report) = run_small(&p, "cols.csv", "", 2);
    assert!(
        error_of(&report, "load").contains("no column `review`; columns are: text, label"),
        "{report}"
    );

    p.write("headeronly.csv", "review,sentiment\n");
    let (_, report) = run_small(&p, "headeronly.csv", "", 2);
    assert!(error_of(&report, "load").contains("no reviews loaded"), "{report}");

    let mut bytes = b"review,sentiment\n".to_vec();
    bytes.extend_from_slice(b"\"caf\xe9 latin-1\",positive\n");
    std::fs::write(p.path("latin1.csv"), bytes).unwrap();
    let (_, report) = run_small(&p, "latin1.csv", "", 2);
    assert!(error_of(&report, "load").contains("1 non_utf8"), "{report}");

    let one_class: String = csv_rows(20)
        .lines()
        .filter(|l| !l.ends_with("negative"))
        .collect::<Vec<_>>()
        .join("\n");
    p.write("oneclass.csv", &one_class);
    let (_, report) = run_small(&p, "oneclass.csv", "", 2);
    assert!(
        error_of(&report, "split").contains("only 0 negative review(s)"),
        "{report}"
    );
    assert_eq!(stage(&report, "tune")["state"], "skipped");

    p.write("tiny.csv", &csv_rows(12));
    let (_, report) = run_small(&p, "tiny.csv", "", 5);
    assert!(
        error_of(&report, "tune")
            .contains("5-fold cross-validation needs at least 5 negative training reviews, found 4"),
        "{report}"
    );

    let (_, report) = run_small(&p, "missing.csv", "", 2);
    assert!(
        error_of(&report, "load").contains("missing.csv does not exist"),
        "{report}"
    );
}

#[test]
fn missing_data_with_an_unreachable_url_says_where_to_put_it() {
    let p = Project::new();
    let extra = ", url: 'http://127.0.0.1:9/aclImdb_v1.tar.gz', sha256: c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe";
    let (code, report) = run_small(&p, "data/aclImdb_v1.tar.gz", extra, 2);
    assert_eq!(code, 1);
    let e = error_of(&report, "load");
    assert!(
        e.contains("downloading http://127.0.0.1:9/aclImdb_v1.tar.gz failed"),
        "{e}"
    );
    assert!(e.contains("put the file at") && e.contains("--set data=PATH"), "{e}");
}

#[test]
fn clean_reports_what_each_rule_removed() {
    let p = Project::new();
    let mut csv = csv_rows(20);
    csv.push_str("\"A truly great and lovely film number 0\",positive\n"); // duplicate once lowercased? no: case differs
    csv.push_str("\"a truly great<br />and lovely film number 0\",positive\n"); // duplicate after normalisation
    csv.push_str("\"hi\",negative\n");
    p.write("c.csv", &csv);
    let yaml = "name: c\nstages:\n  load: {uses: load, with: {path: c.csv, out: out/r.parquet}}\n  clean: {uses: clean, needs: [load], with: {min_chars: 5, out: out/c.parquet}}\n";
    p.write("pipelines/c.yaml", yaml);
    let r = p.sentiflow(&["run", "pipelines/c.yaml", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let report = r.json();
    let m = &stage(&report, "clean")["metrics"];
    assert_eq!(m["rows_in"], 23);
    assert_eq!(m["removed_duplicates"], 1);
    assert_eq!(m["removed_too_short"], 1);
    assert_eq!(m["rows"], 21);
}

#[test]
fn random_search_draws_the_requested_trials() {
    let p = Project::new();
    p.write("r.csv", &csv_rows(40));
    let yaml = "name: r\nstages:\n  load: {uses: load, with: {path: r.csv, out: out/r.parquet}}\n  split: {uses: split, needs: [load], with: {out: out/s}}\n  vec: {uses: vectorize, needs: [split], with: {ngram: [1, 2], min_df: 1, out: out/v}}\n  tune:\n    uses: tune\n    needs: [vec]\n    with:\n      search: random\n      trials: 5\n      folds: 3\n      models:\n        - {model: logreg, C: {log_uniform: [0.01, 100]}}\n        - {model: elasticnet, C: [1, 10], l1_ratio: {uniform: [0, 1]}}\n      out: out/t\n  train: {uses: train, needs: [vec, tune], with: {out: out/m}}\n";
    p.write("pipelines/r.yaml", yaml);
    let r = p.sentiflow(&["run", "pipelines/r.yaml", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let trials: Vec<Value> = serde_json::from_str(&p.read("out/t/trials.json")).unwrap();
    assert_eq!(trials.len(), 5);
    assert!(trials
        .iter()
        .all(|t| t["accuracy_mean"].as_f64().is_some() && t["folds"].as_array().unwrap().len() == 3));
    assert_eq!(p.read("out/t/trials.csv").lines().count(), 6);
    let best: Value = serde_json::from_str(&p.read("out/t/best.json")).unwrap();
    assert_eq!(best["vectorizer"], "vec");
}

#[test]
fn tune_grids_are_checked_when_the_pipeline_is_validated() {
    let p = Project::new();
    let yaml = "name: g\nstages:\n  tune:\n    uses: tune\n    with:\n      models:\n        - {model: logreg, C: [1, -1]}\n      out: out/t\n";
    p.write("pipelines/g.yaml", yaml);
    let r = p.sentiflow(&["validate", "pipelines/g.yaml"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr
            .contains("g.yaml:5:5: stage `tune`: models[0]: C must be a positive number, got -1"),
        "{}",
        r.stderr
    );
}
