//! The command line's habits: help with examples, completions, quiet and verbose output, checks
//! for scripts, and settings files that reject what they do not know.

mod common;

use common::Project;
use serde_json::Value;

const TWO_STAGES: &str = "name: demo\nstages:\n  a: {uses: command, with: {run: 'echo a > out/a.txt', outs: [out/a.txt]}}\n  b: {uses: command, needs: [a], with: {run: 'cat out/a.txt > out/b.txt', deps: [out/a.txt], outs: [out/b.txt]}}\n";

#[test]
fn help_has_descriptions_and_examples_and_each_command_only_its_options() {
    let p = Project::new();
    for command in ["run", "serve", "predict", "drift"] {
        let r = p.sentiflow(&[command, "--help"]);
        assert_eq!(r.code, 0);
        assert!(
            r.stdout.contains("Examples:\n  sentiflow "),
            "{command} --help:\n{}",
            r.stdout
        );
    }
    let r = p.sentiflow(&["run", "--help"]);
    assert!(r.stdout.contains("<FILE>  The pipeline file"), "{}", r.stdout);
    let r = p.sentiflow(&["keys", "create", "--help"]);
    assert!(r.stdout.contains("--role") && r.stdout.contains("--db"), "{}", r.stdout);
    assert!(
        !r.stdout.contains("--predict-rps"),
        "serve's options are not keys create's:\n{}",
        r.stdout
    );
}

#[test]
fn completions_are_printed_for_each_shell() {
    let p = Project::new();
    let r = p.sentiflow(&["completions", "bash"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("_sentiflow()") && r.stdout.contains("complete -F _sentiflow"),
        "{}",
        r.stdout
    );
    for shell in ["zsh", "fish", "powershell"] {
        let r = p.sentiflow(&["completions", shell]);
        assert!(r.code == 0 && r.stdout.contains("sentiflow"), "{shell}: {}", r.stderr);
    }
}

#[test]
fn quiet_and_verbose_change_what_is_printed() {
    let p = Project::new();
    p.pipeline(TWO_STAGES);
    let r = p.sentiflow(&["run", "pipelines/p.yaml", "-q"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stderr, "", "quiet prints nothing when all is well");
    let r = p.sentiflow(&["run", "pipelines/p.yaml", "-vv", "--color", "never"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("cached   a") && r.stderr.contains("DEBUG a: restored 1 outputs from the cache"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains('\u{1b}'), "no colour codes when asked for none");
}

#[test]
fn status_check_fails_while_a_stage_is_stale() {
    let p = Project::new();
    p.pipeline(TWO_STAGES);
    let r = p.sentiflow(&["status", "pipelines/p.yaml", "--check"]);
    assert_eq!(r.code, 1, "never run: stale");
    assert!(r.stdout.contains("never run"), "{}", r.stdout);
    assert_eq!(p.sentiflow(&["run", "pipelines/p.yaml"]).code, 0);
    let r = p.sentiflow(&["status", "pipelines/p.yaml", "--check", "-q"]);
    assert_eq!((r.code, r.stdout.as_str()), (0, ""));
    p.write("out/b.txt", "edited by hand\n");
    assert_eq!(p.sentiflow(&["status", "pipelines/p.yaml", "--check", "-q"]).code, 1);
}

#[test]
fn cache_gc_dry_run_removes_nothing() {
    let p = Project::new();
    p.pipeline(TWO_STAGES);
    assert_eq!(p.sentiflow(&["run", "pipelines/p.yaml"]).code, 0);
    // A second version of the pipeline leaves the first one's entries unused.
    p.pipeline(&TWO_STAGES.replace("echo a", "echo A"));
    assert_eq!(p.sentiflow(&["run", "pipelines/p.yaml"]).code, 0);
    let objects = || {
        std::fs::read_dir(p.path("cache/objects"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let before = objects();
    let r = p.sentiflow(&["cache", "gc", "--dry-run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.starts_with("would remove 2 run entries"), "{}", r.stdout);
    assert_eq!(objects(), before);
    let r = p.sentiflow(&["cache", "gc"]);
    assert!(r.stdout.starts_with("removed 2 run entries"), "{}", r.stdout);
}

#[test]
fn validate_json_reports_each_file() {
    let p = Project::new();
    p.write("pipelines/good.yaml", TWO_STAGES);
    p.write(
        "pipelines/bad.yaml",
        "name: bad\nstages:\n  a:\n    uses: command\n    need: [b]\n    with: {run: 'true'}\n",
    );
    let r = p.sentiflow(&["validate", "--json", "pipelines/good.yaml", "pipelines/bad.yaml"]);
    assert_eq!(r.code, 2);
    let lines: Vec<Value> = r.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(
        (lines[0]["valid"].clone(), lines[0]["stages"].clone()),
        (Value::from(true), Value::from(2))
    );
    assert_eq!(lines[1]["valid"], false);
    let error = &lines[1]["errors"][0];
    assert_eq!((error["line"].as_u64(), error["col"].as_u64()), (Some(5), Some(5)));
    assert!(
        error["hint"].as_str().unwrap().starts_with("did you mean `needs`?"),
        "{error}"
    );
}

#[test]
fn mistakes_get_a_likely_fix() {
    let p = Project::new();
    p.write(
        "pipelines/bad.yaml",
        "name: bad\nstages:\n  a:\n    uses: command\n    need: [b]\n    with: {run: 'true'}\n",
    );
    let r = p.sentiflow(&["validate", "pipelines/bad.yaml"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("bad.yaml:5:5: unknown field `need` in stages.a"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("hint: did you mean `needs`?"), "{}", r.stderr);

    p.write(
        "pipelines/kind.yaml",
        "name: k\nstages:\n  a: {uses: vectorise, with: {out: x}}\n",
    );
    let r = p.sentiflow(&["validate", "pipelines/kind.yaml"]);
    assert!(r.stderr.contains("did you mean `vectorize`?"), "{}", r.stderr);

    p.write(
        "pipelines/param.yaml",
        "name: p\nparams: {seed: 1}\nstages:\n  a: {uses: command, with: {run: 'echo ${params.sede}'}}\n",
    );
    let r = p.sentiflow(&["validate", "pipelines/param.yaml"]);
    assert!(r.stderr.contains("did you mean `seed`?"), "{}", r.stderr);
    let r = p.sentiflow(&["run", "pipelines/param.yaml", "--set", "sed=2"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("did you mean `seed`?"), "{}", r.stderr);
}

#[test]
fn a_settings_file_with_an_unknown_key_is_an_error_naming_it() {
    let p = Project::new();
    p.write("serve.yaml", "db: x.db\nadress: 127.0.0.1:9999\n");
    let r = p.sentiflow(&["--config", "serve.yaml", "keys", "list"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("serve.yaml:2:1: unknown setting `adress`"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("did you mean `addr`?"), "{}", r.stderr);
    p.write("serve.yaml", "db: x.db\npredict-rps: 10\n");
    let r = p.sentiflow(&["--config", "serve.yaml", "keys", "list"]);
    assert_eq!(r.code, 0, "known settings, `-` or `_`: {}", r.stderr);
    assert!(p.path("x.db").exists(), "the file's `db` is used");
}
