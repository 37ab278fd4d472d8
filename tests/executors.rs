//! Stages on executors, against real engines on this machine: a two-node Ray cluster (a head, and
//! a node with a stand-in GPU) and a single-host Slurm with a stand-in GPU, with SeaweedFS as the
//! remote cache that carries every stage's inputs and outputs.

mod common;

use std::collections::BTreeMap;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::ray::Ray;
use common::s3::S3;
use common::slurm::Slurm;
use common::{both_models, files, stage, Project, Run, BIN};
use serde_json::Value;

/// The quickstart's TF-IDF branch and the BERT branch at test scale. `tune`, `train` and
/// `finetune_bert` run on executors when the settings file has them; the rest here.
const PIPELINE: &str = r#"
name: remote
params:
  seed: 42
stages:
  load:
    uses: load
    with: {path: tests/fixtures/imdb_sample.tar.gz, out: data/reviews.parquet}
  clean:
    uses: clean
    needs: [load]
    with: {lowercase: true, min_chars: 20, out: data/clean.parquet}
  split:
    uses: split
    needs: [clean]
    with: {validation: 0.2, seed: 42, group: movie, out: data/split}
  vectorize:
    uses: vectorize
    needs: [split]
    with: {ngram: [1, 2], min_df: 2, sublinear_tf: true, out: data/tfidf}
  tune:
    uses: tune
    needs: [vectorize]
    runs_on: cluster
    resources: {cpus: 1, memory: 512M, timeout: 10m}
    with:
      folds: 3
      seed: 42
      group: movie
      models:
        - {model: logreg, C: [1, 10]}
      out: data/tune
  train:
    uses: train
    needs: [split, vectorize, tune]
    runs_on: cluster
    resources: {cpus: 1}
    with: {seed: 42, refit: true, out: data/model, metrics: reports/tfidf.json}
  export_tfidf:
    uses: export
    needs: [train]
    with: {name: tfidf, out: models/tfidf}
  finetune_bert:
    uses: bert_finetune
    needs: [split]
    runs_on: gpu
    resources: {gpus: 1, timeout: 20m}
    with:
      max_length: 32
      epochs: 1
      batch_size: 16
      subset: 64
      eval_subset: 32
      processes: 1
      seed: ${params.seed}
      out: data/bert
  export_bert:
    uses: bert_export
    needs: [finetune_bert, split]
    with: {name: bert, parity_reviews: 8, out: models/bert}
"#;

const REMOTE_STAGES: [&str; 3] = ["tune", "train", "finetune_bert"];

/// A project with the pipeline above as `pipelines/p.yaml`, the fixture and the BERT programs.
fn project(pipeline: &str) -> Project {
    let p = both_models();
    p.pipeline(pipeline);
    p
}

/// `sentiflow --config settings.yaml ARGS` in `p`, with the S3 server's variables.
fn command(p: &Project, s3: &S3, extra_env: &[(&str, String)], args: &[&str]) -> std::process::Command {
    let mut cmd = p.cmd(&[&["--config", "settings.yaml"], args].concat());
    cmd.envs(s3.env())
        .envs(extra_env.iter().map(|(k, v)| (*k, v.as_str())))
        .env_remove("SENTIFLOW_REMOTE_CACHE")
        .env_remove("SENTIFLOW_CONFIG");
    cmd
}

fn sentiflow(p: &Project, s3: &S3, extra_env: &[(&str, String)], args: &[&str]) -> Run {
    Run::from(command(p, s3, extra_env, args).output().unwrap())
}

/// The bundles and reports of a local run of the pipeline: what every executor must reproduce.
fn local_reference() -> BTreeMap<String, Vec<u8>> {
    let p = project(PIPELINE);
    let r = p.sentiflow(&["run", "pipelines/p.yaml", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for s in REMOTE_STAGES {
        assert!(stage(&r.json(), s).get("placement").is_none(), "{s} ran here");
    }
    files(&p, &["models", "reports", "data/tune", "data/model"])
}

fn differing(a: &BTreeMap<String, Vec<u8>>, b: &BTreeMap<String, Vec<u8>>) -> Vec<String> {
    let mut names: Vec<String> = a.keys().chain(b.keys()).cloned().collect();
    names.dedup();
    names.into_iter().filter(|n| a.get(n) != b.get(n)).collect()
}

fn settings(p: &Project, s3: &S3, prefix: &str, executors: &str) {
    p.write(
        "settings.yaml",
        &format!("remote_cache: {}\nexecutors:\n{executors}", s3.url(prefix)),
    );
}

/// Starts `sentiflow run` in the background.
fn spawn(p: &Project, s3: &S3, env: &[(&str, String)], file: &str) -> Child {
    command(p, s3, env, &["run", file, "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(child: Child) -> Run {
    Run::from(child.wait_with_output().unwrap())
}

/// Waits up to `secs` for `what` to hold.
fn wait_for(secs: u64, what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "waited {secs} s for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A stage on `executor` that takes `secs` seconds and writes one line, for the cancel and
/// re-attach cases.
fn slow(executor: &str, secs: u32, tag: &str) -> String {
    asking(executor, secs, tag, "{}")
}

/// [`slow`], asking for `resources`.
fn asking(executor: &str, secs: u32, tag: &str, resources: &str) -> String {
    format!(
        r#"
name: slow
stages:
  wait:
    uses: command
    runs_on: {executor}
    resources: {resources}
    with:
      run: sleep {secs} && mkdir -p out && echo {tag} > out/done.txt
      outs: [out/done.txt]
"#
    )
}

fn jobs(ray: &Ray) -> Vec<Value> {
    let agent = ureq::Agent::new_with_defaults();
    let text = agent
        .get(format!("{}/api/jobs/", ray.address))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    serde_json::from_str::<Vec<Value>>(&text).unwrap()
}

fn job_status(ray: &Ray, id: &str) -> String {
    jobs(ray)
        .into_iter()
        .find(|j| j["submission_id"] == id)
        .map(|j| j["status"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

fn sentiflow_jobs(ray: &Ray) -> Vec<Value> {
    jobs(ray)
        .into_iter()
        .filter(|j| j["submission_id"].as_str().is_some_and(|s| s.starts_with("sentiflow-")))
        .collect()
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, sig) };
}

#[test]
fn stages_run_on_a_ray_cluster_and_come_back_identical() {
    let s3 = S3::start();
    let mut env = s3.env();
    env.push(("SENTIFLOW_PYTHON", common::python().display().to_string()));
    let ray = Ray::start(&env);
    let reference = std::thread::spawn(local_reference);
    let executors = format!(
        "  gpu: {{engine: ray, address: '{0}', command: '{BIN}'}}\n  cluster: {{engine: ray, address: '{0}', command: '{BIN}'}}\n",
        ray.address
    );

    // The pipeline with its tune, train and finetune_bert stages on the cluster.
    let p = project(PIPELINE);
    settings(&p, &s3, "ray", &executors);
    let r = sentiflow(&p, &s3, &[], &["run", "pipelines/p.yaml", "--json"]);
    assert_eq!(r.code, 0, "{}\n{}", r.stderr, ray.log());
    let report = r.json();
    for s in REMOTE_STAGES {
        let at = &stage(&report, s)["placement"];
        assert_eq!(at["engine"], "ray", "{s}: {report}");
        assert!(at["job"].as_str().unwrap().starts_with("sentiflow-"), "{at}");
        assert_eq!(stage(&report, s)["state"], "ran");
    }
    // `gpus: 1` can only land on the node with the GPU.
    assert_eq!(
        stage(&report, "finetune_bert")["placement"]["node"],
        ray.gpu_node_id.as_str(),
        "{report}"
    );
    assert!(r.stderr.contains("ray job sentiflow-"), "{}", r.stderr);
    let remote = files(&p, &["models", "reports", "data/tune", "data/model"]);
    let reference = reference.join().unwrap();
    assert!(remote.len() > 10, "{:?}", remote.keys());
    assert_eq!(differing(&reference, &remote), Vec::<String>::new());
    let submitted = sentiflow_jobs(&ray).len();
    assert_eq!(submitted, REMOTE_STAGES.len());

    // A second machine (a fresh project and cache) finds every result in the remote cache and
    // submits nothing.
    let q = project(PIPELINE);
    settings(&q, &s3, "ray", &executors);
    let r = sentiflow(&q, &s3, &[], &["run", "pipelines/p.yaml", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for s in REMOTE_STAGES {
        assert_eq!(stage(&r.json(), s)["state"], "fetched", "{s}");
    }
    assert_eq!(sentiflow_jobs(&ray).len(), submitted, "a rerun submits nothing");
    assert_eq!(
        differing(&remote, &files(&q, &["models", "reports", "data/tune", "data/model"])),
        Vec::<String>::new()
    );

    // A request no node can meet ends at once with the resource named, never pending forever.
    let b = project(&asking("gpu", 1, "big", "{gpus: 2}"));
    settings(&b, &s3, "ray", &executors);
    let clock = Instant::now();
    let r = sentiflow(&b, &s3, &[], &["run", "pipelines/p.yaml", "--json"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let error = stage(&r.json(), "wait")["error"].as_str().unwrap().to_string();
    assert!(error.contains("gpus: 2 (the most any node has: 1)"), "{error}");
    assert!(clock.elapsed() < Duration::from_secs(60));
    assert_eq!(sentiflow_jobs(&ray).len(), submitted, "nothing was submitted");

    // A job that fails brings its log's tail back in the stage's error.
    let failing = slow("cluster", 0, "never").replace(
        "run: sleep 0 && mkdir -p out && echo never > out/done.txt",
        "run: echo the-last-words && exit 3",
    );
    let e = project(&failing);
    settings(&e, &s3, "ray", &executors);
    let r = sentiflow(&e, &s3, &[], &["run", "pipelines/p.yaml", "--json"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let error = stage(&r.json(), "wait")["error"].as_str().unwrap().to_string();
    assert!(error.contains("failed") && error.contains("the-last-words"), "{error}");

    // Ctrl-C stops the job, and the stage leaves no entry.
    let c = project(&slow("cluster", 60, "cancelled"));
    settings(&c, &s3, "ray", &executors);
    let child = spawn(&c, &s3, &[], "pipelines/p.yaml");
    let mut id = String::new();
    wait_for(60, "the slow job to run", || {
        let running = sentiflow_jobs(&ray).into_iter().find(|j| j["status"] == "RUNNING");
        running
            .map(|j| id = j["submission_id"].as_str().unwrap().to_string())
            .is_some()
    });
    signal(&child, libc::SIGINT);
    let r = finish(child);
    assert_eq!(r.code, 130, "{}", r.stderr);
    assert_eq!(stage(&r.json(), "wait")["state"], "interrupted");
    wait_for(30, "the job to stop", || job_status(&ray, &id) == "STOPPED");
    assert!(s3.list("ray/runs").is_empty() || !c.path("out/done.txt").exists());
    let key = stage(&r.json(), "wait")["key"].as_str().unwrap().to_string();
    assert!(s3.get(&format!("ray/runs/{}/{key}.json", &key[..2])).is_none());

    // A client killed mid-stage runs again and follows the same job instead of submitting another.
    let k = project(&slow("cluster", 8, "reattached"));
    settings(&k, &s3, "ray", &executors);
    let child = spawn(&k, &s3, &[], "pipelines/p.yaml");
    let before = sentiflow_jobs(&ray).len();
    wait_for(60, "the job to run", || {
        sentiflow_jobs(&ray)
            .iter()
            .any(|j| j["status"] == "RUNNING" && j["submission_id"] != id.as_str())
    });
    signal(&child, libc::SIGKILL);
    let _ = finish(child);
    let r = sentiflow(&k, &s3, &[], &["run", "pipelines/p.yaml", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("following it"), "{}", r.stderr);
    assert_eq!(sentiflow_jobs(&ray).len(), before + 1, "one job for both clients");
    assert_eq!(k.read("out/done.txt"), "reattached\n");

    // A training started through the API on a server with executors uses them, and its status
    // says where each stage runs, with a link to the job in Ray's dashboard.
    let a = project(&slow("cluster", 1, "served"));
    settings(&a, &s3, "ray", &executors);
    let admin = common::key(&a, "admin");
    let env: Vec<(&str, String)> = s3.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = common::Server::start_env(&a, &["--config", "settings.yaml"], &env);
    let started = common::post(&server, "/training", &admin, &serde_json::json!({"pipeline": "p"}));
    assert_eq!(started.status, 202, "{}", started.body);
    let id = started.json()["id"].as_str().unwrap().to_string();
    let auth = format!("Bearer {admin}");
    let mut run = Value::Null;
    wait_for(120, "the API's training to end", || {
        run = common::http(
            &server.addr,
            "GET",
            &format!("/training/{id}"),
            &[("Authorization", &auth)],
            b"",
        )
        .json();
        !matches!(run["status"].as_str(), Some("queued" | "running"))
    });
    assert_eq!(run["status"], "succeeded", "{run}");
    let at = &run["stages"]["wait"]["placement"];
    assert_eq!(at["engine"], "ray", "{run}");
    assert!(
        at["url"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{}/#/jobs/sentiflow-", ray.address)),
        "{at}"
    );
    assert_eq!(a.read("out/done.txt"), "served\n");
    drop(server);

    // A search whose trials are jobs, at most 2 at once, writes what a local search writes.
    let search = PIPELINE
        .replace(
            "runs_on: cluster\n    resources: {cpus: 1, memory: 512M, timeout: 10m}",
            "runs_on: cluster\n    max_parallel: 2\n    resources: {cpus: 1}",
        )
        .replace(
            "- {model: logreg, C: [1, 10]}",
            "- {model: logreg, C: [0.3, 1, 10]}\n        - {model: nbsvm, C: [0.1, 1]}",
        );
    assert!(search.contains("max_parallel: 2") && search.contains("nbsvm"));
    let here = project(&search);
    let r = here.sentiflow(&["run", "pipelines/p.yaml", "--stage", "tune"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let f = project(&search);
    settings(&f, &s3, "ray", &executors);
    let ids = |jobs: &[Value]| -> Vec<String> { jobs.iter().map(|j| j["submission_id"].to_string()).collect() };
    let before = ids(&sentiflow_jobs(&ray));
    let r = sentiflow(&f, &s3, &[], &["run", "pipelines/p.yaml", "--stage", "tune", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("trial 4: ray job sentiflow-"), "{}", r.stderr);
    assert_eq!(
        files(&here, &["data/tune"]),
        files(&f, &["data/tune"]),
        "the gathered search is the local one"
    );
    let trials: Vec<Value> = sentiflow_jobs(&ray)
        .into_iter()
        .filter(|j| !before.contains(&j["submission_id"].to_string()))
        .collect();
    assert_eq!(trials.len(), 5, "one job a trial");
    // Never more than 2 at once: at every job's start, fewer than 2 others were running.
    let span = |j: &Value| (j["start_time"].as_u64().unwrap(), j["end_time"].as_u64().unwrap());
    for j in &trials {
        let (start, _) = span(j);
        let running = trials.iter().filter(|o| {
            let (s, e) = span(o);
            s < start && start < e
        });
        assert!(running.count() < 2, "{trials:?}");
    }

    // A worker of another version refuses the task.
    let w = Run::from(
        std::process::Command::new(BIN)
            .args([
                "stage",
                "exec",
                "--client-version",
                "0.0.1",
                "--remote-cache",
                &s3.url("ray"),
                &key,
            ])
            .envs(s3.env())
            .output()
            .unwrap(),
    );
    assert_eq!(w.code, 2, "{}", w.stderr);
    assert!(w.stderr.contains("install sentiflow 0.0.1"), "{}", w.stderr);
}

#[test]
fn stages_run_on_slurm_and_come_back_identical() {
    let s3 = S3::start();
    let slurm = Slurm::start();
    let reference = std::thread::spawn(local_reference);
    let mut env = slurm.env();
    env.push(("SENTIFLOW_PYTHON", common::python().display().to_string()));
    let executors = format!(
        "  gpu: {{engine: slurm, command: '{BIN}'}}\n  cluster: {{engine: slurm, command: '{BIN}', sbatch_args: [--export=ALL]}}\n"
    );

    let p = project(PIPELINE);
    settings(&p, &s3, "slurm", &executors);
    let r = sentiflow(&p, &s3, &env, &["run", "pipelines/p.yaml", "--json"]);
    assert_eq!(r.code, 0, "{}\n{}", r.stderr, slurm.log());
    let report = r.json();
    for s in REMOTE_STAGES {
        let at = &stage(&report, s)["placement"];
        assert_eq!(at["engine"], "slurm", "{s}: {report}");
        assert!(at["job"].as_str().unwrap().parse::<u64>().is_ok(), "{at}");
        assert!(at["node"].is_string(), "{at}");
    }
    let remote = files(&p, &["models", "reports", "data/tune", "data/model"]);
    assert_eq!(differing(&reference.join().unwrap(), &remote), Vec::<String>::new());

    // A rerun elsewhere submits nothing.
    let q = project(PIPELINE);
    settings(&q, &s3, "slurm", &executors);
    let r = sentiflow(&q, &s3, &env, &["run", "pipelines/p.yaml", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for s in REMOTE_STAGES {
        assert_eq!(stage(&r.json(), s)["state"], "fetched", "{s}");
        assert!(stage(&r.json(), s).get("placement").is_none());
    }

    // Two GPUs on a one-GPU cluster: refused by sbatch, named in the error.
    let b = project(&asking("gpu", 1, "big", "{gpus: 2}"));
    settings(&b, &s3, "slurm", &executors);
    let r = sentiflow(&b, &s3, &env, &["run", "pipelines/p.yaml", "--json"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let error = stage(&r.json(), "wait")["error"].as_str().unwrap().to_string();
    assert!(error.contains("gpus: 2"), "{error}");

    // Ctrl-C cancels the job; no entry.
    let c = project(&slow("cluster", 60, "cancelled"));
    settings(&c, &s3, "slurm", &executors);
    let child = spawn(&c, &s3, &env, "pipelines/p.yaml");
    wait_for(60, "the slow job to run", || slurm.squeue().contains("RUNNING"));
    signal(&child, libc::SIGINT);
    let r = finish(child);
    assert_eq!(r.code, 130, "{}", r.stderr);
    wait_for(30, "the job to leave the queue", || {
        !slurm.squeue().contains("sentiflow-")
    });
    let key = stage(&r.json(), "wait")["key"].as_str().unwrap().to_string();
    assert!(s3.get(&format!("slurm/runs/{}/{key}.json", &key[..2])).is_none());

    // A killed client follows its job when it runs again.
    let k = project(&slow("cluster", 8, "reattached"));
    settings(&k, &s3, "slurm", &executors);
    let child = spawn(&k, &s3, &env, "pipelines/p.yaml");
    wait_for(60, "the job to run", || slurm.squeue().contains("RUNNING"));
    signal(&child, libc::SIGKILL);
    let _ = finish(child);
    let r = sentiflow(&k, &s3, &env, &["run", "pipelines/p.yaml", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("following it"), "{}", r.stderr);
    assert_eq!(k.read("out/done.txt"), "reattached\n");
}
