//! `dvc.yaml` with the real DVC (PyPI, installed by `scripts/test`): repro, a no-op repro,
//! metrics, params diff, push and pull to a local remote, on the bundled IMDB sample.

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

#[test]
fn dvc_runs_the_pipeline_and_versions_its_data() {
    let repo_root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let p = Project::new();
    for file in ["dvc.yaml", "pipelines/imdb.yaml"] {
        p.write(file, &std::fs::read_to_string(repo_root.join(file)).unwrap());
    }
    std::fs::create_dir_all(p.path("data")).unwrap();
    std::fs::copy(
        repo_root.join("tests/fixtures/imdb_sample.tar.gz"),
        p.path("data/sample.tar.gz"),
    )
    .unwrap();
    p.write("params.yaml", "data: data/sample.tar.gz\nseed: 42\nfolds: 2\n");
    let r = Repo { p, dvc: dvc_binary() };
    r.git(&["init", "-q"]);
    r.dvc(&["init", "-q"]);
    r.dvc(&["add", "-q", "data/sample.tar.gz"]);

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
    r.p.write("params.yaml", "data: data/sample.tar.gz\nseed: 7\nfolds: 2\n");
    let diff = r.dvc(&["params", "diff"]);
    assert!(
        diff.contains("seed") && diff.contains("42") && diff.contains('7'),
        "{diff}"
    );
    r.p.write("params.yaml", "data: data/sample.tar.gz\nseed: 42\nfolds: 2\n");

    let remote = tempfile::tempdir().unwrap();
    r.dvc(&["remote", "add", "-d", "local", remote.path().to_str().unwrap()]);
    r.dvc(&["push", "-q"]);
    let bundle = std::fs::read(r.p.path("models/tfidf/weights.bin")).unwrap();
    for gone in ["data/imdb", "models", "data/sample.tar.gz", ".dvc/cache"] {
        let path = r.p.path(gone);
        if path.is_dir() {
            std::fs::remove_dir_all(path).unwrap();
        } else {
            std::fs::remove_file(path).unwrap();
        }
    }
    r.dvc(&["pull", "-q"]);
    assert_eq!(std::fs::read(r.p.path("models/tfidf/weights.bin")).unwrap(), bundle);
    assert!(r.p.path("data/sample.tar.gz").is_file());
    let status = r.dvc(&["status"]);
    assert!(status.contains("Data and pipelines are up to date"), "{status}");
}
