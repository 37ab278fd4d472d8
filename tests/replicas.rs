//! Several `sentiflow serve` processes on one PostgreSQL database (a real server, started by the
//! tests): a promotion through one is served by the others within 2 s, one run per pipeline
//! holds across them, and the run of a server that died ends `interrupted` when its lease runs out.
//! With their artifacts in S3 (a real SeaweedFS), each replica downloads a version once, checked
//! against its manifest, and refuses one whose files were changed there. Behind nginx, clients
//! lose no request to a promotion or to a replica killed under load.

mod common;

use std::time::{Duration, Instant};

use common::s3::S3;
use common::{http, key, quickstart, Project, Response, Server};
use serde_json::{json, Value};

const REVIEW: &str = "A wonderful, moving film with a brilliant cast.";

fn call(s: &Server, method: &str, path: &str, key: &str, body: Option<&Value>) -> Response {
    let auth = format!("Bearer {key}");
    let mut headers = vec![("authorization", auth.as_str())];
    let bytes = body.map(|b| b.to_string()).unwrap_or_default();
    if body.is_some() {
        headers.push(("content-type", "application/json"));
    }
    http(&s.addr, method, path, &headers, bytes.as_bytes())
}

fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> (T, Duration) {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return (v, start.elapsed());
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn train(s: &Server, admin: &str, body: Value) -> Value {
    let r = call(s, "POST", "/training", admin, Some(&body));
    assert_eq!(r.status, 202, "{}", r.body);
    let location = r.header("location").unwrap().to_string();
    wait_for("the training", Duration::from_secs(120), || {
        let run = call(s, "GET", &location, admin, None).json();
        (run["status"] != "running").then_some(run)
    })
    .0
}

/// The version that answered a prediction, if one did (none is served before a promotion).
fn served_version(s: &Server, admin: &str) -> Option<String> {
    let r = call(s, "POST", "/prediction", admin, Some(&json!({"text": REVIEW})));
    (r.status == 200).then(|| r.json()["version"].as_str().unwrap().to_string())
}

fn on_postgres() -> Project {
    let mut p = quickstart();
    p.db = Some(common::postgres::database());
    p
}

#[test]
fn replicas_serve_one_registry_and_share_runs() {
    let p = on_postgres();
    p.write(
        "pipelines/slow.yaml",
        "name: slow\nstages:\n  wait: {uses: command, with: {run: 'sleep 60; echo done > out/w', outs: [out/w]}}\n",
    );
    let admin = key(&p, "admin");
    let lease = ["--no-auto-promote", "--run-lease-s", "3", "--admin-rps", "10000"];
    let mut a = Server::start(&p, &[&["--replica", "a"][..], &lease].concat());
    let b = Server::start(&p, &[&["--replica", "b"][..], &lease].concat());

    // Two versions trained through A; neither is served until promoted.
    for seed in [1, 2] {
        let run = train(&a, &admin, json!({"pipeline": "quickstart", "params": {"seed": seed}}));
        assert_eq!(run["status"], "succeeded", "{run}");
    }
    let models = call(&b, "GET", "/models", &admin, None).json();
    let versions: Vec<String> = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["version"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(versions.len(), 2, "B sees the versions A registered: {models}");

    // A promotion through either replica is served by the other within 2 s.
    for (via, other, version) in [(&a, &b, &versions[0]), (&b, &a, &versions[1]), (&a, &b, &versions[0])] {
        let r = call(via, "POST", &format!("/models/{version}/promote"), &admin, None);
        assert_eq!(r.status, 200, "{}", r.body);
        let (_, took) = wait_for(
            "the other replica serving the promoted version",
            Duration::from_secs(2),
            || (served_version(other, &admin).as_ref() == Some(version)).then_some(()),
        );
        eprintln!("promoted {version}: served by the other replica after {took:?}");
    }

    // One run per pipeline, whichever replica is asked.
    let r = call(&a, "POST", "/training", &admin, Some(&json!({"pipeline": "slow"})));
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.json()["id"].as_str().unwrap().to_string();
    let r = call(&b, "POST", "/training", &admin, Some(&json!({"pipeline": "slow"})));
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "already_running");
    assert!(
        r.json()["error"]["message"].as_str().unwrap().contains(&id),
        "{}",
        r.body
    );
    assert_eq!(r.header("location"), Some(format!("/training/{id}").as_str()));

    // A dies mid-training (SIGKILL: nothing of it runs); its run's lease runs out and B records
    // the run as interrupted, after which the pipeline can be trained again.
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    let (run, took) = wait_for("the dead replica's run interrupted", Duration::from_secs(15), || {
        let run = call(&b, "GET", &format!("/training/{id}"), &admin, None).json();
        (run["status"] != "running").then_some(run)
    });
    assert_eq!(run["status"], "interrupted", "{run}");
    assert!(run["error"].as_str().unwrap().contains("lease"), "{run}");
    eprintln!("the dead replica's run was interrupted after {took:?}");
    let r = call(&b, "POST", "/training", &admin, Some(&json!({"pipeline": "slow"})));
    assert_eq!(r.status, 202, "{}", r.body);
}

/// The version a finished training registered.
fn version_of(s: &Server, admin: &str, run: &Value) -> String {
    assert_eq!(run["status"], "succeeded", "{run}");
    let models = call(s, "GET", "/models", admin, None).json();
    let model = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["run_id"] == run["id"]);
    model.unwrap_or_else(|| panic!("no version of run {}: {models}", run["id"]))["version"]
        .as_str()
        .unwrap()
        .to_string()
}

/// What the clients of a load saw.
#[derive(Default)]
struct Tally {
    ok: usize,
    failed: Vec<String>,
}

/// `clients` threads predicting through `addr` until `stop` is set.
fn load(
    addr: &str,
    key: &str,
    clients: usize,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<std::thread::JoinHandle<Tally>> {
    (0..clients)
        .map(|_| {
            let (addr, key, stop) = (addr.to_string(), key.to_string(), stop.clone());
            std::thread::spawn(move || {
                let auth = format!("Bearer {key}");
                let body = json!({"text": REVIEW}).to_string();
                let headers = [("authorization", auth.as_str()), ("content-type", "application/json")];
                let mut tally = Tally::default();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let r = http(&addr, "POST", "/prediction", &headers, body.as_bytes());
                    if r.status == 200 {
                        tally.ok += 1;
                    } else {
                        tally.failed.push(format!("{} {}", r.status, r.body));
                    }
                }
                tally
            })
        })
        .collect()
}

/// PostgreSQL stopped under a serving replica: what needs no database (health, predictions with
/// a key already checked) answers 200 within 1 s throughout, and what needs it answers 503 within
/// 2 s; nothing hangs.
#[test]
fn a_replica_whose_database_stops_keeps_answering_what_needs_no_database() {
    let cluster = common::postgres::Cluster::start();
    let mut p = quickstart();
    p.db = Some(cluster.database());
    let (admin, predictor) = (key(&p, "admin"), key(&p, "predict"));
    let s = Server::start(&p, &[]);
    let run = train(&s, &admin, json!({"pipeline": "quickstart"}));
    assert_eq!(run["status"], "succeeded", "{run}");
    for _ in 0..3 {
        assert!(served_version(&s, &predictor).is_some());
    }

    cluster.stop();
    let timed = |method: &str, path: &str, key: &str, body: Option<&Value>| {
        let start = Instant::now();
        let r = call(&s, method, path, key, body);
        (r, start.elapsed())
    };
    let mut slowest = Duration::ZERO;
    for i in 0..16 {
        let (r, took) = if i % 2 == 0 {
            timed("GET", "/health", &predictor, None)
        } else {
            timed("POST", "/prediction", &predictor, Some(&json!({"text": REVIEW})))
        };
        assert_eq!(r.status, 200, "request {i} during the outage: {}", r.body);
        assert!(took < Duration::from_secs(1), "request {i} took {took:?}");
        slowest = slowest.max(took);
        std::thread::sleep(Duration::from_millis(600));
    }
    eprintln!("16 requests during the outage, slowest {slowest:?}");

    // What needs the database fails promptly, and says why.
    let fresh = format!("sf_{}", "0".repeat(64));
    for (method, path, key) in [
        ("GET", "/models", &admin),
        ("GET", "/training", &admin),
        ("GET", "/models", &fresh),
    ] {
        let (r, took) = timed(method, path, key, None);
        assert_eq!(r.status, 503, "{method} {path}: {}", r.body);
        assert_eq!(r.json()["error"]["code"], "storage_unavailable", "{}", r.body);
        assert!(took < Duration::from_secs(2), "{method} {path} took {took:?}");
    }
}

#[test]
fn two_replicas_behind_nginx_lose_no_request_to_a_promotion_or_a_dead_replica() {
    let p = on_postgres();
    p.write(
        "pipelines/slow.yaml",
        "name: slow\nstages:\n  wait: {uses: command, with: {run: 'sleep 60; echo done > out/w', outs: [out/w]}}\n",
    );
    let admin = key(&p, "admin");
    let flags = ["--no-auto-promote", "--run-lease-s", "3", "--admin-rps", "100000"];
    let a = Server::start(&p, &[&["--replica", "a"][..], &flags].concat());
    let mut b = Server::start(&p, &[&["--replica", "b"][..], &flags].concat());
    let lb = common::nginx::Nginx::start([&a.addr, &b.addr]);

    let run = train(&a, &admin, json!({"pipeline": "quickstart", "params": {"seed": 1}}));
    let first = version_of(&a, &admin, &run);
    assert_eq!(
        call(&a, "POST", &format!("/models/{first}/promote"), &admin, None).status,
        200
    );
    wait_for("B serving the first version", Duration::from_secs(2), || {
        (served_version(&b, &admin).as_deref() == Some(&first)).then_some(())
    });

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Instant::now();
    let clients = load(&lb.addr, &admin, 8, &stop);

    // Under load: a training through A finishes and is promoted through A; B follows.
    let run = train(&a, &admin, json!({"pipeline": "quickstart", "params": {"seed": 2}}));
    let second = version_of(&a, &admin, &run);
    assert_ne!(first, second, "another seed, another model");
    assert_eq!(
        call(&a, "POST", &format!("/models/{second}/promote"), &admin, None).status,
        200
    );
    let (_, took) = wait_for("B serving the promoted version", Duration::from_secs(2), || {
        (served_version(&b, &admin).as_deref() == Some(&second)).then_some(())
    });
    eprintln!("under load, B served the version promoted through A after {took:?}");

    // A training on B, then B is killed under the same load: nginx sends its share to A.
    let r = call(&b, "POST", "/training", &admin, Some(&json!({"pipeline": "slow"})));
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.json()["id"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_secs(2));
    b.child.kill().unwrap();
    b.child.wait().unwrap();
    let killed = Instant::now();

    let (run, took) = wait_for("the dead replica's run interrupted", Duration::from_secs(15), || {
        let run = call(&a, "GET", &format!("/training/{id}"), &admin, None).json();
        (run["status"] != "running").then_some(run)
    });
    assert_eq!(run["status"], "interrupted", "{run}");
    eprintln!("B's run was interrupted {took:?} after B was killed");
    while started.elapsed() < Duration::from_secs(20) || killed.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let tallies: Vec<Tally> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let ok: usize = tallies.iter().map(|t| t.ok).sum();
    let failed: Vec<&String> = tallies.iter().flat_map(|t| &t.failed).collect();
    eprintln!(
        "8 clients for {:.1} s through nginx: {ok} predictions, {} failed",
        started.elapsed().as_secs_f64(),
        failed.len()
    );
    assert!(ok > 100, "the clients were served: {ok}");
    assert!(
        failed.is_empty(),
        "{} failed, first: {:?}\nnginx: {}",
        failed.len(),
        failed.first(),
        lb.log()
    );

    // Both versions answered the clients, and A alone answers now, with the promoted one.
    assert_eq!(served_version(&a, &admin).as_deref(), Some(second.as_str()));
}

/// SHA-256 of `bytes`, in hex.
fn sha256(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}

#[test]
fn replicas_share_artifacts_in_object_storage() {
    let s3 = S3::start();
    let p = on_postgres();
    let admin = key(&p, "admin");
    let url = s3.url("artifacts");
    let mut env: Vec<(&str, String)> = s3.env();
    env.push((
        "SENTIFLOW_LOG",
        "warn,sentiflow::serve=info,sentiflow::registry=info".into(),
    ));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (cache_a, cache_b) = (p.path("cache-a"), p.path("cache-b"));
    let start = |name: &str, cache: &std::path::Path| {
        let cache = cache.to_str().unwrap();
        let args = ["--replica", name, "--no-auto-promote", "--admin-rps", "10000"];
        Server::start_env(
            &p,
            &[&args[..], &["--artifacts", url.as_str(), "--artifacts-cache", cache]].concat(),
            &env,
        )
    };
    let a = start("a", &cache_a);
    let b = start("b", &cache_b);

    // Two versions trained through A: each is in the bucket, manifest last, and recorded by URL.
    for seed in [1, 2] {
        let run = train(&a, &admin, json!({"pipeline": "quickstart", "params": {"seed": seed}}));
        assert_eq!(run["status"], "succeeded", "{run}");
    }
    let models = call(&b, "GET", "/models", &admin, None).json();
    let models = models["models"].as_array().unwrap().clone();
    assert_eq!(models.len(), 2, "{models:?}");
    let name = models[0]["name"].as_str().unwrap().to_string();
    let versions: Vec<String> = models.iter().map(|m| m["version"].as_str().unwrap().into()).collect();
    let mut manifests = Vec::new();
    for (m, version) in models.iter().zip(&versions) {
        let prefix = format!("artifacts/{name}/{version}");
        assert_eq!(m["path"], format!("{url}/{name}/{version}"), "{m}");
        let manifest: Value = serde_json::from_slice(&s3.get(&format!("{prefix}/manifest.json")).unwrap()).unwrap();
        let files = manifest["files"].as_object().unwrap().clone();
        let mut expected: Vec<String> = files.keys().map(|f| format!("{prefix}/{f}")).collect();
        expected.push(format!("{prefix}/manifest.json"));
        expected.sort();
        assert_eq!(s3.list(&prefix), expected);
        for (file, hash) in &files {
            assert_eq!(&sha256(&s3.get(&format!("{prefix}/{file}")).unwrap()), hash, "{file}");
        }
        manifests.push(files);
    }
    assert!(!cache_b.exists(), "B downloaded nothing before a promotion");

    // Promoted through A, the first version is downloaded by B, checked, and served within 2 s.
    let (v1, v2) = (&versions[0], &versions[1]);
    let r = call(&a, "POST", &format!("/models/{v1}/promote"), &admin, None);
    assert_eq!(r.status, 200, "{}", r.body);
    let (_, took) = wait_for("B serving the promoted version", Duration::from_secs(2), || {
        (served_version(&b, &admin).as_ref() == Some(v1)).then_some(())
    });
    eprintln!("promoted {v1} through A: served by B, downloaded from S3, after {took:?}");
    let copy = cache_b.join(&name).join(v1);
    for (file, hash) in &manifests[0] {
        assert_eq!(&sha256(&std::fs::read(copy.join(file)).unwrap()), hash, "{file}");
    }
    assert!(copy.join("manifest.json").is_file());

    // A file of the second version is changed in the bucket. Neither replica promotes it: A,
    // which has its own copy from the training, checks the stored one first, as B would load it.
    let (file, expected) = manifests[1]
        .iter()
        .find(|(f, _)| f.as_str() == "weights.bin")
        .or_else(|| manifests[1].iter().next())
        .map(|(f, h)| (f.clone(), h.as_str().unwrap().to_string()))
        .unwrap();
    let object = format!("artifacts/{name}/{v2}/{file}");
    let good = s3.get(&object).unwrap();
    let damaged = b"not the weights".to_vec();
    s3.put(&object, &damaged);
    let found = sha256(&damaged);
    for via in [&a, &b] {
        let r = call(via, "POST", &format!("/models/{v2}/promote"), &admin, None);
        assert_eq!(r.status, 409, "{}", r.body);
        let error = &r.json()["error"];
        assert_eq!(error["code"], "bundle_unavailable", "{error}");
        let message = error["message"].as_str().unwrap();
        for part in [
            v2.as_str(),
            file.as_str(),
            expected.as_str(),
            found.as_str(),
            "register the bundle again",
        ] {
            assert!(message.contains(part), "`{part}` in: {message}");
        }
    }
    for s in [&a, &b] {
        assert_eq!(
            served_version(s, &admin).as_ref(),
            Some(v1),
            "both keep the version they served"
        );
    }
    assert_eq!(
        call(&b, "GET", "/models", &admin, None).json()["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["version"] == v2.as_str())
            .unwrap()["status"],
        "archived",
        "older than the version promoted before it, and still not promoted"
    );
    assert!(
        !cache_b.join(&name).join(v2).exists(),
        "nothing of the refused version is cached"
    );
    let leftovers: Vec<_> = std::fs::read_dir(cache_b.join(&name))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(leftovers, [std::ffi::OsString::from(v1)], "no download left behind");

    // Repaired, it is promoted through B and served by A; then the first version again, through
    // B: its cached copy serves, downloaded only once.
    s3.put(&object, &good);
    let r = call(&b, "POST", &format!("/models/{v2}/promote"), &admin, None);
    assert_eq!(r.status, 200, "{}", r.body);
    wait_for("A serving the second version", Duration::from_secs(2), || {
        (served_version(&a, &admin).as_ref() == Some(v2)).then_some(())
    });
    let r = call(&b, "POST", &format!("/models/{v1}/promote"), &admin, None);
    assert_eq!(r.status, 200, "{}", r.body);
    wait_for("A serving the first version again", Duration::from_secs(2), || {
        (served_version(&a, &admin).as_ref() == Some(v1)).then_some(())
    });
    let downloads = b
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains(&format!("version {v1} downloaded")))
        .count();
    assert_eq!(downloads, 1, "{:?}", b.log.lock().unwrap());
}
