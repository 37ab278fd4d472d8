//! Pipeline validation: every broken pipeline exits 2 and points at the right `file:line:col`.

mod common;

use std::path::Path;

use common::{Project, BIN};

fn validate(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(BIN)
        .arg("validate")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("SENTIFLOW_TEST_SURELY_UNSET")
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Each file in tests/pipelines/invalid starts with `# expect: LINE:COL: MESSAGE`.
#[test]
fn broken_pipelines_exit_2_with_their_location() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pipelines/invalid");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(files.len() >= 20, "only {} broken pipelines", files.len());
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} has no `# expect:` line", file.display()));
        let rel = format!(
            "tests/pipelines/invalid/{}",
            file.file_name().unwrap().to_string_lossy()
        );
        let (code, _, stderr) = validate(&[&rel]);
        assert_eq!(code, 2, "{rel}: exit code\n{stderr}");
        let wanted = format!("error: {rel}:{expect}");
        assert!(
            stderr.starts_with(&wanted),
            "{rel}:\nwanted: {wanted}\ngot:    {stderr}"
        );
    }
}

#[test]
fn valid_pipelines_pass() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in ["pipelines", "tests/pipelines/valid"] {
        for e in std::fs::read_dir(root.join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "yaml") {
                files.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    assert!(!files.is_empty());
    let args: Vec<&str> = files.iter().map(String::as_str).collect();
    let (code, stdout, stderr) = validate(&args);
    assert_eq!(code, 0, "{stderr}");
    for f in &files {
        assert!(
            stdout.contains(&format!("ok: {f}")),
            "{f} not reported valid:\n{stdout}"
        );
    }
}

#[test]
fn several_problems_are_reported_together() {
    let p = Project::new();
    let file = p.pipeline(
        "name: demo\nstages:\n  a: {uses: nope, with: {}}\n  b: {uses: command, needs: [zz], with: {run: 'true'}}\n",
    );
    let r = p.sentiflow(&["validate", file.to_str().unwrap()]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("p.yaml:3:13: unknown stage kind `nope`"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("p.yaml:4:30: stage `b` needs unknown stage `zz`"),
        "{}",
        r.stderr
    );
}

#[test]
fn bad_set_overrides_exit_2() {
    let p = Project::new();
    let file = p.pipeline(
        "name: demo\nparams: {greeting: hi}\nstages:\n  a: {uses: command, with: {run: 'echo ${params.greeting}'}}\n",
    );
    let f = file.to_str().unwrap();
    let r = p.sentiflow(&["run", f, "--set", "greting=yo"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr
            .contains("p.yaml:2:1: bad --set `greting=yo`: the pipeline declares no parameter `greting`"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("declared parameters: greeting"));
    let r = p.sentiflow(&["run", f, "--set", "greeting"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("bad --set `greeting`: expected NAME=VALUE"),
        "{}",
        r.stderr
    );
}

#[test]
fn set_values_are_typed_scalars_never_yaml() {
    let p = Project::new();
    let file = p.pipeline(
        "name: demo\nparams: {seed: 1, word: hi, on: true}\nstages:\n  a: {uses: command, with: {run: 'printf %s \"${params.word}\" > w.txt', outs: [w.txt]}}\n",
    );
    let f = file.to_str().unwrap();
    let r = p.sentiflow(&["status", f, "--set", "seed=abc"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("p.yaml:2:16: bad --set `seed=abc`: `params.seed` takes an integer"),
        "{}",
        r.stderr
    );
    let r = p.sentiflow(&["status", f, "--set", "on=yes"]);
    assert!(r.stderr.contains("`params.on` takes `true` or `false`"), "{}", r.stderr);
    let r = p.sentiflow(&["status", f, "--set", "seed=123456789012345678901234567890"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("does not fit a 64-bit integer"), "{}", r.stderr);
    // YAML syntax in a value is text: no nesting, no aliases, however deep.
    let bomb = format!("word=&a [*a, *a] {}x", "- ".repeat(20_000));
    let r = p.sentiflow(&["run", f, "--set", &bomb]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(p.read("w.txt"), &bomb["word=".len()..]);
}

#[test]
fn unknown_target_stage_and_missing_file_exit_2() {
    let p = Project::new();
    let file = p.pipeline("name: demo\nstages:\n  a: {uses: command, with: {run: 'true'}}\n");
    let r = p.sentiflow(&["run", file.to_str().unwrap(), "--stage", "b"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("unknown stage `b`"), "{}", r.stderr);
    let r = p.sentiflow(&["validate", "pipelines/missing.yaml"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("pipelines/missing.yaml:1:1: cannot read file"),
        "{}",
        r.stderr
    );
    let r = p.sentiflow(&["run"]);
    assert_eq!(r.code, 2, "usage errors exit 2");
}

#[test]
fn outputs_that_would_delete_the_project_its_pipelines_or_its_cache_exit_2() {
    let p = Project::new();
    let command =
        |outs: &str| format!("name: o\nstages:\n  a: {{uses: command, with: {{run: 'true', outs: [{outs}]}}}}\n");
    let nested = "name: n\nstages:\n  a: {uses: command, with: {run: 'true', outs: [d]}}\n  b: {uses: command, with: {run: 'true', outs: [d/x]}}\n";
    let load = "name: l\nstages:\n  l: {uses: load, with: {path: r.csv, out: cache/r.parquet}}\n";
    // (file, text, the output as written, message, hint)
    let cases = [
        (
            "pipelines/root.yaml",
            command("./"),
            "./",
            "output `./` of stage `a` is the project root itself",
            "name a file or directory inside the project",
        ),
        (
            "pipelines/pipeline.yaml",
            command("pipelines/pipeline.yaml"),
            "pipelines/pipeline.yaml",
            "output `pipelines/pipeline.yaml` of stage `a` is inside the pipelines directory `pipelines`",
            "which would delete files in the pipelines directory",
        ),
        (
            "pipelines/all.yaml",
            command("pipelines"),
            "pipelines",
            "output `pipelines` of stage `a` is the pipelines directory `pipelines`",
            "write it elsewhere",
        ),
        (
            "pipelines/cache.yaml",
            command("cache"),
            "cache",
            "output `cache` of stage `a` is the cache directory `cache`",
            "which would delete the cache directory",
        ),
        (
            "pipelines/objects.yaml",
            command("./cache//objects"),
            "./cache//objects",
            "output `./cache//objects` of stage `a` is inside the cache directory `cache`",
            "write it elsewhere",
        ),
        (
            "pipelines/nested.yaml",
            nested.to_string(),
            "d/x",
            "output `d/x` of stage `b` is inside output `d` of stage `a`",
            "one cannot hold another",
        ),
        (
            "pipelines/load.yaml",
            load.to_string(),
            "cache/r.parquet",
            "output `cache/r.parquet` of stage `l` is inside the cache directory `cache`",
            "write it elsewhere",
        ),
        // Outside `pipelines/`, the pipeline's own file and lock file.
        (
            "flat.yaml",
            command("flat.yaml"),
            "flat.yaml]",
            "output `flat.yaml` of stage `a` is the pipeline file `flat.yaml`",
            "which would delete the pipeline file",
        ),
        (
            "flat.yaml",
            command("flat.lock"),
            "flat.lock",
            "output `flat.lock` of stage `a` is the pipeline's lock file `flat.lock`",
            "write it elsewhere",
        ),
    ];
    for (file, text, out, message, hint) in cases {
        p.write(file, &text);
        let offset = text.find(out).unwrap();
        let line = text[..offset].matches('\n').count() + 1;
        let col = offset - text[..offset].rfind('\n').map_or(0, |i| i + 1) + 1;
        let r = p.sentiflow(&["validate", file]);
        assert_eq!(r.code, 2, "{file}: {}", r.stderr);
        let located = format!("{file}:{line}:{col}: {message}");
        assert!(r.stderr.contains(&located), "{file}: wanted {located}\n{}", r.stderr);
        assert!(r.stderr.contains(hint), "{file}: {}", r.stderr);
    }
    // Names that only look alike pass.
    p.write(
        "pipelines/fine.yaml",
        "name: f\nstages:\n  a: {uses: command, with: {run: 'true', outs: [d, out/cache, pipelines.txt]}}\n  b: {uses: command, with: {run: 'true', outs: [dx, d-a/x]}}\n",
    );
    let r = p.sentiflow(&["validate", "pipelines/fine.yaml"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

/// The YAML files of a folder of the repository.
fn yaml_files(dir: &str) -> Vec<std::path::PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<_> = std::fs::read_dir(root.join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

/// `check-jsonschema`, the validator behind editors' YAML plugins, from the test environment.
fn check_jsonschema(file: &Path) -> std::process::Output {
    let venv = std::env::var("VIRTUAL_ENV").unwrap_or_else(|_| ".venv".into());
    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/schema.json");
    std::process::Command::new(Path::new(&venv).join("bin/check-jsonschema"))
        .arg("--schemafile")
        .arg(schema)
        .arg(file)
        .output()
        .expect("check-jsonschema runs (scripts/setup-python installs it)")
}

#[test]
fn editors_accept_our_pipelines_and_reject_what_a_schema_can_catch() {
    // `${params.*}` and `${env.*}` stand in typed fields of every kind in valid/references.yaml.
    for file in yaml_files("pipelines")
        .into_iter()
        .chain(yaml_files("tests/pipelines/valid"))
    {
        let out = check_jsonschema(&file);
        assert!(
            out.status.success(),
            "{}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // The mistakes a schema can see: structure, names, kinds, unknown keys and wrong types.
    // (Cycles, undefined parameters and the like need `sentiflow validate`.)
    for name in [
        "bad_pipeline_name",
        "bad_stage_name",
        "empty_stages",
        "missing_run",
        "missing_stages",
        "missing_uses",
        "not_a_mapping",
        "params_not_mapping",
        "stage_not_mapping",
        "unknown_kind",
        "unknown_stage_key",
        "unknown_top_key",
        "unknown_with_field",
        "wrong_type_needs",
        "wrong_type_outs",
    ] {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/pipelines/invalid/{name}.yaml"));
        assert!(
            !check_jsonschema(&file).status.success(),
            "{name}.yaml passed the schema"
        );
    }
}

#[test]
fn committed_schema_matches_the_types() {
    let out = std::process::Command::new(BIN).arg("schema").output().unwrap();
    let generated = String::from_utf8(out.stdout).unwrap();
    let committed =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/schema.json")).unwrap();
    assert_eq!(generated, committed, "run `sentiflow schema > pipelines/schema.json`");
    let schema: serde_json::Value = serde_json::from_str(&generated).unwrap();
    assert!(schema["properties"]["stages"].is_object());
}

#[test]
fn hostile_pipeline_files_get_a_located_error_not_a_crash() {
    let p = Project::new();
    let mut bomb = String::from("name: b\nparams:\n  a: &a [x, x, x, x, x, x, x, x, x, x]\n");
    for (name, prev) in ["b", "c", "d", "e", "f", "g", "h", "i"]
        .iter()
        .zip(["a", "b", "c", "d", "e", "f", "g", "h"])
    {
        let row = vec![format!("*{prev}"); 10].join(", ");
        bomb.push_str(&format!("  {name}: &{name} [{row}]\n"));
    }
    bomb.push_str("stages:\n  s: {uses: command, with: {run: 'true'}}\n");
    let cases = [
        ("bomb", bomb, "aliases expand the document past"),
        ("dashes", format!("name: d\nstages:\n{}x\n", "- ".repeat(20_000)), "nested more than 64"),
        ("nul", "name: n\nstages:\n  s: {uses: command, with: {run: 'true'}}\n\0  t: {}\n".into(), "a NUL byte"),
        ("two", "name: t\nstages:\n  s: {uses: command, with: {run: 'true'}}\n---\nname: u\n".into(), "a second YAML document"),
        ("big", "name: big\nparams: {n: 123456789012345678901234567890123}\nstages:\n  s: {uses: command, with: {run: 'true'}}\n".into(), "too large for an integer"),
        ("trials", "name: tr\nstages:\n  t: {uses: tune, with: {search: random, trials: 1000000000000, models: [{model: logreg, C: [1]}], out: o}}\n".into(), "at most 100000"),
    ];
    for (name, text, expected) in cases {
        p.write(&format!("pipelines/{name}.yaml"), &text);
        let r = p.sentiflow(&["validate", &format!("pipelines/{name}.yaml")]);
        assert_eq!(r.code, 2, "{name}: {}", r.stderr);
        assert!(r.stderr.contains(expected), "{name}: {}", r.stderr);
        assert!(
            r.stderr.contains(&format!("pipelines/{name}.yaml:")),
            "{name} is located: {}",
            r.stderr
        );
    }
}
