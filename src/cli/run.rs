//! `sentiflow run`: runs a pipeline, restoring unchanged stages from the cache, and tracks the
//! run in MLflow when tracking is configured.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::cache::RemoteCache;
use super::console::Console;
use super::exit;
use super::project::Globals;
use crate::pipeline::exec::{self, Options};
use crate::pipeline::report::State;
use crate::pipeline::Override;
use crate::tracking::Delivery;

static CANCEL: AtomicBool = AtomicBool::new(false);

/// The options of `sentiflow run`.
#[derive(clap::Args)]
pub(super) struct Args {
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
    /// Run every stage here, whatever its `runs_on` and the settings file's `executors:`.
    #[arg(long)]
    local: bool,
}

pub(super) fn run(global: &Globals, args: Args, remote: RemoteCache) -> anyhow::Result<i32> {
    let Args {
        file,
        stages,
        force,
        jobs,
        set,
        json,
        local,
    } = args;
    let (p, cache) = match remote.open_pipeline(global, &file, &set)? {
        Ok(opened) => opened,
        Err(code) => return Ok(code),
    };
    let executors = match global.executors(local) {
        Ok(e) => e,
        Err(code) => return Ok(code),
    };
    if let Err(d) = p.check_placement(&executors, cache.remote().is_some()) {
        eprint!("{}", d.render());
        return Ok(exit::INVALID);
    }
    ctrlc::set_handler(|| {
        if CANCEL.swap(true, Ordering::SeqCst) {
            std::process::exit(exit::INTERRUPTED);
        }
    })?;
    let opts = Options {
        jobs: jobs.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
        force,
        targets: stages,
        output_dirs: global.output_dirs.clone(),
        executors,
    };
    let console = Console::new(p.stages.len(), !json && std::io::stderr().is_terminal(), global.quiet);
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
    if !global.quiet {
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
