//! The `sentiflow` command line.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clap::{ArgAction, CommandFactory, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use anyhow::Context as _;

use crate::cache::{Cache, Remote, Transfer};
use crate::models::bert::{BertError, Device, Runtime};
use crate::models::bundle::{Bundle, BundleError, Prediction, LABELS};
use crate::pipeline::exec::{self, Observer, Options};
use crate::pipeline::graph::DagFormat;
use crate::pipeline::report::{StageReport, State};
use crate::pipeline::{lock, spec, Override, Pipeline};
use crate::tracking::Delivery;

/// Exit codes: what a script calling sentiflow can rely on.
pub mod exit {
    pub const OK: i32 = 0;
    /// A stage failed, or something the command needs (ONNX Runtime) is missing.
    pub const FAILED: i32 = 1;
    /// The pipeline or the command line is invalid.
    pub const INVALID: i32 = 2;
    /// Interrupted by a signal.
    pub const INTERRUPTED: i32 = 130;
}

#[derive(Parser)]
#[command(
    name = "sentiflow",
    version,
    about = "Train, tune, track and serve sentiment models from YAML pipelines"
)]
struct Cli {
    /// YAML file of settings (`addr: …`, `db: …`, `predict_rps: …`); flags and environment
    /// variables take precedence.
    #[arg(long, global = true, env = "SENTIFLOW_CONFIG")]
    config: Option<PathBuf>,
    /// Cache directory [default: <project root>/cache, or ./cache outside a pipeline].
    #[arg(long, global = true, env = "SENTIFLOW_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Directories outside the project root that stage outputs may reach through a symbolic
    /// link in the project (`:`-separated), e.g. a volume that `data/` links to.
    #[arg(long, global = true, env = "SENTIFLOW_OUTPUT_DIRS", value_delimiter = ':')]
    output_dirs: Vec<PathBuf>,
    /// Print only errors: no progress, stage lines or summaries.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// Log more: -v information, -vv debugging, -vvv everything (`SENTIFLOW_LOG` overrides).
    #[arg(short, long, global = true, action = ArgAction::Count)]
    verbose: u8,
    /// When to colour the output: `auto` colours a terminal unless `NO_COLOR` is set.
    #[arg(long, global = true, value_enum, default_value = "auto", value_name = "WHEN")]
    color: Color,
    /// How log lines are written: `text` for people, `json` (one object a line) for collectors.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "SENTIFLOW_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Color {
    Auto,
    Always,
    Never,
}

impl Color {
    fn enabled(self) -> bool {
        match self {
            Color::Always => true,
            Color::Never => false,
            Color::Auto => std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

const RUN_EXAMPLES: &str = "Examples:
  sentiflow run pipelines/imdb.yaml --set data=aclImdb_v1.tar.gz
  sentiflow run pipelines/imdb.yaml --stage export_tfidf     # one branch and what it needs
  sentiflow run pipelines/quickstart.yaml --force --jobs 1 --json > report.json";

const SERVE_EXAMPLES: &str = "Examples:
  sentiflow keys create --role admin --label me
  sentiflow serve                                   # http://127.0.0.1:8080, models of ./models
  sentiflow serve --addr 0.0.0.0:8080 --db /var/lib/sentiflow/sentiflow.db --device cuda
  sentiflow serve --config serve.yaml               # settings from a YAML file";

const PREDICT_EXAMPLES: &str = "Examples:
  sentiflow predict --model models/tfidf \"A moving, beautifully acted film.\"
  sentiflow predict --model models/bert --input reviews.jsonl > scores.jsonl
  cat reviews.jsonl | sentiflow predict --model models/tfidf --input -";

const DRIFT_EXAMPLES: &str = "Examples:
  sentiflow drift --model models/tfidf --input last_week.jsonl
  sentiflow drift --model models/tfidf --input last_week.jsonl --chart drift.png";

// Parsed once per process: the size of the variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run a pipeline; unchanged stages are restored from the cache.
    #[command(after_help = RUN_EXAMPLES)]
    Run {
        /// The pipeline file (e.g. pipelines/imdb.yaml).
        file: PathBuf,
        /// Run only this stage and what it needs (repeatable).
        #[arg(long = "stage", value_name = "STAGE")]
        stages: Vec<String>,
        /// Run the selected stages even if their results are cached.
        #[arg(long)]
        force: bool,
        /// Most stages running at once [default: number of CPUs].
        #[arg(long, short)]
        jobs: Option<usize>,
        /// Override a parameter: NAME=VALUE (repeatable).
        #[arg(long = "set", value_name = "NAME=VALUE")]
        set: Vec<Override>,
        /// Print the run report as JSON on stdout.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: RemoteCache,
    },
    /// Show which stages are up to date and why the others are stale.
    Status {
        /// The pipeline file (e.g. pipelines/imdb.yaml).
        file: PathBuf,
        /// Override a parameter: NAME=VALUE (repeatable), as in `run`.
        #[arg(long = "set", value_name = "NAME=VALUE")]
        set: Vec<Override>,
        /// Print the status as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// Exit with 1 when some stage is not up to date (for scripts; with -q, print nothing).
        #[arg(long)]
        check: bool,
        #[command(flatten)]
        remote: RemoteCache,
    },
    /// Print the stage graph.
    Dag {
        /// The pipeline file (e.g. pipelines/imdb.yaml).
        file: PathBuf,
        /// `text` for people, `dot` for Graphviz, `mermaid` for Markdown.
        #[arg(long, value_enum, default_value = "text")]
        format: DagFormat,
    },
    /// Check pipeline files without running them.
    Validate {
        /// The pipeline files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Print one JSON object per file on stdout: its name, whether it is valid, its errors.
        #[arg(long)]
        json: bool,
    },
    /// Print the JSON Schema of pipeline files.
    Schema,
    /// Serve predictions, the model registry and training over HTTP.
    #[command(after_help = SERVE_EXAMPLES)]
    Serve {
        #[command(flatten)]
        config: crate::serve::Config,
    },
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Score reviews with a model bundle; prints one JSON object per line.
    #[command(after_help = PREDICT_EXAMPLES)]
    Predict {
        /// The bundle directory (e.g. models/tfidf).
        #[arg(long)]
        model: PathBuf,
        /// JSON Lines of `{"id": …, "text": …}` (`-` for standard input).
        #[arg(long, conflicts_with = "texts")]
        input: Option<PathBuf>,
        /// Texts to score.
        texts: Vec<String>,
        /// Where an ONNX model runs: `cpu` or `cuda[:N]` (an NVIDIA GPU).
        #[arg(long, default_value = "cpu")]
        device: Device,
    },
    /// Compare reviews with a bundle's reference statistics: the drift report as JSON.
    #[command(after_help = DRIFT_EXAMPLES)]
    Drift {
        /// The bundle directory (e.g. models/tfidf).
        #[arg(long)]
        model: PathBuf,
        /// JSON Lines of `{"text": …}`, optionally with the true `"label"` (positive or negative).
        #[arg(long)]
        input: PathBuf,
        /// Also draw reference against current distributions into this PNG file.
        #[arg(long)]
        chart: Option<PathBuf>,
    },
    /// Manage the cache.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// Experiment tracking in MLflow.
    Tracking {
        #[command(subcommand)]
        command: TrackingCommand,
    },
    /// Print a shell completion script: `sentiflow completions bash > ~/.local/share/bash-completion/completions/sentiflow`.
    Completions {
        /// The shell to complete in.
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key; it is printed once and only its hash is stored.
    Create {
        /// `predict` may call `POST /prediction`; `admin` may call everything.
        #[arg(long, value_enum)]
        role: crate::serve::Role,
        /// A note on who or what the key is for.
        #[arg(long)]
        label: Option<String>,
        #[command(flatten)]
        db: KeyDatabase,
    },
    /// List the keys: id, label, role, when created and last used (never the key itself).
    List {
        /// Print the keys as JSON on stdout.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        db: KeyDatabase,
    },
    /// Revoke a key by id or label: a running server refuses it from its next request on.
    Revoke {
        /// The key's id, or its label when no id matches.
        key: String,
        #[command(flatten)]
        db: KeyDatabase,
    },
}

/// The database the server keeps its keys in, found as `sentiflow serve` finds it.
#[derive(clap::Args)]
struct KeyDatabase {
    /// The database: a SQLite file or a `postgres://` URL [default: <project root>/sentiflow.db].
    #[arg(long, env = "SENTIFLOW_DB")]
    db: Option<String>,
    /// Directory of the pipelines; its parent is the project root.
    #[arg(long, env = "SENTIFLOW_PIPELINES", default_value = "pipelines")]
    pipelines: PathBuf,
}

impl KeyDatabase {
    fn open(&self) -> anyhow::Result<(crate::store::Store, String)> {
        let location = crate::serve::db_location(self.db.as_deref(), &self.pipelines);
        Ok((crate::store::Store::open(&location, 1)?, location.display()))
    }
}

/// A remote copy of the cache, shared by machines.
#[derive(clap::Args)]
struct RemoteCache {
    /// Remote stage cache: s3://BUCKET/PREFIX (endpoint and keys from AWS_ENDPOINT_URL,
    /// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ALLOW_HTTP) or file:///DIR. A
    /// stage missing from the local cache is fetched from it; a stage that runs is pushed to it.
    #[arg(long = "remote-cache", env = "SENTIFLOW_REMOTE_CACHE", value_name = "URL")]
    url: Option<String>,
    /// The team's secret for the remote cache: run entries are signed with it, and one that is
    /// not is refused and its stage run again. Without it, whoever can write the bucket can make
    /// an entry name other objects. Prefer the variable: a flag shows in the process list.
    #[arg(
        long = "remote-cache-secret",
        env = "SENTIFLOW_REMOTE_CACHE_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    secret: Option<String>,
}

impl RemoteCache {
    /// `cache` with this remote, if one is given; a URL that cannot be used is the caller's
    /// mistake.
    fn attach(&self, cache: Cache) -> Result<Cache, i32> {
        let Some(url) = &self.url else { return Ok(cache) };
        match Remote::open(url, self.secret.as_deref()) {
            Ok(remote) => Ok(cache.with_remote(remote)),
            Err(e) => {
                eprintln!("error: {e}");
                Err(exit::INVALID)
            }
        }
    }
}

#[derive(Subcommand)]
enum CacheCommand {
    /// Delete everything the latest run of each pipeline does not use.
    Gc {
        /// Only say what would be deleted.
        #[arg(long)]
        dry_run: bool,
    },
    /// Copy cache entries to the remote cache: those of a pipeline's stages, or all of them.
    Push {
        /// Send the entries of this pipeline's stages as its lock file records them [default:
        /// every entry of the local cache].
        file: Option<PathBuf>,
        #[command(flatten)]
        remote: RemoteCache,
    },
    /// Copy cache entries from the remote cache: those of a pipeline's stages, or all of them.
    Pull {
        /// Fetch the entries of this pipeline's stages as its lock file records them [default:
        /// every entry of the remote cache].
        file: Option<PathBuf>,
        #[command(flatten)]
        remote: RemoteCache,
    },
}

#[derive(Subcommand)]
enum TrackingCommand {
    /// Send the runs that could not be recorded in MLflow when they ran (queued in the cache).
    Sync {
        /// Tracking server to send them to [default: the one each run was meant for].
        #[arg(long, env = "MLFLOW_TRACKING_URI")]
        uri: Option<String>,
    },
}

static CANCEL: AtomicBool = AtomicBool::new(false);

pub fn main() -> i32 {
    let parse = || {
        Cli::try_parse().map_err(|e| {
            let _ = e.print();
            if e.use_stderr() {
                exit::INVALID
            } else {
                exit::OK
            }
        })
    };
    let mut cli = match parse() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    if !matches!(cli.command, Command::Serve { .. }) {
        // A command piped into `head` should end quietly when the reader goes, as Unix tools do;
        // the server keeps Rust's default (a write error) so a client hanging up harms nothing.
        // SAFETY: single-threaded here, and SIG_DFL is a valid disposition.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    // A server logs each request (the access log) unless told to be quiet.
    let serving = matches!(cli.command, Command::Serve { .. });
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => "error",
        (false, 0) if serving => "info",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "debug",
        (false, _) => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("SENTIFLOW_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.with_target(false).with_ansi(cli.color.enabled()).init(),
        LogFormat::Json => logs.json().flatten_event(true).with_current_span(true).init(),
    }
    if let Some(path) = cli.config.clone() {
        if let Err(e) = apply_config_file(&path) {
            eprintln!("error: {e:#}");
            return exit::INVALID;
        }
        // Settings from the file arrive through the environment: parse again to see them.
        cli = match parse() {
            Ok(cli) => cli,
            Err(code) => return code,
        };
    }
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            exit::FAILED
        }
    }
}

/// The names a config file may set: every option that reads a `SENTIFLOW_<NAME>` variable, as
/// `name` (`SENTIFLOW_PREDICT_RPS` is `predict_rps`).
fn settings() -> std::collections::BTreeSet<String> {
    fn collect(cmd: &clap::Command, out: &mut std::collections::BTreeSet<String>) {
        for arg in cmd.get_arguments() {
            if let Some(name) = arg.get_env().and_then(|e| e.to_str()?.strip_prefix("SENTIFLOW_")) {
                out.insert(name.to_ascii_lowercase());
            }
        }
        cmd.get_subcommands().for_each(|sub| collect(sub, out));
    }
    let mut out = std::collections::BTreeSet::new();
    collect(&Cli::command(), &mut out);
    out.remove("config");
    out
}

/// `--config FILE` (or `SENTIFLOW_CONFIG`): a YAML mapping of setting names to values, e.g.
/// `addr: 0.0.0.0:8080`. Each setting becomes the environment variable `SENTIFLOW_<NAME>` unless
/// that is already set, so flags win over the environment, which wins over the file. An unknown
/// name is an error, located, with the closest known name.
fn apply_config_file(path: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the config file {}", path.display()))?;
    let doc = crate::pipeline::yaml::parse(&text)
        .map_err(|e| anyhow::anyhow!("{}:{}:{}: {}", path.display(), e.pos.line, e.pos.col, e.message))?;
    let serde_json::Value::Object(settings) = &doc.value else {
        anyhow::bail!(
            "{}: expected a mapping of settings, e.g. `addr: 127.0.0.1:8080`",
            path.display()
        );
    };
    let known = self::settings();
    // The server reads its sections (`retrain:`, `promotion:`) itself.
    let settings = settings
        .iter()
        .filter(|(name, _)| !crate::serve::policy::SECTIONS.contains(&name.as_str()));
    for (name, _) in settings.clone() {
        let normal = name.to_ascii_lowercase().replace('-', "_");
        if !known.contains(&normal) {
            let at = doc.key_pos(&crate::pipeline::yaml::child_path("", name));
            anyhow::bail!(
                "{}:{}:{}: unknown setting `{name}`\n  = hint: {}settings: {}",
                path.display(),
                at.line,
                at.col,
                crate::pipeline::diag::did_you_mean(&normal, known.iter().map(String::as_str)),
                known.iter().map(String::as_str).collect::<Vec<_>>().join(", ")
            );
        }
    }
    for (name, value) in settings {
        let var = format!("SENTIFLOW_{}", name.to_ascii_uppercase().replace('-', "_"));
        let value = match value {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        if std::env::var_os(&var).is_none() {
            // Single-threaded here: nothing else reads the environment yet.
            std::env::set_var(var, value);
        }
    }
    Ok(())
}

fn load(file: &Path, set: &[Override]) -> Result<Pipeline, i32> {
    Pipeline::load(file, set).map_err(|d| {
        eprint!("{}", d.render());
        exit::INVALID
    })
}

fn open_cache(cli_dir: &Option<PathBuf>, root: &Path) -> anyhow::Result<Cache> {
    let dir = cli_dir.clone().unwrap_or_else(|| root.join("cache"));
    Cache::open(&dir).map_err(|e| anyhow::anyhow!("opening the cache at {}: {e}", dir.display()))
}

fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Run {
            file,
            stages,
            force,
            jobs,
            set,
            json,
            remote,
        } => {
            let p = match load(&file, &set) {
                Ok(p) => p,
                Err(code) => return Ok(code),
            };
            let cache = match remote.attach(open_cache(&cli.cache_dir, &p.root)?) {
                Ok(cache) => cache,
                Err(code) => return Ok(code),
            };
            ctrlc::set_handler(|| {
                if CANCEL.swap(true, Ordering::SeqCst) {
                    std::process::exit(exit::INTERRUPTED);
                }
            })?;
            let opts = Options {
                jobs: jobs.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
                force,
                targets: stages,
                output_dirs: cli.output_dirs.clone(),
            };
            let console = Console::new(p.stages.len(), !json && std::io::stderr().is_terminal(), cli.quiet);
            let clock = Instant::now();
            let report = match exec::run(&p, &cache, &opts, &CANCEL, &console) {
                Ok(r) => r,
                Err(exec::ExecError::UnknownStage(s, known)) => {
                    eprintln!(
                        "error: {}: unknown stage `{s}`\n  = hint: {}stages in this pipeline: {known}",
                        file.display(),
                        crate::pipeline::diag::did_you_mean(&s, known.split(", "))
                    );
                    return Ok(exit::INVALID);
                }
                Err(e) => return Err(e.into()),
            };
            console.done();
            let mut tracking = None;
            if let Some(tracker) = crate::tracking::Tracker::from_env() {
                match tracker.record(&p, &report, cache.dir()) {
                    Ok(d @ Delivery::Sent { .. }) => {
                        eprintln!(
                            "tracked as MLflow run {}",
                            d.to_json()["run_id"].as_str().unwrap_or_default()
                        );
                        tracking = Some(d.to_json());
                    }
                    Ok(d @ Delivery::Queued { .. }) => {
                        if let Delivery::Queued { pending, error, .. } = &d {
                            eprintln!(
                                "warning: MLflow did not take the run ({error}); {pending} events queued in the cache: \
                                 send them with `sentiflow tracking sync`"
                            );
                        }
                        tracking = Some(d.to_json());
                    }
                    Err(e) => eprintln!("warning: the run was not recorded in MLflow: {e}"),
                }
            }
            if json {
                let mut value = serde_json::to_value(&report)?;
                if let Some(t) = tracking {
                    value["tracking"] = t;
                }
                println!("{}", serde_json::to_string_pretty(&value)?);
            }
            if !cli.quiet {
                let fetched = match cache.remote() {
                    Some(_) => format!(", {} fetched", report.count(State::Fetched)),
                    None => String::new(),
                };
                eprintln!(
                    "{}: {} ran, {} cached{fetched}, {} failed, {} skipped in {:.2}s",
                    p.name,
                    report.count(State::Ran),
                    report.count(State::Cached),
                    report.count(State::Failed) + report.count(State::Interrupted),
                    report.count(State::Skipped),
                    clock.elapsed().as_secs_f64()
                );
            }
            Ok(if report.interrupted {
                exit::INTERRUPTED
            } else if report.ok {
                exit::OK
            } else {
                exit::FAILED
            })
        }
        Command::Status {
            file,
            set,
            json,
            check,
            remote,
        } => {
            let p = match load(&file, &set) {
                Ok(p) => p,
                Err(code) => return Ok(code),
            };
            let cache = match remote.attach(open_cache(&cli.cache_dir, &p.root)?) {
                Ok(cache) => cache,
                Err(code) => return Ok(code),
            };
            let status = lock::status(&p, &cache.hasher);
            cache.hasher.save()?;
            let fetchable = fetchable(&p, &cache, &status);
            if json {
                let list: Vec<_> = status
                    .iter()
                    .map(|(name, s)| {
                        let mut v = serde_json::to_value(s).expect("status serializes");
                        v["stage"] = name.clone().into();
                        if let Some(remote) = &fetchable {
                            v["remote"] = remote.contains(name).into();
                        }
                        v
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if !cli.quiet {
                let width = status.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
                for (name, s) in &status {
                    let note = match &fetchable {
                        Some(remote) if remote.contains(name) => "; the remote cache has it (`run` fetches it)",
                        _ => "",
                    };
                    println!("{name:width$}  {s}{note}");
                }
            }
            let stale = status.iter().any(|(_, s)| *s != lock::Staleness::UpToDate);
            Ok(if check && stale { exit::FAILED } else { exit::OK })
        }
        Command::Dag { file, format } => {
            let p = match load(&file, &[]) {
                Ok(p) => p,
                Err(code) => return Ok(code),
            };
            print!("{}", p.dag.render(&p.stages, format));
            Ok(exit::OK)
        }
        Command::Validate { files, json } => {
            let mut code = exit::OK;
            for file in &files {
                let result = Pipeline::load(file, &[]);
                if result.is_err() {
                    code = exit::INVALID;
                }
                match (result, json) {
                    (Ok(p), false) => println!("ok: {} ({}, {} stages)", file.display(), p.name, p.stages.len()),
                    (Err(d), false) => eprint!("{}", d.render()),
                    (Ok(p), true) => println!(
                        "{}",
                        serde_json::json!({"file": file, "valid": true, "pipeline": p.name, "stages": p.stages.len(), "errors": []})
                    ),
                    (Err(d), true) => {
                        let errors: Vec<_> = d
                            .items
                            .iter()
                            .map(|e| serde_json::json!({"line": e.pos.line, "col": e.pos.col, "message": e.message, "hint": e.hint}))
                            .collect();
                        println!(
                            "{}",
                            serde_json::json!({"file": file, "valid": false, "errors": errors})
                        );
                    }
                }
            }
            Ok(code)
        }
        Command::Predict {
            model,
            input,
            texts,
            device,
        } => predict(&model, input.as_deref(), &texts, device),
        Command::Serve { mut config } => {
            let sections = match cli.config.as_deref().map(crate::serve::policy::Sections::load) {
                Some(Ok(sections)) => sections,
                Some(Err(e)) => {
                    eprintln!("error: {e}");
                    return Ok(exit::INVALID);
                }
                None => Default::default(),
            };
            if let Err(e) = crate::serve::policy::settle(&mut config, sections) {
                eprintln!("error: {e}");
                return Ok(exit::INVALID);
            }
            let cache_dir = cli.cache_dir.clone().unwrap_or_else(|| config.root().join("cache"));
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(async {
                let app = crate::serve::App::new(config, cache_dir, cli.output_dirs.clone())?;
                crate::serve::serve(app).await
            })?;
            Ok(exit::OK)
        }
        Command::Keys {
            command: KeysCommand::Create { role, label, db },
        } => {
            let (store, path) = db.open()?;
            let key = crate::serve::create_key(&store, role, label.as_deref())?;
            if !cli.quiet {
                eprintln!("created a `{}` key in {}; it is shown only now:", role.as_str(), path);
            }
            println!("{key}");
            Ok(exit::OK)
        }
        Command::Keys {
            command: KeysCommand::List { json, db },
        } => {
            let keys = db.open()?.0.keys()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
                return Ok(exit::OK);
            }
            let never = || "never".to_string();
            println!(
                "{:>4}  {:<20}  {:<7}  {:<24}  {:<24}  revoked",
                "id", "label", "role", "created", "last used"
            );
            for k in &keys {
                println!(
                    "{:>4}  {:<20}  {:<7}  {:<24}  {:<24}  {}",
                    k.id,
                    k.label.as_deref().unwrap_or("-"),
                    k.role,
                    k.created_at,
                    k.last_used_at.clone().unwrap_or_else(never),
                    k.revoked_at.as_deref().unwrap_or("-")
                );
            }
            Ok(exit::OK)
        }
        Command::Keys {
            command: KeysCommand::Revoke { key, db },
        } => {
            let (store, path) = db.open()?;
            let keys = store.keys()?;
            let by_id: Vec<_> = keys.iter().filter(|k| k.id.to_string() == key).collect();
            let matches = if by_id.is_empty() {
                keys.iter()
                    .filter(|k| k.label.as_deref() == Some(key.as_str()))
                    .collect()
            } else {
                by_id
            };
            match matches.as_slice() {
                [one] => {
                    store.revoke_key(one.id)?;
                    if !cli.quiet {
                        eprintln!(
                            "revoked key {} ({}) in {}",
                            one.id,
                            one.label.as_deref().unwrap_or("no label"),
                            path
                        );
                    }
                    Ok(exit::OK)
                }
                [] => {
                    let labels = keys.iter().filter_map(|k| k.label.as_deref());
                    eprintln!(
                        "error: no key has the id or label `{key}` in {}\n  = hint: {}`sentiflow keys list` shows them",
                        path,
                        crate::pipeline::diag::did_you_mean(&key, labels)
                    );
                    Ok(exit::INVALID)
                }
                many => {
                    let ids: Vec<String> = many.iter().map(|k| k.id.to_string()).collect();
                    eprintln!(
                        "error: {} keys have the label `{key}`\n  = hint: revoke them by id: {}",
                        many.len(),
                        ids.join(", ")
                    );
                    Ok(exit::INVALID)
                }
            }
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "sentiflow", &mut std::io::stdout());
            Ok(exit::OK)
        }
        Command::Schema => {
            print!("{}", spec::json_schema());
            Ok(exit::OK)
        }
        Command::Drift { model, input, chart } => drift(&model, &input, chart.as_deref()),
        Command::Tracking {
            command: TrackingCommand::Sync { uri },
        } => {
            let cwd = std::env::current_dir()?;
            let cache = open_cache(&cli.cache_dir, &cwd)?;
            let results = crate::tracking::sync(cache.dir(), uri.as_deref());
            if results.is_empty() {
                println!(
                    "nothing to send: no queued runs in {}",
                    cache.dir().join("tracking").display()
                );
            }
            let mut failed = 0;
            for r in &results {
                match &r.result {
                    Ok(run) => println!("sent {} ({}) as MLflow run {run}", r.pipeline, r.outbox.display()),
                    Err(e) => {
                        failed += 1;
                        println!(
                            "still queued: {} ({}): {} events left: {e}",
                            r.pipeline,
                            r.outbox.display(),
                            r.pending
                        );
                    }
                }
            }
            Ok(if failed == 0 { exit::OK } else { exit::FAILED })
        }
        Command::Cache {
            command: CacheCommand::Gc { dry_run },
        } => {
            let cwd = std::env::current_dir()?;
            let cache = open_cache(&cli.cache_dir, &cwd)?;
            let r = cache.gc(dry_run)?;
            println!(
                "{} {} run entries and {} objects ({:.1} MiB); kept {} run entries and {} objects",
                if dry_run { "would remove" } else { "removed" },
                r.runs_removed,
                r.objects_removed,
                r.bytes_freed as f64 / (1 << 20) as f64,
                r.runs_kept,
                r.objects_kept
            );
            Ok(exit::OK)
        }
        Command::Cache {
            command: CacheCommand::Push { file, remote },
        } => sync_remote(&cli.cache_dir, cli.quiet, file.as_deref(), &remote, Direction::Push),
        Command::Cache {
            command: CacheCommand::Pull { file, remote },
        } => sync_remote(&cli.cache_dir, cli.quiet, file.as_deref(), &remote, Direction::Pull),
    }
}

/// The stale stages whose entry, as the lock file records it, the remote cache holds: a run
/// fetches them instead of running them. `None` without a remote; a remote that does not answer
/// is reported once and leaves the set as far as it got.
fn fetchable(
    p: &Pipeline,
    cache: &Cache,
    status: &[(String, lock::Staleness)],
) -> Option<std::collections::BTreeSet<String>> {
    use lock::Staleness::*;
    cache.remote()?;
    let locked = lock::read(p);
    let mut found = std::collections::BTreeSet::new();
    for (name, s) in status {
        // Only these leave the recorded key current: the inputs and the definition are unchanged.
        if !matches!(s, OutputMissing { .. } | OutputModified { .. } | UpstreamStale { .. }) {
            continue;
        }
        let Some(key) = locked.stages.get(name).map(|l| &l.key) else {
            continue;
        };
        match cache.remote_has(key) {
            Ok(true) => {
                found.insert(name.clone());
            }
            Ok(false) => {}
            Err(e) => {
                eprintln!("warning: {e}");
                break;
            }
        }
    }
    Some(found)
}

#[derive(Clone, Copy, PartialEq)]
enum Direction {
    Push,
    Pull,
}

/// `cache push` and `cache pull`: the entries of `file`'s stages (the keys its lock file records)
/// or all of them, copied to or from the remote cache. Unlike a run, they fail when the remote
/// does.
fn sync_remote(
    cache_dir: &Option<PathBuf>,
    quiet: bool,
    file: Option<&Path>,
    remote: &RemoteCache,
    direction: Direction,
) -> anyhow::Result<i32> {
    let Some(url) = &remote.url else {
        eprintln!("error: no remote cache: give --remote-cache s3://BUCKET/PREFIX or set SENTIFLOW_REMOTE_CACHE");
        return Ok(exit::INVALID);
    };
    let (root, keys) = match file {
        Some(file) => {
            let p = match load(file, &[]) {
                Ok(p) => p,
                Err(code) => return Ok(code),
            };
            let keys: Vec<String> = lock::read(&p).stages.into_values().map(|s| s.key).collect();
            if keys.is_empty() {
                eprintln!(
                    "error: {} has no lock file recording its stages' keys yet: run it first",
                    file.display()
                );
                return Ok(exit::INVALID);
            }
            (p.root, Some(keys))
        }
        None => (std::env::current_dir()?, None),
    };
    let cache = match remote.attach(open_cache(cache_dir, &root)?) {
        Ok(cache) => cache,
        Err(code) => return Ok(code),
    };
    let verb = match direction {
        Direction::Push => "pushing to",
        Direction::Pull => "pulling from",
    };
    let keys = match (keys, direction) {
        (Some(keys), _) => keys,
        (None, Direction::Push) => cache.keys()?,
        (None, Direction::Pull) => cache.remote().expect("attached").run_keys()?,
    };
    let mut total = Transfer::default();
    let mut absent = 0;
    for key in &keys {
        // A local entry that cannot be read is as good as absent (and `lookup` removed it).
        let local = cache.lookup(key).ok().flatten();
        let done = match (direction, local) {
            (Direction::Push, Some(entry)) => Some(cache.push(key, &entry)),
            (Direction::Push, None) => None,
            (Direction::Pull, Some(_)) => Some(Ok(Transfer::default())),
            (Direction::Pull, None) => cache.fetch(key).transpose().map(|r| r.map(|(_, t)| t)),
        };
        match done {
            Some(t) => {
                let t = t.with_context(|| format!("{verb} {url}"))?;
                total.runs += t.runs;
                total.objects += t.objects;
                total.bytes += t.bytes;
            }
            None => absent += 1,
        }
    }
    if !quiet {
        let (done, place, lacking) = match direction {
            Direction::Push => ("pushed", "to", "not in the local cache"),
            Direction::Pull => ("pulled", "from", "not in the remote cache"),
        };
        let note = match absent {
            0 => String::new(),
            n => format!("; {n} {lacking}"),
        };
        println!(
            "{done} {} run entries and {} objects ({:.1} MiB) {place} {url}; {} were there already{note}",
            total.runs,
            total.objects,
            total.bytes as f64 / (1 << 20) as f64,
            keys.len() - total.runs - absent,
        );
    }
    Ok(exit::OK)
}

/// Loads the bundle at `model`, or prints why not and gives the exit code: a missing ONNX Runtime
/// is the machine's problem (1), anything else the bundle's (2).
fn load_bundle(model: &Path, device: Device) -> Result<Bundle, i32> {
    Bundle::load(model, Runtime { threads: 0, device }).map_err(|e| {
        eprintln!("error: {e}");
        match e {
            BundleError::Bert(
                BertError::RuntimeMissing { .. } | BertError::RuntimeBroken { .. } | BertError::Device { .. },
            ) => exit::FAILED,
            _ => exit::INVALID,
        }
    })
}

/// The non-empty JSON Lines of `path` (`-`: standard input), each an object with a string
/// `text`, with their line numbers; an error names the file and line.
fn read_reviews(path: &Path) -> Result<Vec<(usize, serde_json::Value)>, i32> {
    use std::io::BufRead;
    let reader: Box<dyn BufRead> = if path == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        let file = std::fs::File::open(path).map_err(|e| {
            eprintln!("error: {}: {e}", path.display());
            exit::INVALID
        })?;
        Box::new(std::io::BufReader::new(file))
    };
    let mut rows = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let at = format!("{}:{}", path.display(), n + 1);
        let line = line.map_err(|e| {
            eprintln!("error: {at}: {e}");
            exit::INVALID
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let row: serde_json::Value = serde_json::from_str(&line).map_err(|e| {
            eprintln!("error: {at}: invalid JSON: {e}");
            exit::INVALID
        })?;
        if !row["text"].is_string() {
            eprintln!("error: {at}: missing string field `text`");
            return Err(exit::INVALID);
        }
        rows.push((n + 1, row));
    }
    Ok(rows)
}

fn predict(model: &Path, input: Option<&Path>, texts: &[String], device: Device) -> anyhow::Result<i32> {
    use std::io::Write;
    let bundle = match load_bundle(model, device) {
        Ok(b) => b,
        Err(code) => return Ok(code),
    };
    let mut rows: Vec<(serde_json::Value, String)> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| ((i + 1).into(), t.clone()))
        .collect();
    if let Some(path) = input {
        let lines = match read_reviews(path) {
            Ok(l) => l,
            Err(code) => return Ok(code),
        };
        for (n, row) in lines {
            let id = if row["id"].is_null() {
                n.into()
            } else {
                row["id"].clone()
            };
            rows.push((id, row["text"].as_str().unwrap_or_default().to_string()));
        }
    }
    if rows.is_empty() {
        eprintln!("error: nothing to score: give texts or --input FILE.jsonl");
        return Ok(exit::INVALID);
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    // In chunks, so that the first answers come out while the rest are scored.
    for chunk in rows.chunks(32) {
        let texts: Vec<&str> = chunk.iter().map(|(_, t)| t.as_str()).collect();
        let predictions = bundle.model.predict(&texts)?;
        for ((id, _), s) in chunk.iter().zip(predictions) {
            let p = Prediction::from_score(s.score);
            let line = serde_json::json!({"id": id, "label": p.label, "score": p.score});
            writeln!(out, "{line}")?;
        }
    }
    out.flush()?;
    Ok(exit::OK)
}

fn drift(model: &Path, input: &Path, chart: Option<&Path>) -> anyhow::Result<i32> {
    let bundle = match load_bundle(model, Device::Cpu) {
        Ok(b) => b,
        Err(code) => return Ok(code),
    };
    let Some(reference) = &bundle.drift else {
        eprintln!(
            "error: {}: no drift.json: the bundle was exported before drift monitoring; export it again",
            model.display()
        );
        return Ok(exit::INVALID);
    };
    let rows = match read_reviews(input) {
        Ok(r) => r,
        Err(code) => return Ok(code),
    };
    let texts: Vec<&str> = rows
        .iter()
        .map(|(_, r)| r["text"].as_str().unwrap_or_default())
        .collect();
    let mut labels: Vec<Option<&str>> = Vec::with_capacity(rows.len());
    for (n, r) in &rows {
        match &r["label"] {
            serde_json::Value::Null => labels.push(None),
            serde_json::Value::String(l) if LABELS.contains(&l.as_str()) => labels.push(Some(l.as_str())),
            other => {
                eprintln!(
                    "error: {}:{n}: `label` must be one of {LABELS:?}, got {other}",
                    input.display()
                );
                return Ok(exit::INVALID);
            }
        }
    }
    let samples = bundle.model.predict(&texts)?;
    let feedback: Vec<bool> = samples
        .iter()
        .zip(&labels)
        .filter_map(|(s, l)| l.map(|l| Prediction::from_score(s.score).label == l))
        .collect();
    let report = crate::drift::evaluate(reference, &samples, &feedback, &Default::default());
    if let Some(path) = chart {
        let score_labels: Vec<String> = (0..10).map(|i| format!(".{i}")).collect();
        let edges = &reference.length_edges;
        let length_labels: Vec<String> = (0..=edges.len())
            .map(|i| match i {
                0 => format!("<{:.0}", edges[0]),
                i if i == edges.len() => format!(">{:.0}", edges[i - 1]),
                i => format!("{:.0}", edges[i]),
            })
            .collect();
        let panel = |name: &str, stat: &crate::drift::Statistic, labels: Vec<String>| crate::plot::Panel {
            title: format!("{name}: PSI {:.3} ({})", stat.value, stat.status.as_str()),
            labels,
            reference: stat.reference.shares().to_vec(),
            current: stat.current.shares().to_vec(),
        };
        let png = crate::plot::distributions(
            &format!(
                "drift of {} {}: {}",
                bundle.manifest.name,
                bundle.manifest.version,
                report.status.as_str()
            ),
            &[
                panel("P(positive)", &report.statistics.score_psi, score_labels),
                panel("length (characters)", &report.statistics.length_psi, length_labels),
            ],
        );
        std::fs::write(path, png).with_context(|| path.display().to_string())?;
    }
    let mut report = serde_json::to_value(&report)?;
    report["model"] = bundle.manifest.name.clone().into();
    report["version"] = bundle.manifest.version.clone().into();
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(exit::OK)
}

/// Shows progress: a bar on a terminal, one line per event otherwise.
struct Console {
    bar: Option<ProgressBar>,
    running: Mutex<Vec<String>>,
    /// Only failures and warnings.
    quiet: bool,
}

impl Console {
    fn new(total: usize, terminal: bool, quiet: bool) -> Self {
        let bar = (terminal && !quiet).then(|| {
            let bar = ProgressBar::new(total as u64);
            bar.set_style(
                ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} {elapsed} {msg}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        });
        Console {
            bar,
            running: Mutex::new(Vec::new()),
            quiet,
        }
    }

    fn line(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    fn update(&self) {
        if let Some(bar) = &self.bar {
            bar.set_message(self.running.lock().unwrap().join(", "));
        }
    }

    fn done(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Observer for Console {
    fn started(&self, stage: &str) {
        self.running.lock().unwrap().push(stage.to_string());
        self.update();
    }

    fn finished(&self, r: &StageReport) {
        self.running.lock().unwrap().retain(|s| s != &r.name);
        let text = match r.state {
            State::Ran => format!("ran      {} ({:.2}s)", r.name, r.duration_ms as f64 / 1000.0),
            State::Cached => format!("cached   {}", r.name),
            State::Fetched => format!("fetched  {}", r.name),
            State::Failed => format!("FAILED   {}: {}", r.name, r.error.as_deref().unwrap_or("")),
            State::Skipped => format!("skipped  {}: {}", r.name, r.error.as_deref().unwrap_or("")),
            State::Interrupted => format!("stopped  {}", r.name),
        };
        if !self.quiet || r.state == State::Failed {
            self.line(&text);
        }
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
        self.update();
    }

    fn log(&self, stage: &str, line: &str) {
        if !self.quiet {
            self.line(&format!("[{stage}] {line}"));
        }
    }

    fn warn(&self, message: &str) {
        self.line(&format!("warning: {message}"));
    }
}
