//! The `sentiflow` command line. This file holds the `Cli` and `Command` types, parsing, the
//! config file and `dispatch`, which hands each verb to its function in the files beside it.

mod cache;
mod completions;
mod console;
mod dag;
mod drift;
pub mod exit;
mod keys;
mod predict;
mod project;
mod run;
mod serve;
mod stage;
mod status;
mod tracking;
mod validate;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use clap::{ArgAction, CommandFactory, Parser, Subcommand, ValueEnum};

use anyhow::Context as _;

use crate::models::bert::Device;
use crate::pipeline::graph::DagFormat;
use crate::pipeline::Override;
use cache::{Direction, RemoteCache};
use keys::KeyDatabase;
use project::Globals;

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
        #[command(flatten)]
        args: run::Args,
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
        /// Trainings fetch stages from it and push them to it; stages on executors need it.
        #[command(flatten)]
        remote: RemoteCache,
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
    /// Work on one stage.
    Stage {
        #[command(subcommand)]
        command: StageCommand,
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
enum StageCommand {
    /// Run the stage stored under KEY in the remote cache, and put its result there: the command
    /// an executor's job (Ray, Slurm) runs on the machine it chose.
    Exec {
        /// The stage's cache key.
        key: String,
        /// Run only this trial of the stage's search (a `tune` with `max_parallel`).
        #[arg(long, value_name = "N")]
        trial: Option<usize>,
        /// The sentiflow version of the client that sent the stage; a worker of another version
        /// refuses it.
        #[arg(long, value_name = "VERSION")]
        client_version: String,
        /// Where the scratch project and cache go [default: the temporary directory].
        #[arg(long, value_name = "DIR")]
        scratch: Option<PathBuf>,
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
    // The server reads its sections (`retrain:`, `promotion:`) itself, and `run` and `serve`
    // the `executors:`.
    let settings = settings.iter().filter(|(name, _)| {
        !crate::serve::policy::SECTIONS.contains(&name.as_str()) && name.as_str() != crate::executors::SECTION
    });
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

fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    let global = Globals {
        config: cli.config,
        cache_dir: cli.cache_dir,
        output_dirs: cli.output_dirs,
        quiet: cli.quiet,
    };
    match cli.command {
        Command::Run { args, remote } => run::run(&global, args, remote),
        Command::Status {
            file,
            set,
            json,
            check,
            remote,
        } => status::status(&global, file, set, json, check, remote),
        Command::Dag { file, format } => dag::dag(file, format),
        Command::Validate { files, json } => validate::validate(&global, files, json),
        Command::Predict {
            model,
            input,
            texts,
            device,
        } => predict::predict(&model, input.as_deref(), &texts, device),
        Command::Serve { config, remote } => serve::serve(&global, config, remote),
        Command::Keys {
            command: KeysCommand::Create { role, label, db },
        } => keys::create(&global, role, label, db),
        Command::Keys {
            command: KeysCommand::List { json, db },
        } => keys::list(json, db),
        Command::Keys {
            command: KeysCommand::Revoke { key, db },
        } => keys::revoke(&global, key, db),
        Command::Stage {
            command:
                StageCommand::Exec {
                    key,
                    trial,
                    client_version,
                    scratch,
                    remote,
                },
        } => stage::exec(&key, trial, &client_version, scratch, remote),
        Command::Completions { shell } => completions::completions(shell, Cli::command()),
        Command::Schema => validate::schema(),
        Command::Drift { model, input, chart } => drift::drift(&model, &input, chart.as_deref()),
        Command::Tracking {
            command: TrackingCommand::Sync { uri },
        } => tracking::sync(&global, uri),
        Command::Cache {
            command: CacheCommand::Gc { dry_run },
        } => cache::gc(&global, dry_run),
        Command::Cache {
            command: CacheCommand::Push { file, remote },
        } => cache::sync_remote(
            &global.cache_dir,
            global.quiet,
            file.as_deref(),
            &remote,
            Direction::Push,
        ),
        Command::Cache {
            command: CacheCommand::Pull { file, remote },
        } => cache::sync_remote(
            &global.cache_dir,
            global.quiet,
            file.as_deref(),
            &remote,
            Direction::Pull,
        ),
    }
}
