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
    for field in ["key:", "inputs:", "input.txt:", "outs:", "out/a.txt:", "params:"] {
        assert!(first.contains(field), "lock lacks {field}:\n{first}");
    }
    assert!(!first.contains("duration"), "timings change from run to run:\n{first}");
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
    assert_eq!(p.sentiflow(&["run", &f, "--force"]).code, 0);
    assert_eq!(
        p.read("pipelines/p.lock"),
        first,
        "a forced rerun that produces the same outputs leaves the lock file byte-identical"
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
    let child = spawn_json_run(&p, &f, false);
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

/// Waits for `child` to exit, killing it and failing the test if it has not after `secs`: for
/// runs that used to hang forever.
/// Starts `sentiflow run FILE --json` with its report piped (and its log, when `log`).
fn spawn_json_run(p: &Project, f: &str, log: bool) -> std::process::Child {
    let stderr = if log {
        std::process::Stdio::piped()
    } else {
        std::process::Stdio::null()
    };
    p.cmd(&["run", f, "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap()
}

fn exit_within(mut child: std::process::Child, secs: u64, what: &str) -> std::process::Output {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("{what} still running after {secs}s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// The number a stage wrote to `rel` (its `$$`), once it is there.
fn wait_for_number(p: &Project, rel: &str) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = p.read(rel);
        if let Some(n) = text.strip_suffix('\n').and_then(|t| t.parse().ok()) {
            return n;
        }
        assert!(Instant::now() < deadline, "the stage never wrote {rel}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Live processes of process group `group` (zombies have exited and are left out), as
/// "pid (name)".
fn live_members(group: i32) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        // After the name: state, parent pid, process group.
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        if fields.len() > 2 && fields[2] == group.to_string() && fields[0] != "Z" {
            found.push(format!("{} ({})", &stat[..open - 1], &stat[open + 1..close]));
        }
    }
    found
}

/// Waits until process group `group` has no live process left.
fn assert_group_ends(group: i32) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = live_members(group);
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "still running in group {group}: {left:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn two_runs_at_once_run_a_stage_once_and_cache_what_it_wrote() {
    let p = Project::new();
    let f = p
        .pipeline("name: race\nstages:\n  a: {uses: command, with: {run: 'seq 1 3 > out.txt; sleep 0.2; echo END >> out.txt', outs: [out.txt]}}\n")
        .to_string_lossy()
        .into_owned();
    for round in 0..8 {
        let _ = std::fs::remove_dir_all(p.path("cache"));
        let _ = std::fs::remove_file(p.path("out.txt"));
        let spawn = || spawn_json_run(&p, &f, true);
        let (one, two) = (spawn(), spawn());
        let mut seen = Vec::new();
        for child in [one, two] {
            let out = exit_within(child, 60, "a run");
            assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
            let report: Value = serde_json::from_slice(&out.stdout).unwrap();
            seen.push(stage(&report, "a")["state"].as_str().unwrap().to_string());
        }
        seen.sort();
        assert_eq!(seen, ["cached", "ran"], "round {round}");
        assert_eq!(p.read("out.txt"), "1\n2\n3\nEND\n", "round {round}");
    }
    // What the cache holds is what one run wrote.
    std::fs::remove_file(p.path("out.txt")).unwrap();
    let r = p.sentiflow(&["run", &f, "--json"]);
    assert_eq!(states(&r.json()), pairs(&[("a", "cached")]));
    assert_eq!(p.read("out.txt"), "1\n2\n3\nEND\n");
}

#[test]
fn a_run_waits_for_the_run_that_holds_a_stages_outputs_then_restores_its_result() {
    let p = Project::new();
    let f = p
        .pipeline("name: wait\nstages:\n  a: {uses: command, with: {run: 'seq 1 3 > out.txt; while [ ! -f release ]; do sleep 0.05; done; echo END >> out.txt', outs: [out.txt]}}\n")
        .to_string_lossy()
        .into_owned();
    let first = spawn_json_run(&p, &f, false);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !p.path("out.txt").exists() {
        assert!(Instant::now() < deadline, "the first run never started its stage");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut second = spawn_json_run(&p, &f, true);
    let stderr = second.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let wanted = format!(
        "warning: stage a: waiting for another run (pid {}) that holds its outputs (out.txt)",
        first.id()
    );
    let mut lines = Vec::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(20)) {
        let done = line.contains(&wanted);
        lines.push(line);
        if done {
            break;
        }
    }
    p.write("release", "");
    let (first, second) = (
        exit_within(first, 60, "the first run"),
        exit_within(second, 60, "the second run"),
    );
    assert!(lines.iter().any(|l| l.contains(&wanted)), "{lines:?}");
    let state = |out: &std::process::Output| {
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        stage(&report, "a")["state"].as_str().unwrap().to_string()
    };
    assert_eq!((state(&first).as_str(), state(&second).as_str()), ("ran", "cached"));
    assert_eq!(p.read("out.txt"), "1\n2\n3\nEND\n");
}

#[test]
fn an_output_behind_a_symlink_out_of_the_project_is_never_touched() {
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim.txt");
    std::fs::write(&victim, "keep me\n").unwrap();
    let p = Project::new();
    let f = p
        .pipeline(&format!(
            "name: escape\nstages:\n  link: {{uses: command, with: {{run: 'ln -s {} link'}}}}\n  write: {{uses: command, needs: [link], with: {{run: 'echo pwned > link/victim.txt', outs: [link/victim.txt]}}}}\n",
            outside.path().display()
        ))
        .to_string_lossy()
        .into_owned();
    let r = p.sentiflow(&["run", &f, "--json"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let report = r.json();
    let error = stage(&report, "write")["error"].as_str().unwrap();
    assert!(
        error.contains("output `link/victim.txt` resolves to") && error.contains("outside the project root"),
        "{error}"
    );
    assert!(error.contains("remove the link"), "{error}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me\n");

    // A result cached while `link` was a directory is not restored through the link either.
    std::fs::remove_file(p.path("link")).unwrap();
    p.write(
        "pipelines/q.yaml",
        "name: restore\nstages:\n  write: {uses: command, with: {run: 'echo ok > link/victim.txt', outs: [link/victim.txt]}}\n",
    );
    let q = p.path("pipelines/q.yaml").to_string_lossy().into_owned();
    let r = p.sentiflow(&["run", &q, "--json"]);
    assert_eq!(states(&r.json()), pairs(&[("write", "ran")]));
    std::fs::remove_dir_all(p.path("link")).unwrap();
    std::os::unix::fs::symlink(outside.path(), p.path("link")).unwrap();
    let r = p.sentiflow(&["run", &q, "--json"]);
    assert_eq!(states(&r.json()), pairs(&[("write", "failed")]));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me\n");
}

#[test]
fn an_output_that_would_clear_the_cache_is_refused() {
    let p = Project::new();
    let f = p
        .pipeline("name: c\nstages:\n  a: {uses: command, with: {run: 'echo a > store/a.txt', outs: [store]}}\n")
        .to_string_lossy()
        .into_owned();
    let r = p.sentiflow(&["run", &f, "--json", "--cache-dir", "store/cache"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let error = stage(&r.json(), "a")["error"].as_str().unwrap().to_string();
    assert!(error.contains("which holds the cache directory"), "{error}");
    assert!(p.path("store/cache/objects").is_dir());
}

#[test]
fn inputs_that_never_end_fail_their_stage_at_once() {
    let p = Project::new();
    p.write("good/a.txt", "a\n");
    p.write("mixed/a.txt", "a\n");
    for fifo in ["pipe", "mixed/pipe", "reviews.csv"] {
        let status = std::process::Command::new("mkfifo").arg(p.path(fifo)).status().unwrap();
        assert!(status.success());
    }
    let f = p
        .pipeline(
            "name: hang\nstages:\n  zero: {uses: command, with: {run: 'true', deps: [/dev/zero]}}\n  fifo: {uses: command, with: {run: 'true', deps: [pipe]}}\n  mixed: {uses: command, with: {run: 'true', deps: [mixed]}}\n  load: {uses: load, with: {path: reviews.csv, out: out/r.parquet}}\n  good: {uses: command, with: {run: 'true', deps: [good]}}\n",
        )
        .to_string_lossy()
        .into_owned();
    let child = spawn_json_run(&p, &f, false);
    let out = exit_within(child, 60, "a run with a FIFO and /dev/zero as inputs");
    assert_eq!(out.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stage(&report, "good")["state"], "ran");
    for (name, path, kind) in [
        ("zero", "/dev/zero".to_string(), "character device"),
        ("fifo", p.path("pipe").display().to_string(), "FIFO"),
        ("mixed", p.path("mixed/pipe").display().to_string(), "FIFO"),
        ("load", p.path("reviews.csv").display().to_string(), "FIFO"),
    ] {
        let error = stage(&report, name)["error"].as_str().unwrap();
        assert!(
            error.contains(&format!("{path} is a {kind}, not a regular file")),
            "{name}: {error}"
        );
    }
}

#[test]
fn a_killed_run_leaves_no_stage_process_behind() {
    let p = Project::new();
    let f = p
        .pipeline("name: orphans\nstages:\n  a: {uses: command, with: {run: 'echo $$ > group; sleep 30 & sleep 30; echo late > late.txt'}}\n")
        .to_string_lossy()
        .into_owned();
    let mut run = p.cmd(&["run", &f]).stderr(std::process::Stdio::null()).spawn().unwrap();
    // The stage's shell leads its process group.
    let group = wait_for_number(&p, "group");
    assert!(!live_members(group).is_empty());
    run.kill().unwrap(); // SIGKILL: the engine can do nothing about it
    run.wait().unwrap();
    assert_group_ends(group);
    assert!(!p.path("late.txt").exists());
}

#[test]
fn an_interrupted_stage_that_ignores_sigterm_is_killed() {
    let p = Project::new();
    let f = p
        .pipeline("name: stubborn\nstages:\n  a: {uses: command, with: {run: \"trap '' TERM; echo $$ > group; sleep 30 & sleep 30; echo late > late.txt\"}}\n")
        .to_string_lossy()
        .into_owned();
    let run = spawn_json_run(&p, &f, false);
    let group = wait_for_number(&p, "group");
    // SAFETY: sending SIGINT to our own child process.
    unsafe { libc::kill(run.id() as i32, libc::SIGINT) };
    let out = exit_within(run, 60, "an interrupted run");
    assert_eq!(out.status.code(), Some(130));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(states(&report), pairs(&[("a", "interrupted")]));
    assert_group_ends(group);
    assert!(!p.path("late.txt").exists());
}
