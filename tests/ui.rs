//! The web interface end to end: Debian's Chromium, driven by playwright-core (`tests/ui/`),
//! against a real server serving a TF-IDF and a BERT model; the page predicts, explains, takes
//! feedback, trains, lists and cancels runs, shows candidates, runs a canary, compares versions
//! and shows drift, and keeps each error beside the action that failed until that action succeeds. Screenshots land in `target/ui-screenshots/` (the book's `docs/src/screenshots/ui-try.png`).

mod common;

use std::path::Path;
use std::process::Command;

use common::{key, Server};

#[test]
fn the_web_interface_predicts_trains_and_shows_drift() {
    let p = common::both_models();
    let run = p.sentiflow(&["run", "pipelines/both.yaml"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let ui = repo.join("tests/ui");
    assert!(
        ui.join("node_modules/playwright-core").is_dir(),
        "playwright-core is missing: run `npm install` in tests/ui (scripts/test does)"
    );
    p.write(
        "pipelines/slow.yaml",
        "name: slow\nstages:\n  wait: {uses: command, with: {run: 'sleep 60; echo done > out/w', outs: [out/w]}}\n",
    );
    // A gate no candidate meets in this test: the version trained through the page stays a
    // candidate, for the shadow figures, the canary and the comparison.
    let s = Server::start(&p, &["--promotion-min-shadow", "100000"]);
    let admin = key(&p, "admin");
    let shots = repo.join("target/ui-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let out = Command::new("node")
        .arg("e2e.mjs")
        .arg(format!("http://{}", s.addr))
        .arg(&admin)
        .arg(&shots)
        .current_dir(&ui)
        .output()
        .expect("node (Node.js) runs the browser tests");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("ui ok"), "{stdout}");
    for shot in [
        "ui-try.png",
        "ui-train.png",
        "ui-models.png",
        "ui-drift.png",
        "ui-docs.png",
    ] {
        assert!(shots.join(shot).is_file(), "{shot}");
    }
}
