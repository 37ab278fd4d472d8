//! The Slurm executor: a stage is a batch job (`sbatch --parsable --wrap`) running the worker
//! command, with the stage's resources as `--cpus-per-task`, `--mem`, `--gpus` and `--time`.
//! The job's name derives from the stage's cache key, so a client that runs again finds a job
//! still queued or running (`squeue --name`) instead of submitting another. `scancel` stops it.
//!
//! Slurm's commands talk to `slurmctld` from this machine, so the client needs them installed
//! and configured (`SLURM_CONF`), as any login node has. The job's output file is read while it
//! runs, which needs `log_dir` on a disk the nodes and this machine share (a cluster's home or
//! scratch); the outputs themselves go through the remote cache.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::job::{shell_quote, tail, ExecutorError, Job, Placement, Watch, POLL};

/// An executor of the settings file with `engine: slurm`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmSpec {
    #[serde(default)]
    pub partition: Option<String>,
    #[serde(default)]
    pub account: Option<String>,
    #[serde(default)]
    pub qos: Option<String>,
    /// More `sbatch` options, e.g. `[--constraint=a100]`.
    #[serde(default)]
    pub sbatch_args: Vec<String>,
    /// The sentiflow program on the cluster's nodes.
    #[serde(default = "default_command")]
    pub command: String,
    /// Where the jobs' output files go: a directory the nodes and this machine share [default:
    /// `jobs/` in the cache directory].
    #[serde(default)]
    pub log_dir: Option<PathBuf>,
}

fn default_command() -> String {
    "sentiflow".into()
}

/// Runs a Slurm command and gives its standard output; a failure carries what it printed.
fn slurm(program: &str, args: &[String]) -> Result<String, ExecutorError> {
    let out = Command::new(program).args(args).output().map_err(|e| {
        ExecutorError::Engine(format!(
            "running `{program}`: {e}; the Slurm executor needs Slurm's commands on this machine"
        ))
    })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(ExecutorError::Engine(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// A job while `squeue` lists it: its state, node and the reason it waits.
struct Queued {
    state: String,
    node: String,
    reason: String,
}

/// The job `id` while `squeue` still lists it (`None` once it has ended).
fn queued(id: &str) -> Result<Option<Queued>, ExecutorError> {
    let args: Vec<String> = ["-h", "-j", id, "-o", "%T|%N|%r"].map(String::from).into();
    match slurm("squeue", &args) {
        Ok(out) => Ok(out.lines().next().map(|l| {
            let mut f = l.trim().split('|').map(str::to_string);
            Queued {
                state: f.next().unwrap_or_default(),
                node: f.next().unwrap_or_default(),
                reason: f.next().unwrap_or_default(),
            }
        })),
        // squeue refuses an id it has forgotten: the job ended a while ago.
        Err(ExecutorError::Engine(e)) if e.contains("Invalid job id") => Ok(None),
        Err(e) => Err(e),
    }
}

/// How a job that left the queue ended, as `scontrol` remembers it (for `MinJobAge`): its state,
/// exit code and node list.
fn ended(id: &str) -> Option<(String, String, String)> {
    let args: Vec<String> = ["show", "job", "-o", id].map(String::from).into();
    let out = slurm("scontrol", &args).ok()?;
    let field = |name: &str| {
        out.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .unwrap_or_default()
            .to_string()
    };
    Some((field("JobState="), field("ExitCode="), field("NodeList=")))
}

pub(super) fn run(spec: &SlurmSpec, job: &Job, watch: &dyn Watch) -> Result<Placement, ExecutorError> {
    let name = job.name();
    let log_dir = spec.log_dir.clone().unwrap_or_else(|| job.state_dir.clone());
    std::fs::create_dir_all(&log_dir)
        .map_err(|e| ExecutorError::Engine(format!("creating the job log directory {}: {e}", log_dir.display())))?;
    let args: Vec<String> = ["-h", "--name", &name, "-o", "%i %T"].map(String::from).into();
    let waiting = slurm("squeue", &args)?;
    let id = match waiting.lines().find_map(|l| l.split_whitespace().next()) {
        Some(id) => {
            watch.log(&format!(
                "found Slurm job {id} ({name}) still queued or running: following it"
            ));
            id.to_string()
        }
        None => {
            let id = submit(spec, job, &name, &log_dir)?;
            watch.log(&format!("submitted Slurm job {id} ({name})"));
            id
        }
    };
    let log_file = log_dir.join(format!("{name}-{id}.out"));
    let mut placement = Placement {
        executor: job.executor.to_string(),
        engine: "slurm".into(),
        job: id.clone(),
        node: None,
        url: None,
    };
    watch.placed(&placement);
    let mut shown = 0usize;
    let show = |shown: &mut usize, all: bool| {
        let text = read_log(&log_file);
        if text.len() > *shown {
            let end = if all {
                text.len()
            } else {
                text[*shown..].rfind('\n').map(|i| *shown + i + 1).unwrap_or(*shown)
            };
            text[*shown..end].lines().for_each(|l| watch.log(l));
            *shown = end;
        }
        text
    };
    let started = Instant::now();
    loop {
        match queued(&id)? {
            Some(q) => {
                if placement.node.is_none() && !q.node.is_empty() {
                    placement.node = Some(q.node);
                    watch.placed(&placement);
                }
                show(&mut shown, false);
                // Slurm accepts a job larger than its partition allows and keeps it pending
                // for ever: that is a request no node can meet.
                if q.state == "PENDING" && q.reason == "PartitionConfig" {
                    let _ = slurm("scancel", std::slice::from_ref(&id));
                    return Err(ExecutorError::Impossible(format!(
                        "stage `{}` asks for more than the partition allows ({}): Slurm job {id} would wait for \
                         ever (PartitionConfig), so it was cancelled; lower `resources` in the pipeline",
                        job.stage,
                        job.resources.describe()
                    )));
                }
            }
            None => {
                let text = show(&mut shown, true);
                let (state, code, nodes) = ended(&id).unwrap_or_default();
                // A job shorter than a poll is never seen running: its node comes from here.
                if placement.node.is_none() && !nodes.is_empty() && nodes != "(null)" {
                    placement.node = Some(nodes);
                    watch.placed(&placement);
                }
                if state.is_empty() || state == "COMPLETED" {
                    return Ok(placement);
                }
                return Err(ExecutorError::Failed(format!(
                    "Slurm job {id} ended {state} (exit code {code}); its log ({}) ends:\n{}",
                    log_file.display(),
                    tail(&text, 20)
                )));
            }
        }
        if watch.cancelled() {
            let _ = slurm("scancel", std::slice::from_ref(&id));
            return Err(ExecutorError::Cancelled);
        }
        // Slurm enforces `--time` itself; this only gives up on a job stuck in the queue.
        if let Some(limit) = job.resources.timeout {
            if started.elapsed() > limit.0 + Duration::from_secs(3600) {
                let _ = slurm("scancel", std::slice::from_ref(&id));
                return Err(ExecutorError::Failed(format!(
                    "Slurm job {id} has not ended an hour past the stage's timeout of {limit}; cancelled it"
                )));
            }
        }
        std::thread::sleep(POLL);
    }
}

fn read_log(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn submit(spec: &SlurmSpec, job: &Job, name: &str, log_dir: &Path) -> Result<String, ExecutorError> {
    let r = job.resources;
    let mut args: Vec<String> = vec![
        "--parsable".into(),
        "--job-name".into(),
        name.into(),
        "--output".into(),
        log_dir.join(format!("{name}-%j.out")).display().to_string(),
    ];
    let mut opt = |flag: &str, value: Option<String>| {
        if let Some(v) = value {
            args.push(format!("{flag}={v}"));
        }
    };
    opt("--partition", spec.partition.clone());
    opt("--account", spec.account.clone());
    opt("--qos", spec.qos.clone());
    opt("--cpus-per-task", r.cpus.map(|c| c.to_string()));
    opt("--mem", r.memory.map(|m| format!("{}M", m.mebibytes())));
    opt("--gpus", r.gpus.map(|g| g.to_string()));
    opt("--time", r.timeout.map(|t| t.0.as_secs().div_ceil(60).to_string()));
    args.extend(spec.sbatch_args.iter().cloned());
    let command = std::iter::once(spec.command.clone())
        .chain(job.worker_args())
        .map(|a| shell_quote(&a))
        .collect::<Vec<_>>()
        .join(" ");
    args.push("--wrap".into());
    args.push(format!("exec {command}"));
    match slurm("sbatch", &args) {
        Ok(out) => {
            // `--parsable` prints `ID` or `ID;CLUSTER`.
            let id = out.trim().split(';').next().unwrap_or_default().to_string();
            if id.is_empty() {
                Err(ExecutorError::Engine(format!("sbatch printed no job id: {out}")))
            } else {
                Ok(id)
            }
        }
        Err(ExecutorError::Engine(e))
            if e.contains("Requested node configuration is not available")
                || e.contains("Invalid generic resource")
                || e.contains("Memory specification can not be satisfied")
                || e.contains("More processors requested than permitted") =>
        {
            Err(ExecutorError::Impossible(format!(
                "stage `{}` asks for more than any node of the Slurm cluster has ({}): {e}; lower \
                 `resources` in the pipeline or run it on another executor",
                job.stage,
                r.describe()
            )))
        }
        Err(e) => Err(e),
    }
}
