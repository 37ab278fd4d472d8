//! The remote stage cache against a real S3 server (SeaweedFS): machines sharing results, a
//! damaged object, concurrent pushes, a remote that is down.

mod common;

use std::collections::BTreeMap;

use common::s3::S3;
use common::{quickstart, stage, Project, Run};
use serde_json::Value;

const QUICKSTART: &str = "pipelines/quickstart.yaml";
const STAGES: [&str; 7] = ["load", "clean", "split", "vectorize", "tune", "train", "export_tfidf"];

/// `sentiflow ARGS` in `p`, with the server's variables.
fn sentiflow(p: &Project, s3: &S3, args: &[&str]) -> Run {
    let mut cmd = p.cmd(args);
    cmd.envs(s3.env()).env_remove("SENTIFLOW_REMOTE_CACHE");
    Run::from(cmd.output().unwrap())
}

/// Runs the quickstart pipeline with the remote cache `url` and gives its report.
fn run(p: &Project, s3: &S3, url: &str) -> (Value, String) {
    let r = sentiflow(p, s3, &["run", QUICKSTART, "--json", "--remote-cache", url]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    (r.json(), r.stderr)
}

fn states(report: &Value) -> BTreeMap<String, String> {
    STAGES
        .iter()
        .map(|s| (s.to_string(), stage(report, s)["state"].as_str().unwrap().to_string()))
        .collect()
}

fn all(state: &str) -> BTreeMap<String, String> {
    STAGES.iter().map(|s| (s.to_string(), state.to_string())).collect()
}

/// Every output file of the pipeline, by path, with its bytes.
fn outputs(p: &Project) -> BTreeMap<String, Vec<u8>> {
    common::files(p, &["data/quickstart", "models/quickstart", "reports"])
}

#[test]
fn a_fresh_checkout_fetches_every_stage_and_gets_the_same_files() {
    let s3 = S3::start();
    let url = s3.url("team/cache");
    let a = quickstart();
    let (report, stderr) = run(&a, &s3, &url);
    assert_eq!(states(&report), all("ran"));
    assert!(stderr.contains("7 ran, 0 cached, 0 fetched"), "{stderr}");
    let remote = s3.list("team/cache/runs");
    assert_eq!(remote.len(), STAGES.len(), "one run entry per stage: {remote:?}");
    for name in STAGES {
        let key = stage(&report, name)["key"].as_str().unwrap();
        assert!(
            s3.get(&format!("team/cache/runs/{}/{key}.json", &key[..2])).is_some(),
            "{name}"
        );
    }

    // Another machine: same pipeline and data, nothing cached.
    let b = quickstart();
    let (report, stderr) = run(&b, &s3, &url);
    assert_eq!(states(&report), all("fetched"), "{stderr}");
    assert!(stderr.contains("fetched  export_tfidf"), "{stderr}");
    assert!(stderr.contains("0 ran, 0 cached, 7 fetched"), "{stderr}");
    let (want, got) = (outputs(&a), outputs(&b));
    assert!(
        want.keys().any(|k| k.starts_with("models/quickstart/tfidf/")),
        "{:?}",
        want.keys()
    );
    assert_eq!(want.keys().collect::<Vec<_>>(), got.keys().collect::<Vec<_>>());
    for (path, bytes) in &want {
        assert!(got[path] == *bytes, "{path} differs");
    }
    // A fetched stage is recorded as the run that produced it.
    assert_eq!(b.read("pipelines/quickstart.lock"), a.read("pipelines/quickstart.lock"));

    // What was fetched is now in the local cache.
    let (report, _) = run(&b, &s3, &url);
    assert_eq!(states(&report), all("cached"));
}

#[test]
fn status_shows_what_the_remote_has_and_pull_brings_it() {
    let s3 = S3::start();
    let url = s3.url("status");
    let a = quickstart();
    run(&a, &s3, &url);

    // A checkout with the lock file (committed, as DVC's is) and an empty cache.
    let c = quickstart();
    std::fs::copy(a.path("pipelines/quickstart.lock"), c.path("pipelines/quickstart.lock")).unwrap();
    let r = sentiflow(&c, &s3, &["status", QUICKSTART, "--json", "--remote-cache", &url]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for s in r.json().as_array().unwrap() {
        assert_ne!(s["status"], "up_to_date", "{s}");
        assert_eq!(s["remote"], true, "{s}");
    }
    let r = sentiflow(&c, &s3, &["status", QUICKSTART, "--remote-cache", &s3.url("elsewhere")]);
    assert!(!r.stdout.contains("remote cache has it"), "{}", r.stdout);
    let r = sentiflow(&c, &s3, &["status", QUICKSTART]);
    assert!(!r.stdout.contains("remote"), "no remote, no word of it: {}", r.stdout);

    let r = sentiflow(&c, &s3, &["cache", "pull", QUICKSTART, "--remote-cache", &url]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.starts_with("pulled 7 run entries"), "{}", r.stdout);
    // Everything is local now: no remote needed.
    let r = sentiflow(&c, &s3, &["run", QUICKSTART, "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(states(&r.json()), all("cached"));
    assert_eq!(outputs(&a), outputs(&c));

    // `cache push` without a pipeline sends every local entry: all there already.
    let r = sentiflow(&c, &s3, &["cache", "push", "--remote-cache", &url]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.starts_with("pushed 0 run entries and 0 objects"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("7 were there already"), "{}", r.stdout);
}

#[test]
fn a_corrupt_remote_object_is_refused_and_the_stage_runs_again() {
    let s3 = S3::start();
    let url = s3.url("corrupt");
    let a = quickstart();
    let (report, _) = run(&a, &s3, &url);

    // Damage one object of `train`'s output on the remote.
    let train = stage(&report, "train");
    let out = &train["outs"][0];
    let (file, hash) = out["files"].as_object().unwrap().iter().next().unwrap();
    let hash = hash["hash"].as_str().unwrap();
    let name = format!("objects/{}/{hash}", &hash[..2]);
    let object = format!("corrupt/{name}");
    let good = s3.get(&object).unwrap();
    s3.put(&object, b"not what the name says");

    // Pushes never replace what is there: the damage stays until someone finds it.
    let r = sentiflow(&a, &s3, &["cache", "push", QUICKSTART, "--remote-cache", &url]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(s3.get(&object).unwrap(), b"not what the name says");

    let c = quickstart();
    let (report, stderr) = run(&c, &s3, &url);
    let mut want = all("fetched");
    // `train` is deterministic, so what needs it has the same key and is still fetched.
    want.insert("train".into(), "ran".into());
    assert_eq!(states(&report), want, "{stderr}");
    assert!(
        stderr.contains("train: discarding what the remote cache holds for key")
            && stderr.contains(&format!("remote cache {url}: corrupt `{name}`")),
        "the warning names the object: {stderr} ({file})"
    );
    assert_eq!(outputs(&a), outputs(&c));
    // The run that found the damage replaced it with its own good copy.
    assert_eq!(s3.get(&object).unwrap(), good);
}

/// Anyone who can write the bucket can rewrite a run entry so that an output names another
/// object that exists. With the team's secret, such an entry is refused and its stage runs again.
#[test]
fn a_rewritten_run_entry_is_refused_when_entries_are_signed() {
    let s3 = S3::start();
    let url = s3.url("signed");
    let signed = |p: &Project| {
        let args = [
            "run",
            QUICKSTART,
            "--json",
            "--remote-cache",
            &url,
            "--remote-cache-secret",
            "team secret",
        ];
        let r = sentiflow(p, &s3, &args);
        assert_eq!(r.code, 0, "{}", r.stderr);
        r
    };
    let a = quickstart();
    let report = signed(&a).json();

    // `clean`'s entry, rewritten to name `load`'s output as its own.
    let key = stage(&report, "clean")["key"].as_str().unwrap().to_string();
    let entry_name = format!("signed/runs/{}/{key}.json", &key[..2]);
    let mut entry: Value = serde_json::from_slice(&s3.get(&entry_name).unwrap()).unwrap();
    assert!(entry["mac"].is_string(), "entries are signed: {entry}");
    let load_out = &stage(&report, "load")["outs"][0];
    entry["outs"][0]["hash"] = load_out["hash"].clone();
    entry["outs"][0]["size"] = load_out["size"].clone();
    s3.put(&entry_name, &serde_json::to_vec(&entry).unwrap());

    let b = quickstart();
    let r = signed(&b);
    let mut want = all("fetched");
    // `clean` runs again; what follows it has the same key and is fetched.
    want.insert("clean".into(), "ran".into());
    assert_eq!(states(&r.json()), want, "{}", r.stderr);
    assert!(
        r.stderr.contains("its signature does not match its content"),
        "the warning says why: {}",
        r.stderr
    );
    assert_eq!(outputs(&a), outputs(&b), "no wrong bytes reach the checkout");

    // An entry written without the secret is refused the same way.
    entry.as_object_mut().unwrap().remove("mac");
    s3.put(&entry_name, &serde_json::to_vec(&entry).unwrap());
    let c = quickstart();
    let r = signed(&c);
    assert_eq!(stage(&r.json(), "clean")["state"], "ran", "{}", r.stderr);
    assert!(
        r.stderr.contains("it is not signed with the team's secret"),
        "{}",
        r.stderr
    );
}

#[test]
fn two_pushes_of_the_same_entries_at_once_both_succeed() {
    let s3 = S3::start();
    let url = s3.url("race");
    let a = quickstart();
    let r = a.sentiflow(&["run", QUICKSTART, "-q"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let b = quickstart();
    let r = b.sentiflow(&["run", QUICKSTART, "-q"]);
    assert_eq!(r.code, 0, "{}", r.stderr);

    let push = |p: &Project| {
        let mut cmd = p.cmd(&["cache", "push", QUICKSTART, "--remote-cache", &url]);
        cmd.envs(s3.env());
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        cmd.spawn().unwrap()
    };
    let (first, second) = (push(&a), push(&b));
    for child in [first, second] {
        let r = Run::from(child.wait_with_output().unwrap());
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert!(r.stdout.starts_with("pushed "), "{}", r.stdout);
    }
    assert_eq!(s3.list("race/runs").len(), STAGES.len());
    let objects = std::fs::read_dir(a.path("cache/objects"))
        .unwrap()
        .map(|d| std::fs::read_dir(d.unwrap().path()).unwrap().count())
        .sum::<usize>();
    assert_eq!(s3.list("race/objects").len(), objects);

    let c = quickstart();
    let (report, _) = run(&c, &s3, &url);
    assert_eq!(states(&report), all("fetched"));
    assert_eq!(outputs(&a), outputs(&c));
}

const TINY: &str = r#"
name: tiny
stages:
  a:
    uses: command
    with: {run: "echo a > out/a.txt", outs: [out/a.txt]}
  b:
    uses: command
    needs: [a]
    with: {run: "cat out/a.txt out/a.txt > out/b.txt", deps: [out/a.txt], outs: [out/b.txt]}
"#;

#[test]
fn a_run_carries_on_without_a_remote_that_is_down_but_push_fails() {
    let p = Project::new();
    let f = p.pipeline(TINY).to_string_lossy().into_owned();
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let env = [
        ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}")),
        ("AWS_ACCESS_KEY_ID", "k".into()),
        ("AWS_SECRET_ACCESS_KEY", "s".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ALLOW_HTTP", "true".into()),
        ("SENTIFLOW_REMOTE_CACHE", "s3://down/cache".into()),
    ];
    let r = Run::from(p.cmd(&["run", &f]).envs(env.clone()).output().unwrap());
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(p.read("out/b.txt"), "a\na\n");
    assert_eq!(
        r.stderr.matches("the remote cache is not usable").count(),
        1,
        "warned once: {}",
        r.stderr
    );
    assert!(r.stderr.contains("2 ran, 0 cached, 0 fetched"), "{}", r.stderr);

    let r = Run::from(p.cmd(&["cache", "push", &f]).envs(env.clone()).output().unwrap());
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .starts_with("error: pushing to s3://down/cache: remote cache s3://down/cache:")
            && r.stderr.contains("AWS_ENDPOINT_URL"),
        "{}",
        r.stderr
    );

    let r = Run::from(p.cmd(&["run", &f, "--remote-cache", "ftp://x"]).output().unwrap());
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("invalid remote cache `ftp://x`"), "{}", r.stderr);
}
