//! The engine end to end through the real binary: caching, parallelism, interruption, failure.

mod common;

use std::time::{Duration, Instant};

use common::{stage, Project};
use serde_json::Value;

fn states(report: &Value) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = list.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
    v.sort();
    v
}

const COUNTED: &str = r#"# a counts its runs in runs/a, b in runs/b
name: counted
description: first
params: {greeting: hello}
stages:
  a:
    uses: command
    with:
      run: "echo x >> runs/a && echo ${params.greeting} > out/a.txt"
      deps: [input.txt]
      outs: [out/a.txt]
  b:
    uses: command
    needs: [a]
    with:
      run: "echo x >> runs/b && cat out/a.txt out/a.txt > out/b.txt"
      deps: [out/a.txt]
      outs: [out/b.txt]
"#;

fn counted() -> (Project, String) {
    let p = Project::new();
    p.write("input.txt", "one\n");
    std::fs::create_dir_all(p.path("runs")).unwrap();
    let f = p.pipeline(COUNTED).to_string_lossy().into_owned();
    (p, f)
}

#[test]
fn cache_hits_do_not_run_stages() {
    let (p, f) = counted();
    let r = p.sentiflow(&["run", &f]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!((p.count("runs/a"), p.count("runs/b")), (1, 1));
    assert_eq!(p.read("out/b.txt"), "hello\nhello\n");

    let r = p.sentiflow(&["run", &f, "--json"]);
    assert_eq!(r.code, 0);
    assert_eq!(states(&r.json()), pairs(&[("a", "cached"), ("b", "cached")]));
    assert_eq!((p.count("runs/a"), p.count("runs/b")), (1, 1));

    // Cosmetic edits (description, layout) keep the cache.
    let reformatted = COUNTED
        .replace("description: first", "description: second")
        .replace("\n  b:", "\n\n  b:");
    p.pipeline(&reformatted);
    let r = p.sentiflow(&["run", &f, "--json"]);
    assert_eq!(states(&r.json()), pairs(&[("a", "cached"), ("b", "cached")]));

    // A deleted output is restored from the cache, not recomputed.
    std::fs::remove_file(p.path("out/b.txt")).unwrap();
    let r = p.sentiflow(&["run", &f, "--json"]);
    assert_eq!(states(&r.json()), pairs(&[("a", "cached"), ("b", "cached")]));
    assert_eq!(p.read("out/b.txt"), "hello\nhello\n");
    assert_eq!(p.count("runs/b"), 1);

    // --force runs again.
    let r = p.sentiflow(&["run", &f, "--force", "--stage", "a"]);
    assert_eq!(r.code, 0);
    assert_eq!((p.count("runs/a"), p.count("runs/b")), (2, 1));
}

#[test]
fn params_and_inputs_invalidate_exactly_what_they_reach() {
    let (p, f) = counted();
    assert_eq!(p.sentiflow(&["run", &f]).code, 0);

    // A parameter that changes a's output reruns a and then b.
    let r = p.sentiflow(&["run", &f, "--set", "greeting=hi", "--json"]);
    assert_eq!(states(&r.json()), pairs(&[("a", "ran"), ("b", "ran")]));
    assert_eq!(p.read("out/b.txt"), "hi\nhi\n");

    // Back to the old value: both results come from the cache.
    let r = p.sentiflow(&["run", &f, "--json"]);
    assert_eq!(states(&r.json()), pairs(&[("a", "cached"), ("b", "cached")]));
    assert_eq!((p.count("runs/a"), p.count("runs/b")), (2, 2));

    // A changed input reruns a; its output is unchanged, so b stays cached.
    p.write("input.txt", "two\n");
    let r = p.sentiflow(&["run", &f, "--json"]);
    let report = r.json();
    assert_eq!(states(&report), pairs(&[("a", "ran"), ("b", "cached")]));
    assert_ne!(stage(&report, "a")["key"], Value::Null);
}

#[test]
fn independent_stages_overlap_only_with_several_jobs() {
    let p = Project::new();
    let f = p
        .pipeline(
            "name: par\nstages:\n  a: {uses: command, with: {run: 'sleep 0.4; echo a > out/a', outs: [out/a]}}\n  b: {uses: command, with: {run: 'sleep 0.4; echo b > out/b', outs: [out/b]}}\n",
        )
        .to_string_lossy()
        .into_owned();
    let overlap = |jobs: &str| {
        let r = p.sentiflow(&["run", &f, "--jobs", jobs, "--force", "--json"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let report = r.json();
        let (a, b) = (stage(&report, "a"), stage(&report, "b"));
        let t = |s: &Value, k: &str| s[k].as_f64().unwrap();
        t(a, "started_at") < t(b, "finished_at") && t(b, "started_at") < t(a, "finished_at")
    };
    assert!(overlap("2"), "stages should overlap under --jobs 2");
    assert!(!overlap("1"), "stages must not overlap under --jobs 1");
}

#[test]
fn a_stage_starts_when_its_own_needs_are_done() {
    // c needs only a (fast); b is slow. c must not wait for b.
    let p = Project::new();
    let f = p
        .pipeline(
            "name: eager\nstages:\n  a: {uses: command, with: {run: 'echo a > out/a', outs: [out/a]}}\n  b: {uses: command, with: {run: 'sleep 1; echo b > out/b', outs: [out/b]}}\n  c: {uses: command, needs: [a], with: {run: 'cat out/a > out/c', deps: [out/a], outs: [out/c]}}\n",
        )
        .to_string_lossy()
        .into_owned();
    let r = p.sentiflow(&["run", &f, "--jobs", "2", "--json"]);
    let report = r.json();
    assert!(stage(&report, "c")["finished_at"].as_f64() < stage(&report, "b")["finished_at"].as_f64());
}

#[test]
fn a_failure_skips_exactly_its_dependents() {
    let p = Project::new();
    let f = p
        .pipeline(
            "name: fail\nstages:\n  bad: {uses: command, with: {run: 'echo oops >&2; exit 3'}}\n  child: {uses: command, needs: [bad], with: {run: 'true'}}\n  grandchild: {uses: command, needs: [child], with: {run: 'true'}}\n  other: {uses: command, with: {run: 'echo ok > out/o', outs: [out/o]}}\n  after_other: {uses: command, needs: [other], with: {run: 'true'}}\n",
        )
        .to_string_lossy()
        .into_owned();
    let r = p.sentiflow(&["run", &f, "--json"]);
    assert_eq!(r.code, 1, "a failed stage exits 1");
    let report = r.json();
    assert_eq!(
        states(&report),
        pairs(&[
            ("bad", "failed"),
            ("child", "skipped"),
            ("grandchild", "skipped"),
            ("other", "ran"),
            ("after_other", "ran")
        ])
    );
    assert!(stage(&report, "bad")["error"]
        .as_str()
        .unwrap()
        .contains("exit status: 3"));
    assert!(r.stderr.contains("[bad] oops"), "stage output is shown: {}", r.stderr);
}

#[test]
fn a_killed_run_resumes_from_finished_stages_and_never_uses_partial_outputs() {
    let p = Project::new();
    std::fs::create_dir_all(p.path("runs")).unwrap();
    let f = p
        .pipeline(
            "name: kill\nstages:\n  a: {uses: command, with: {run: 'echo x >> runs/a; echo a > out/a', outs: [out/a]}}\n  b:\n    uses: command\n    needs: [a]\n    with:\n      run: 'echo x >> runs/b; echo $$ > runs/b.pid; echo partial > out/b; while [ ! -f release ]; do sleep 0.05; done; echo done >> out/b'\n      deps: [out/a]\n      outs: [out/b]\n",
        )
        .to_string_lossy()
        .into_owned();
    let mut child = p.cmd(&["run", &f]).stderr(std::process::Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !p.path("out/b").exists() {
        assert!(Instant::now() < deadline, "stage b never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    let pid = p.read("runs/b.pid").trim().to_string();
    let _ = std::process::Command::new("kill").arg("-9").arg(&pid).status();

    let r = p.sentiflow(&["status", &f]);
    assert!(r.stdout.contains("a  up to date\nb  stale: never run"), "{}", r.stdout);

    p.write("release", "");
    let r = p.sentiflow(&["run", &f, "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(states(&r.json()), pairs(&[("a", "cached"), ("b", "ran")]));
    assert_eq!((p.count("runs/a"), p.count("runs/b")), (1, 2));
    assert_eq!(p.read("out/b"), "partial\ndone\n");
}

#[test]
fn a_corrupt_cache_object_is_discarded_and_recomputed() {
    let (p, f) = counted();
    assert_eq!(p.sentiflow(&["run", &f]).code, 0);
    // Corrupt every cached object, then remove the workspace outputs so they must be restored.
    for shard in std::fs::read_dir(p.path("cache/objects")).unwrap() {
        for obj in std::fs::read_dir(shard.unwrap().path()).unwrap() {
            std::fs::write(obj.unwrap().path(), "garbage").unwrap();
        }
    }
    std::fs::remove_dir_all(p.path("out")).unwrap();
    let r = p.sentiflow(&["run", &f, "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("discarding corrupt cache entry"), "{}", r.stderr);
    assert_eq!(states(&r.json()), pairs(&[("a", "ran"), ("b", "ran")]));
    assert_eq!(p.read("out/b.txt"), "hello\nhello\n");
    // The fresh entries are sound again.
    let r = p.sentiflow(&["run", &f, "--json"]);
    assert_eq!(states(&r.json()), pairs(&[("a", "cached"), ("b", "cached")]));
}

#[test]
fn a_corrupt_run_entry_is_discarded() {
    let (p, f) = counted();
    assert_eq!(p.sentiflow(&["run", &f]).code, 0);
    for shard in std::fs::read_dir(p.path("cache/runs")).unwrap() {
        for e in std::fs::read_dir(shard.unwrap().path()).unwrap() {
            std::fs::write(e.unwrap().path(), "{ truncated").unwrap();
        }
    }
    let r = p.sentiflow(&["run", &f, "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("corrupt cache entry"), "{}", r.stderr);
    assert_eq!(states(&r.json()), pairs(&[("a", "ran"), ("b", "ran")]));
}

#[test]
fn status_names_why_each_stage_is_stale() {
    let (p, f) = counted();
    let status = |extra: &[&str]| {
        let mut args = vec!["status", f.as_str()];
        args.extend_from_slice(extra);
        p.sentiflow(&args).stdout
    };
    assert!(status(&[]).contains("a  stale: never run"));
    assert_eq!(p.sentiflow(&["run", &f]).code, 0);
    let s = status(&[]);
    assert!(s.contains("a  up to date") && s.contains("b  up to date"), "{s}");

    let s = status(&["--set", "greeting=yo"]);
    assert!(s.contains("a  stale: params changed (run)"), "{s}");
    assert!(s.contains("b  stale: upstream stage `a` is stale"), "{s}");

    p.write("input.txt", "changed\n");
    assert!(status(&[]).contains("a  stale: input changed (input.txt)"));
    p.write("input.txt", "one\n");

    std::fs::write(p.path("out/b.txt"), "tampered").unwrap();
    assert!(status(&[]).contains("b  stale: output modified (out/b.txt)"));
    std::fs::remove_file(p.path("out/b.txt")).unwrap();
    assert!(status(&[]).contains("b  stale: output missing (out/b.txt)"));

    let lock = p.read("pipelines/p.lock").replacen("version: 1", "version: 0", 1);
    p.write("pipelines/p.lock", &lock);
    assert!(status(&[]).contains("a  stale: code changed (version 0 -> 1)"));

    let json: Value = serde_json::from_str(&p.sentiflow(&["status", &f, "--json"]).stdout).unwrap();
    assert_eq!(json[0]["stage"], "a");
    assert_eq!(json[0]["status"], "code_changed");
}

#[test]
fn the_lock_file_is_stable_and_records_each_stage() {
    let (p, f) = counted();
    assert_eq!(p.sentiflow(&["run", &f]).code, 0);
    let first = p.read("pipelines/p.lock");
    assert!(first.contains("pipeline: counted"));
    for field in [
        "key:",
        "inputs:",
        "input.txt:",
        "outs:",
        "out/a.txt:",
        "params:",
        "duration_ms:",
    ] {
        assert!(first.contains(field), "lock lacks {field}:\n{first}");
    }
    let mtime = std::fs::metadata(p.path("pipelines/p.lock"))
        .unwrap()
        .modified()
        .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(p.sentiflow(&["run", &f]).code, 0);
    assert_eq!(p.read("pipelines/p.lock"), first, "an unchanged run rewrites nothing");
    assert_eq!(
        std::fs::metadata(p.path("pipelines/p.lock"))
            .unwrap()
            .modified()
            .unwrap(),
        mtime
    );
}

#[test]
fn stage_selection_runs_a_stage_and_what_it_needs() {
    let (p, f) = counted();
    let r = p.sentiflow(&["run", &f, "--stage", "a", "--json"]);
    assert_eq!(states(&r.json()), pairs(&[("a", "ran")]));
    let r = p.sentiflow(&["run", &f, "--stage", "b", "--json"]);
    assert_eq!(states(&r.json()), pairs(&[("a", "cached"), ("b", "ran")]));
}

#[test]
fn missing_outputs_and_dependencies_fail_the_stage() {
    let p = Project::new();
    let f = p
        .pipeline("name: m\nstages:\n  a: {uses: command, with: {run: 'true', outs: [out/never]}}\n  b: {uses: command, with: {run: 'true', deps: [nowhere.txt]}}\n")
        .to_string_lossy()
        .into_owned();
    let r = p.sentiflow(&["run", &f, "--json"]);
    assert_eq!(r.code, 1);
    let report = r.json();
    assert!(stage(&report, "a")["error"]
        .as_str()
        .unwrap()
        .contains("without writing its output `out/never`"));
    assert!(stage(&report, "b")["error"]
        .as_str()
        .unwrap()
        .contains("dependency `nowhere.txt`"));
}

#[test]
fn gc_keeps_what_the_latest_run_uses() {
    let (p, f) = counted();
    assert_eq!(p.sentiflow(&["run", &f, "--set", "greeting=old"]).code, 0);
    assert_eq!(p.sentiflow(&["run", &f]).code, 0);
    let r = p.sentiflow(&["cache", "gc"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("removed 2 run entries"), "{}", r.stdout);
    assert!(r.stdout.contains("kept 2 run entries"), "{}", r.stdout);
    std::fs::remove_dir_all(p.path("out")).unwrap();
    let r = p.sentiflow(&["run", &f, "--json"]);
    assert_eq!(states(&r.json()), pairs(&[("a", "cached"), ("b", "cached")]));
    let r = p.sentiflow(&["run", &f, "--set", "greeting=old", "--json"]);
    assert_eq!(states(&r.json()), pairs(&[("a", "ran"), ("b", "ran")]));
}

#[test]
fn interrupt_stops_running_stages_and_exits_130() {
    let p = Project::new();
    let f = p
        .pipeline("name: int\nstages:\n  slow: {uses: command, with: {run: 'echo started > out/s; sleep 30; echo x > out/t', outs: [out/t]}}\n  next: {uses: command, needs: [slow], with: {run: 'true'}}\n")
        .to_string_lossy()
        .into_owned();
    let child = p
        .cmd(&["run", &f, "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !p.path("out/s").exists() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    // SAFETY: sending SIGINT to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "interrupt must not wait for the stage"
    );
    assert_eq!(out.status.code(), Some(130));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(states(&report), pairs(&[("next", "skipped"), ("slow", "interrupted")]));
}
