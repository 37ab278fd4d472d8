//! `dvc.yaml` with the real DVC (PyPI, installed by `scripts/test`), in a clone of this repository
//! without `dvc init`: dag and status right away, then repro, a no-op repro, metrics, params diff,
//! push and pull to a local remote, on the bundled IMDB sample.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Project, BIN};

fn dvc_binary() -> PathBuf {
    let path = std::env::var_os("SENTIFLOW_DVC")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/dvc"));
    assert!(
        path.exists(),
        "DVC not found at {}: run the tests with scripts/test, which installs requirements-dev.txt into .venv",
        path.display()
    );
    path
}

struct Repo {
    p: Project,
    dvc: PathBuf,
}

impl Repo {
    fn run(&self, program: &Path, args: &[&str]) -> String {
        let bin_dir = Path::new(BIN).parent().unwrap();
        let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
        let out = Command::new(program)
            .args(args)
            .current_dir(self.p.root())
            .env("PATH", path)
            .env("DVC_NO_ANALYTICS", "1")
            .env_remove("SENTIFLOW_CACHE_DIR")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{} {args:?} failed:\n{text}", program.display());
        text
    }

    fn dvc(&self, args: &[&str]) -> String {
        self.run(&self.dvc.clone(), args)
    }

    fn git(&self, args: &[&str]) -> String {
        let mut full = vec!["-c", "user.name=sentiflow", "-c", "user.email=tests@sentiflow.invalid"];
        full.extend_from_slice(args);
        self.run(Path::new("git"), &full)
    }
}

/// Makes the project of `r` what `git clone` of this repository gives once the working tree is
/// committed: its tracked and its untracked, not ignored files, committed in a new repository. A
/// real clone of CARGO_MANIFEST_DIR would test the last commit instead of the files under test;
/// copying only what git would commit still fails the test if `.gitignore` hides a file DVC needs.
fn clone_working_tree(r: &Repo) {
    let repo_root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("git")
        .args(["ls-files", "-z", "--cached", "--others", "--exclude-standard"])
        .current_dir(repo_root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git ls-files: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for file in String::from_utf8(out.stdout)
        .unwrap()
        .split('\0')
        .filter(|f| !f.is_empty())
    {
        let from = repo_root.join(file);
        // Tracked files deleted in the working tree are not in the next commit either.
        if from.is_file() {
            let to = r.p.path(file);
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(&from, &to).unwrap();
        }
    }
    r.git(&["init", "-q"]);
    r.git(&["add", "-A"]);
    r.git(&["commit", "-qm", "clone"]);
}

/// The repository's params.yaml with 2 folds and `seed`.
fn small_params(params: &str, seed: u32) -> String {
    params
        .lines()
        .map(|line| match line.split_once(':').map(|(name, _)| name) {
            Some("folds") => "folds: 2".to_string(),
            Some("seed") => format!("seed: {seed}"),
            _ => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

#[test]
fn dvc_runs_the_pipeline_and_versions_its_data() {
    let repo_root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let r = Repo {
        p: Project::new(),
        dvc: dvc_binary(),
    };
    clone_working_tree(&r);

    let dag = r.dvc(&["dag"]);
    assert!(dag.contains("vectorize") && dag.contains("export"), "{dag}");
    let status = r.dvc(&["status"]);
    assert!(
        status.contains("data/aclImdb_v1.tar.gz.dvc"),
        "DVC sees the archive's .dvc file:\n{status}"
    );
    let changed = r.git(&["status", "--porcelain"]);
    assert!(changed.is_empty(), "DVC's own state must be ignored by git:\n{changed}");

    // The README's steps, with the bundled sample as the archive that data/aclImdb_v1.tar.gz.dvc tracks.
    std::fs::copy(
        repo_root.join("tests/fixtures/imdb_sample.tar.gz"),
        r.p.path("data/aclImdb_v1.tar.gz"),
    )
    .unwrap();
    let params = r.p.read("params.yaml");
    r.p.write("params.yaml", &small_params(&params, 42));
    r.dvc(&["add", "-q", "data/aclImdb_v1.tar.gz"]);

    let out = r.dvc(&["repro"]);
    assert!(out.contains("Running stage 'export'"), "{out}");
    assert!(r.p.path("models/tfidf/manifest.json").is_file());
    let out = r.dvc(&["repro"]);
    assert!(
        out.contains("Data and pipelines are up to date"),
        "a second repro does nothing:\n{out}"
    );

    let metrics = r.dvc(&["metrics", "show", "--json"]);
    let metrics: serde_json::Value = serde_json::from_str(metrics.trim()).unwrap();
    let accuracy = metrics[""]["data"]["reports/imdb.json"]["data"]["accuracy"].as_f64();
    assert!(accuracy.is_some_and(|a| a > 0.5), "{metrics}");

    r.git(&["add", "-A"]);
    r.git(&["commit", "-qm", "pipeline"]);
    r.p.write("params.yaml", &small_params(&params, 7));
    let diff = r.dvc(&["params", "diff"]);
    assert!(
        diff.contains("seed") && diff.contains("42") && diff.contains('7'),
        "{diff}"
    );
    r.p.write("params.yaml", &small_params(&params, 42));

    let remote = tempfile::tempdir().unwrap();
    r.dvc(&["remote", "add", "-d", "local", remote.path().to_str().unwrap()]);
    r.dvc(&["push", "-q"]);
    let bundle = std::fs::read(r.p.path("models/tfidf/weights.bin")).unwrap();
    for gone in ["data/imdb", "models", "data/aclImdb_v1.tar.gz", ".dvc/cache"] {
        let path = r.p.path(gone);
        if path.is_dir() {
            std::fs::remove_dir_all(path).unwrap();
        } else {
            std::fs::remove_file(path).unwrap();
        }
    }
    r.dvc(&["pull", "-q"]);
    assert_eq!(std::fs::read(r.p.path("models/tfidf/weights.bin")).unwrap(), bundle);
    assert!(r.p.path("data/aclImdb_v1.tar.gz").is_file());
    let status = r.dvc(&["status"]);
    assert!(status.contains("Data and pipelines are up to date"), "{status}");
}
