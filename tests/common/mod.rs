//! Helpers for tests that run the real `sentiflow` binary in a scratch project.
#![allow(dead_code)]

pub mod daemon;
pub mod nginx;
pub mod postgres;
pub mod prometheus;
pub mod ray;
pub mod s3;
pub mod slurm;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const BIN: &str = env!("CARGO_BIN_EXE_sentiflow");

/// The test environment's Python (scripts/test exports it).
pub fn python() -> PathBuf {
    let python = std::env::var_os("SENTIFLOW_PYTHON")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("SENTIFLOW_VENV").map(|v| PathBuf::from(v).join("bin/python")))
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
    assert!(
        python.exists(),
        "no Python at {}: run the tests with scripts/test, which installs requirements-dev.txt",
        python.display()
    );
    python
}

pub struct Project {
    pub dir: tempfile::TempDir,
    /// The database every command of the project uses: a database of its own on the tests'
    /// PostgreSQL cluster with `SENTIFLOW_TEST_DB=postgres`, else the default SQLite file.
    pub db: Option<String>,
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn from(out: Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("{e}: {}\n{}", self.stdout, self.stderr))
    }
}

impl Project {
    pub fn new() -> Project {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("pipelines")).unwrap();
        let db = postgres::selected().then(postgres::database);
        Project { dir, db }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root().join(rel)
    }

    pub fn write(&self, rel: &str, text: &str) {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).unwrap_or_default()
    }

    /// Lines in a file that stages append to each time they really run.
    pub fn count(&self, rel: &str) -> usize {
        self.read(rel).lines().count()
    }

    pub fn pipeline(&self, yaml: &str) -> PathBuf {
        self.write("pipelines/p.yaml", yaml);
        self.path("pipelines/p.yaml")
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args).current_dir(self.root()).env_remove("SENTIFLOW_CACHE_DIR");
        match &self.db {
            Some(url) => c.env("SENTIFLOW_DB", url),
            None => c.env_remove("SENTIFLOW_DB"),
        };
        c
    }

    pub fn sentiflow(&self, args: &[&str]) -> Run {
        Run::from(self.cmd(args).output().unwrap())
    }
}

/// Every file under the directories `dirs` of `p`, by path, with its bytes.
pub fn files(p: &Project, dirs: &[&str]) -> std::collections::BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut std::collections::BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut found = std::collections::BTreeMap::new();
    for dir in dirs {
        walk(p.root(), &p.path(dir), &mut found);
    }
    found
}

/// A scratch project holding the quickstart pipeline and the IMDB review sample.
pub fn quickstart() -> Project {
    let p = Project::new();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    p.write(
        "pipelines/quickstart.yaml",
        &std::fs::read_to_string(repo.join("pipelines/quickstart.yaml")).unwrap(),
    );
    std::fs::create_dir_all(p.path("tests/fixtures")).unwrap();
    std::fs::copy(
        repo.join("tests/fixtures/imdb_sample.tar.gz"),
        p.path("tests/fixtures/imdb_sample.tar.gz"),
    )
    .unwrap();
    p
}

/// Both branches on the 400-review fixture; BERT on 256 reviews of 64 tokens (head and tail of
/// longer ones) for one epoch.
pub const BOTH: &str = r#"
name: both
params:
  seed: 42
stages:
  load:
    uses: load
    with: {path: tests/fixtures/imdb_sample.tar.gz, out: data/reviews.parquet}
  clean:
    uses: clean
    needs: [load]
    with: {lowercase: true, out: data/clean.parquet}
  split:
    uses: split
    needs: [clean]
    with: {validation: 0.2, seed: 42, out: data/split}
  vectorize:
    uses: vectorize
    needs: [split]
    with: {ngram: [1, 2], out: data/tfidf}
  train:
    uses: train
    needs: [vectorize]
    with: {model: {model: logreg, C: 10}, out: data/model}
  export_tfidf:
    uses: export
    needs: [train]
    with: {name: tfidf, out: models/tfidf}
  finetune_bert:
    uses: bert_finetune
    needs: [split]
    with:
      max_length: 64
      truncation: head_tail
      epochs: 1
      lr: 1.0e-4
      batch_size: 16
      subset: 256
      processes: 2
      seed: ${params.seed}
      out: data/bert
  export_bert:
    uses: bert_export
    needs: [finetune_bert, split]
    with: {name: bert, parity_reviews: 16, out: models/bert}
"#;

/// A scratch project with the fixture, the BERT stage programs and `pipelines/both.yaml`.
pub fn both_models() -> Project {
    let p = quickstart();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    for script in ["finetune.py", "export_onnx.py"] {
        p.write(
            &format!("stages/bert/{script}"),
            &std::fs::read_to_string(repo.join("stages/bert").join(script)).unwrap(),
        );
    }
    p.write("pipelines/both.yaml", BOTH);
    p
}

/// An HTTP response, read whole.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// `POST path` with `key` and a JSON body.
pub fn post(s: &Server, path: &str, key: &str, body: &serde_json::Value) -> Response {
    let auth = format!("Bearer {key}");
    http(
        &s.addr,
        "POST",
        path,
        &[("Authorization", &auth), ("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
}

/// One HTTP/1.1 request over a fresh connection.
pub fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-length")) && (method == "POST" || !body.is_empty())
    {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    exchange(addr, &bytes)
}

/// Sends `request` as written over a fresh connection and reads the answer until it closes.
pub fn exchange(addr: &str, request: &[u8]) -> Response {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    let _ = s.write_all(request);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked { dechunk(body) } else { body.to_string() };
    Response { status, headers, body }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A running `sentiflow serve`, stopped (SIGTERM) when dropped.
pub struct Server {
    pub child: std::process::Child,
    pub addr: String,
    /// Every line the server has written to stderr so far.
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Server {
    pub fn start(p: &Project, extra: &[&str]) -> Server {
        // Warnings, and the line that says where the server listens.
        Server::start_env(p, extra, &[("SENTIFLOW_LOG", "warn,sentiflow::serve=info")])
    }

    pub fn start_env(p: &Project, extra: &[&str], env: &[(&str, &str)]) -> Server {
        use std::io::BufRead;
        let mut args = vec!["serve", "--addr", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        let mut cmd = p.cmd(&args);
        cmd.envs(env.iter().copied());
        let mut child = cmd.stderr(std::process::Stdio::piped()).spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let mut lines = std::io::BufReader::new(stderr).lines();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let addr = loop {
            let line = lines.next().expect("the server exited before listening").unwrap();
            log.lock().unwrap().push(line.clone());
            if let Some(rest) = line.split("serving on http://").nth(1) {
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        let kept = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                kept.lock().unwrap().push(line);
            }
        });
        Server { child, addr, log }
    }

    pub fn stop(&mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port free now on the loopback address.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn key(p: &Project, role: &str) -> String {
    let r = p.sentiflow(&["keys", "create", "--role", role]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    r.stdout.trim().to_string()
}

/// The report of stage `name` in a `run --json` report.
pub fn stage<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap()
}
