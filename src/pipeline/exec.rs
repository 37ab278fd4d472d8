//! Running a pipeline: each stage starts as soon as the stages it needs are done, on a rayon
//! pool of `jobs` threads; unchanged stages are restored from the cache instead of run. With a
//! remote cache, a stage missing locally is fetched from it, and what a stage produces is pushed
//! to it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::key::{cache_key, stage_inputs};
use super::report::{Report, StageReport, State};
use super::task::{trial_key, Needed, Task};
use super::{lock, real_path, Pipeline, Stage};
use crate::cache::{clear_outputs, Artifact, Cache, CacheError, Metrics, RemoteError, RunEntry};
use crate::executors::{ExecutorError, ExecutorSpec, Executors, Job, Placement, Watcher};
use crate::stages::{Context, StageError, StageKind, Trials, Upstream};

#[derive(Debug, Clone)]
pub struct Options {
    /// Most stages running at once.
    pub jobs: usize,
    /// Run every selected stage even when its result is cached.
    pub force: bool,
    /// Run only these stages and what they need (all stages when empty).
    pub targets: Vec<String>,
    /// Directories outside the project root that outputs may reach through a symbolic link in
    /// the project (a container links `data/` to its volume); every other output stays inside.
    pub output_dirs: Vec<PathBuf>,
    /// The settings file's executors: a stage whose `runs_on` names one runs there. Empty: every
    /// stage runs here.
    pub executors: Executors,
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("unknown stage `{0}`; stages in this pipeline: {1}")]
    UnknownStage(String, String),
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// What the engine tells its caller while it runs (progress bars, log lines, API events).
pub trait Observer: Sync {
    fn started(&self, stage: &str);
    /// An executor took the stage: where it runs (said again when the node is known).
    fn placed(&self, stage: &str, placement: &Placement);
    fn finished(&self, report: &StageReport);
    fn log(&self, stage: &str, line: &str);
    fn warn(&self, message: &str);
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Runs the pipeline, then records the lock file and the cache usage.
pub fn run(
    p: &Pipeline,
    cache: &Cache,
    opts: &Options,
    cancel: &AtomicBool,
    obs: &dyn Observer,
) -> Result<Report, ExecError> {
    let mut targets = Vec::new();
    for t in &opts.targets {
        let i = p.stages.iter().position(|s| &s.name == t).ok_or_else(|| {
            let names: Vec<&str> = p.stages.iter().map(|s| s.name.as_str()).collect();
            ExecError::UnknownStage(t.clone(), names.join(", "))
        })?;
        targets.push(i);
    }
    let selected: BTreeSet<usize> = if targets.is_empty() {
        (0..p.stages.len()).collect()
    } else {
        p.dag.with_ancestors(&targets)
    };

    let mut waiting: BTreeMap<usize, usize> = selected
        .iter()
        .map(|&i| (i, p.dag.needs(i).filter(|n| selected.contains(n)).count()))
        .collect();
    let mut ready: VecDeque<usize> = waiting.iter().filter(|(_, &n)| n == 0).map(|(&i, _)| i).collect();
    let mut reports: Vec<Option<StageReport>> = vec![None; p.stages.len()];
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.jobs.max(1))
        .thread_name(|i| format!("stage-{i}"))
        .build()
        .expect("a thread pool can be built");
    let (tx, rx) = mpsc::channel::<(usize, StageReport)>();
    let mut lock = lock::Writer::open(p);
    let mut lock_error = None;
    let shared = Shared {
        p,
        cache,
        guards: Guards::new(p, cache, &opts.output_dirs),
        force: opts.force,
        cancel,
        obs,
        executors: &opts.executors,
        remote_down: AtomicBool::new(false),
    };
    let shared = &shared;

    pool.in_place_scope(|scope| {
        let mut running = 0usize;
        loop {
            while !cancel.load(Ordering::SeqCst) {
                let Some(i) = ready.pop_front() else { break };
                waiting.remove(&i);
                let upstream: BTreeMap<String, Vec<Artifact>> = p
                    .dag
                    .needs(i)
                    .map(|n| {
                        let r = reports[n].as_ref().expect("needed stages finished first");
                        (r.name.clone(), r.outs.clone())
                    })
                    .collect();
                let tx = tx.clone();
                running += 1;
                obs.started(&p.stages[i].name);
                scope.spawn(move |_| {
                    let report = run_stage(shared, i, &upstream);
                    let _ = tx.send((i, report));
                });
            }
            if running == 0 {
                break;
            }
            let (i, report) = rx.recv().expect("workers send before exiting");
            running -= 1;
            obs.finished(&report);
            if let Err(e) = lock.record(p, &report) {
                lock_error.get_or_insert(e);
            }
            let failed = matches!(report.state, State::Failed | State::Interrupted);
            let name = report.name.clone();
            reports[i] = Some(report);
            if failed {
                for d in p.dag.dependents(i).into_iter().filter(|d| selected.contains(d)) {
                    if reports[d].is_none() {
                        waiting.remove(&d);
                        ready.retain(|&r| r != d);
                        let r = report_of(p, d, State::Skipped, Some(format!("`{name}` did not finish")));
                        obs.finished(&r);
                        reports[d] = Some(r);
                    }
                }
            } else {
                for d in p.dag.graph.neighbors(petgraph::graph::NodeIndex::new(i)) {
                    let d = p.dag.graph[d];
                    if let Some(n) = waiting.get_mut(&d) {
                        *n -= 1;
                        if *n == 0 {
                            ready.push_back(d);
                        }
                    }
                }
            }
        }
    });

    let interrupted = cancel.load(Ordering::SeqCst);
    for &i in &selected {
        if reports[i].is_none() {
            let r = report_of(p, i, State::Skipped, Some("the run was interrupted".into()));
            obs.finished(&r);
            reports[i] = Some(r);
        }
    }
    let stages: Vec<StageReport> = reports.into_iter().flatten().collect();
    let report = Report {
        pipeline: p.name.clone(),
        ok: stages.iter().all(|s| s.state.succeeded()),
        interrupted,
        stages,
    };
    if let Some(e) = lock_error {
        return Err(e.into());
    }
    lock.flush()?;
    let pipeline_file = std::path::absolute(&p.file).unwrap_or_else(|_| p.file.clone());
    cache.record_usage(&pipeline_file, &lock.keys())?;
    cache.hasher.save()?;
    Ok(report)
}

/// `r` ended in `state` for `error`, now.
fn failed(mut r: StageReport, state: State, error: String) -> StageReport {
    r.state = state;
    r.error = Some(error);
    r.finished_at = now();
    r
}

/// A report for stage `i` that has done nothing yet.
fn report_of(p: &Pipeline, i: usize, state: State, error: Option<String>) -> StageReport {
    let t = now();
    StageReport {
        name: p.stages[i].name.clone(),
        kind: p.stages[i].kind.name(),
        state,
        key: None,
        inputs: BTreeMap::new(),
        outs: Vec::new(),
        metrics: Metrics::new(),
        duration_ms: 0,
        started_at: t,
        finished_at: t,
        error,
        placement: None,
    }
}

/// What every stage of one run uses.
struct Shared<'a> {
    p: &'a Pipeline,
    cache: &'a Cache,
    guards: Guards,
    force: bool,
    cancel: &'a AtomicBool,
    obs: &'a dyn Observer,
    executors: &'a Executors,
    /// Set when the remote cache failed once: the run carries on with the local cache alone.
    remote_down: AtomicBool,
}

impl Shared<'_> {
    /// Where the client keeps what it needs of executors' jobs: `jobs/` in the cache directory.
    fn jobs_dir(&self) -> PathBuf {
        let dir = self.cache.dir().join("jobs");
        std::path::absolute(&dir).unwrap_or(dir)
    }

    /// The executor that runs `stage`, with its name; `None` when it runs here.
    fn executor<'s>(&'s self, stage: &'s Stage) -> Option<(&'s str, &'s ExecutorSpec)> {
        let (name, _) = stage.runs_on.as_ref()?;
        Some((name.as_str(), self.executors.get(name)?))
    }

    /// The entry `key` of stage `stage` from the remote cache, copied into the local one; `None`
    /// when there is no remote, it lacks the entry or the entry is damaged (the stage then runs).
    fn fetch(&self, stage: &str, key: &str) -> Option<RunEntry> {
        if self.cache.remote().is_none() || self.remote_down.load(Ordering::SeqCst) {
            return None;
        }
        match self.cache.fetch(key) {
            Ok(Some((entry, t))) => {
                tracing::debug!(
                    "{stage}: fetched {} objects ({} bytes) from the remote cache",
                    t.objects,
                    t.bytes
                );
                Some(entry)
            }
            Ok(None) => {
                tracing::debug!("{stage}: not in the remote cache");
                None
            }
            Err(CacheError::Remote(e @ RemoteError::Corrupt { .. })) => {
                self.obs.warn(&format!(
                    "{stage}: discarding what the remote cache holds for key {key}: {e}; running the stage"
                ));
                None
            }
            Err(e) => {
                self.remote_failed(&e);
                None
            }
        }
    }

    /// Sends the entry `key` that stage `stage` just produced to the remote cache.
    fn push(&self, stage: &str, key: &str, entry: &RunEntry) {
        if self.cache.remote().is_none() || self.remote_down.load(Ordering::SeqCst) {
            return;
        }
        match self.cache.push(key, entry) {
            Ok(t) => tracing::debug!(
                "{stage}: pushed {} objects ({} bytes) to the remote cache",
                t.objects,
                t.bytes
            ),
            Err(e) => self.remote_failed(&e),
        }
    }

    /// A run never fails for want of its remote: say so once, then leave the remote alone.
    fn remote_failed(&self, e: &CacheError) {
        if !self.remote_down.swap(true, Ordering::SeqCst) {
            self.obs.warn(&format!(
                "the remote cache is not usable, carrying on with the local cache alone: {e}"
            ));
        }
    }
}

fn run_stage(shared: &Shared, i: usize, upstream: &BTreeMap<String, Vec<Artifact>>) -> StageReport {
    let &Shared {
        p,
        cache,
        ref guards,
        force,
        cancel,
        obs,
        ..
    } = shared;
    let stage = &p.stages[i];
    let mut report = report_of(p, i, State::Ran, None);

    // Before anything deletes or restores an output, where each one really is.
    let outs = stage.kind.stage().outs();
    let real_outs: Vec<PathBuf> = match outs.iter().map(|o| guards.resolve(&p.root, o)).collect() {
        Ok(real) => real,
        Err(e) => return failed(report, State::Failed, e),
    };
    let log = |line: &str| obs.log(&stage.name, line);
    if let Err(e) = stage.kind.stage().prepare(&p.root, &log) {
        return failed(report, State::Failed, e.to_string());
    }
    let inputs = match stage_inputs(p, i, &cache.hasher, upstream) {
        Ok(inputs) => inputs,
        Err((dep, e)) => return failed(report, State::Failed, format!("dependency `{dep}`: {e}")),
    };
    let kind = &stage.kind;
    let key = cache_key(kind.name(), kind.stage().version(), &kind.params(), &inputs);
    tracing::debug!("{}: cache key {key} over {} inputs", stage.name, inputs.len());
    report.inputs = inputs;
    report.key = Some(key.clone());

    let waiting = |pid: Option<u32>| {
        let holder = pid.map(|pid| format!(" (pid {pid})")).unwrap_or_default();
        obs.warn(&format!(
            "stage {}: waiting for another run{holder} that holds its outputs ({})…",
            stage.name,
            outs.join(", ")
        ));
    };
    // Held until the stage's result is recorded (or it fails): see `Cache::lock_outputs`.
    let _held = match cache.lock_outputs(&real_outs, cancel, &waiting) {
        Ok(Some(held)) => held,
        Ok(None) => return failed(report, State::Interrupted, "interrupted".into()),
        Err(e) => return failed(report, State::Failed, format!("locking outputs: {e}")),
    };

    if !force {
        let local = match cache.lookup(&key) {
            Ok(Some(entry)) => Some(entry),
            Ok(None) => {
                tracing::debug!("{}: not in the cache", stage.name);
                None
            }
            Err(e) => {
                obs.warn(&format!("{}: {e}; running the stage again", stage.name));
                None
            }
        };
        let found = match local {
            Some(entry) => Some((entry, State::Cached)),
            None => shared.fetch(&stage.name, &key).map(|entry| (entry, State::Fetched)),
        };
        if let Some((entry, state)) = found {
            match cache.restore(&p.root, &entry.outs) {
                Ok(()) => {
                    tracing::debug!("{}: restored {} outputs from the cache", stage.name, entry.outs.len());
                    report.state = state;
                    report.outs = entry.outs;
                    report.metrics = entry.metrics;
                    report.duration_ms = entry.duration_ms;
                    report.finished_at = now();
                    return report;
                }
                Err(CacheError::Corrupt { what, reason }) => {
                    obs.warn(&format!(
                        "{}: discarding corrupt cache entry {what} ({reason}); running the stage again",
                        stage.name
                    ));
                    cache.discard(&key);
                }
                Err(e) => return failed(report, State::Failed, format!("restoring outputs: {e}")),
            }
        }
    }

    let mut fanned = None;
    if let Some((name, spec)) = shared.executor(stage) {
        let Some(max_parallel) = stage.max_parallel else {
            return run_remote(shared, i, (name, spec), &key, upstream, report);
        };
        // A search whose trials are jobs: it runs here, and sends each trial to the executor.
        if let Err(e) = publish(shared, i, name, &key, upstream) {
            return failed(report, State::Failed, e);
        }
        fanned = Some(Fanned {
            shared,
            stage,
            executor: (name, spec),
            key: &key,
            max_parallel,
        });
    }
    let needed: Vec<Upstream> = p
        .dag
        .needs(i)
        .map(|n| {
            let s = &p.stages[n];
            Upstream {
                name: s.name.clone(),
                kind: s.kind.name(),
                outs: upstream[&s.name].iter().map(|a| p.root.join(&a.path)).collect(),
            }
        })
        .collect();
    let work = Work {
        root: &p.root,
        pipeline: &p.name,
        stage: &stage.name,
        kind: &stage.kind,
        upstream: &needed,
        inputs: &report.inputs,
        trials: fanned.as_ref().map(|f| f as &dyn Trials),
    };
    let (artifacts, metrics, duration_ms) = match work.perform(cache, cancel, &log) {
        Ok(done) => done,
        Err(Unfinished::Interrupted) => return failed(report, State::Interrupted, "interrupted".into()),
        Err(Unfinished::Failed(e)) => return failed(report, State::Failed, e),
    };
    report.duration_ms = duration_ms;
    let entry = RunEntry {
        stage: stage.name.clone(),
        kind: stage.kind.name().to_string(),
        outs: artifacts,
        metrics,
        duration_ms: report.duration_ms,
    };
    if let Err(e) = cache.record(&key, &entry) {
        return failed(report, State::Failed, format!("recording the cache entry: {e}"));
    }
    shared.push(&stage.name, &key, &entry);
    report.outs = entry.outs;
    report.metrics = entry.metrics;
    report.finished_at = now();
    report
}

/// Why a stage did not finish.
pub enum Unfinished {
    Interrupted,
    Failed(String),
}

/// A stage whose inputs are in place under `root`, ready to run, here or on a worker.
pub struct Work<'a> {
    pub root: &'a Path,
    pub pipeline: &'a str,
    pub stage: &'a str,
    pub kind: &'a StageKind,
    pub upstream: &'a [Upstream],
    pub inputs: &'a BTreeMap<String, String>,
    /// Where its search's trials run, when they are jobs of an executor.
    pub trials: Option<&'a dyn Trials>,
}

/// Where a worker writes the result of one trial, under its scratch project.
const TRIAL_RESULT: &str = "trial.json";

impl Work<'_> {
    /// Runs the stage and stores its outputs in `cache`: their artifacts, its metrics and how
    /// long it ran (ms).
    pub fn perform(
        &self,
        cache: &Cache,
        cancel: &AtomicBool,
        log: &(dyn Fn(&str) + Sync),
    ) -> Result<(Vec<Artifact>, Metrics, u64), Unfinished> {
        let outs = self.kind.stage().outs();
        prepare_outputs(self.root, &outs).map_err(|e| Unfinished::Failed(format!("preparing outputs: {e}")))?;
        let ctx = self.context(cancel, log);
        let clock = Instant::now();
        let result = self.kind.stage().run(&ctx);
        let duration_ms = clock.elapsed().as_millis() as u64;
        let metrics = match result {
            Ok(m) => m,
            Err(StageError::Cancelled) => return Err(Unfinished::Interrupted),
            Err(e) => return Err(Unfinished::Failed(e.to_string())),
        };
        if let Some(missing) = outs.iter().find(|o| !self.root.join(o).exists()) {
            return Err(Unfinished::Failed(format!(
                "the stage finished without writing its output `{missing}`"
            )));
        }
        let artifacts = cache
            .store(self.root, &outs)
            .map_err(|e| Unfinished::Failed(format!("caching outputs: {e}")))?;
        Ok((artifacts, metrics, duration_ms))
    }

    /// Runs trial `i` of the stage's search alone and stores its result in `cache`: its artifact
    /// and how long it ran (ms).
    pub fn perform_trial(
        &self,
        cache: &Cache,
        cancel: &AtomicBool,
        log: &(dyn Fn(&str) + Sync),
        i: usize,
    ) -> Result<(Vec<Artifact>, u64), Unfinished> {
        let ctx = self.context(cancel, log);
        let clock = Instant::now();
        let bytes = match self.kind.stage().run_trial(&ctx, i) {
            Ok(b) => b,
            Err(StageError::Cancelled) => return Err(Unfinished::Interrupted),
            Err(e) => return Err(Unfinished::Failed(e.to_string())),
        };
        let duration_ms = clock.elapsed().as_millis() as u64;
        let path = self.root.join(TRIAL_RESULT);
        std::fs::write(&path, bytes).map_err(|e| Unfinished::Failed(format!("{}: {e}", path.display())))?;
        let artifacts = cache
            .store(self.root, &[TRIAL_RESULT.to_string()])
            .map_err(|e| Unfinished::Failed(format!("caching the trial's result: {e}")))?;
        Ok((artifacts, duration_ms))
    }

    fn context<'c>(&'c self, cancel: &'c AtomicBool, log: &'c (dyn Fn(&str) + Sync)) -> Context<'c> {
        Context {
            root: self.root,
            pipeline: self.pipeline,
            stage: self.stage,
            upstream: self.upstream,
            inputs: self.inputs,
            cancel,
            log,
            trials: self.trials,
        }
    }
}

/// Stores stage `i`'s description in the remote cache under its key `key`, the objects of its
/// inputs first, for `sentiflow stage exec` to run it (whole, or trial by trial).
fn publish(
    shared: &Shared,
    i: usize,
    executor: &str,
    key: &str,
    upstream: &BTreeMap<String, Vec<Artifact>>,
) -> Result<(), String> {
    let &Shared { p, cache, .. } = shared;
    let stage = &p.stages[i];
    if cache.remote().is_none() {
        return Err(format!(
            "stage `{}` runs on executor `{executor}`, which needs a remote cache",
            stage.name
        ));
    }
    let deps = stage.kind.stage().deps();
    if let Some(outside) = deps
        .iter()
        .find(|d| d.starts_with('/') || d.split('/').any(|c| c == ".."))
    {
        return Err(format!(
            "stage `{}` reads `{outside}`, outside the project, and a stage on an executor gets its inputs \
             through the remote cache: copy it into the project, or run the stage here (no `runs_on`)",
            stage.name
        ));
    }
    let needs: Vec<Needed> = p
        .dag
        .needs(i)
        .map(|n| {
            let s = &p.stages[n];
            Needed {
                name: s.name.clone(),
                kind: s.kind.name().to_string(),
                outs: upstream[&s.name].clone(),
            }
        })
        .collect();
    cache
        .store(&p.root, &deps)
        .and_then(|deps| {
            cache.push_artifacts(&deps)?;
            for n in &needs {
                cache.push_artifacts(&n.outs)?;
            }
            let task = Task {
                pipeline: p.name.clone(),
                stage: stage.name.clone(),
                kind: stage.kind.clone(),
                needs,
                deps,
            };
            cache.put_task(key, serde_json::to_vec_pretty(&task).expect("tasks serialize"))
        })
        .map_err(|e| format!("sending the stage's inputs to the remote cache: {e}"))
}

/// A search on an executor: each trial a job, at most `max_parallel` at once.
struct Fanned<'a> {
    shared: &'a Shared<'a>,
    stage: &'a Stage,
    executor: (&'a str, &'a ExecutorSpec),
    /// The stage's key, under which its description is published.
    key: &'a str,
    max_parallel: usize,
}

impl Trials for Fanned<'_> {
    fn run(&self, n: usize) -> Result<Vec<Vec<u8>>, StageError> {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        // Each trial's slot: empty until a thread has run it.
        type Slot = std::sync::Mutex<Option<Result<Vec<u8>, StageError>>>;
        let results: Vec<Slot> = (0..n).map(|_| Slot::new(None)).collect();
        std::thread::scope(|scope| {
            for _ in 0..self.max_parallel.min(n) {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= n || failed.load(Ordering::SeqCst) || self.shared.cancel.load(Ordering::SeqCst) {
                        break;
                    }
                    let result = self.trial(i);
                    if result.is_err() {
                        failed.store(true, Ordering::SeqCst);
                    }
                    *results[i].lock().unwrap() = Some(result);
                });
            }
        });
        let mut out = Vec::with_capacity(n);
        let mut first_error = None;
        for r in results {
            match r.into_inner().unwrap() {
                Some(Ok(bytes)) => out.push(bytes),
                Some(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                None => {
                    first_error.get_or_insert(StageError::Cancelled);
                }
            }
        }
        match first_error {
            // A failed trial says more than the ones it stopped.
            Some(StageError::Cancelled) if !self.shared.cancel.load(Ordering::SeqCst) => {
                Err(StageError::Invalid("a trial failed; the others were not sent".into()))
            }
            Some(e) => Err(e),
            None => Ok(out),
        }
    }
}

impl Fanned<'_> {
    /// Trial `i`'s result: from a cache when a job computed it before, else from a new job.
    fn trial(&self, i: usize) -> Result<Vec<u8>, StageError> {
        let &Shared { cache, obs, cancel, .. } = self.shared;
        let (executor, spec) = self.executor;
        let stage = &self.stage.name;
        let key = trial_key(self.key, i);
        let cached = cache.lookup(&key).ok().flatten();
        let entry = match cached.or_else(|| self.shared.fetch(stage, &key)) {
            Some(entry) => entry,
            None => {
                let job = Job {
                    executor,
                    stage,
                    key: &key,
                    task: self.key,
                    trial: Some(i),
                    resources: &self.stage.resources,
                    remote_cache: cache.remote().map(|r| r.url()).unwrap_or_default(),
                    state_dir: self.shared.jobs_dir(),
                };
                let placed = |at: &Placement| {
                    let node = at.node.as_deref().map(|n| format!(" on node {n}")).unwrap_or_default();
                    obs.log(
                        stage,
                        &format!("trial {i}: {} job {}{node} ({executor})", at.engine, at.job),
                    );
                };
                let log = |line: &str| obs.log(stage, &format!("trial {i}: {line}"));
                let watcher = Watcher {
                    cancel,
                    placed: &placed,
                    log: &log,
                };
                match spec.run(&job, &watcher) {
                    Ok(_) => {}
                    Err(ExecutorError::Cancelled) => return Err(StageError::Cancelled),
                    Err(e) => return Err(StageError::Invalid(format!("trial {i}: executor `{executor}`: {e}"))),
                }
                match cache.fetch(&key) {
                    Ok(Some((entry, _))) => entry,
                    Ok(None) => {
                        return Err(StageError::Invalid(format!(
                            "trial {i}: the job ended, but the remote cache has no result for it"
                        )))
                    }
                    Err(e) => return Err(StageError::Invalid(format!("trial {i}: fetching its result: {e}"))),
                }
            }
        };
        let out = entry
            .outs
            .first()
            .ok_or_else(|| StageError::Invalid(format!("trial {i}: its result has no file")))?;
        cache
            .read_object(&out.hash)
            .map_err(|e| StageError::Invalid(format!("trial {i}: {e}")))
    }
}

/// Stage `i` on an executor: its description and inputs go to the remote cache, the engine runs
/// `sentiflow stage exec` on one of its machines, and the result comes back through the remote
/// cache, as a fetch would bring it.
fn run_remote(
    shared: &Shared,
    i: usize,
    (executor, spec): (&str, &ExecutorSpec),
    key: &str,
    upstream: &BTreeMap<String, Vec<Artifact>>,
    mut report: StageReport,
) -> StageReport {
    let &Shared {
        p, cache, cancel, obs, ..
    } = shared;
    let stage = &p.stages[i];
    if let Err(e) = publish(shared, i, executor, key, upstream) {
        return failed(report, State::Failed, e);
    }
    let remote = cache.remote().expect("publish needs a remote cache");
    let job = Job {
        executor,
        stage: &stage.name,
        key,
        task: key,
        trial: None,
        resources: &stage.resources,
        remote_cache: remote.url(),
        state_dir: shared.jobs_dir(),
    };
    let placement = std::sync::Mutex::new(None);
    let placed = |at: &Placement| {
        let mut seen = placement.lock().unwrap();
        if seen.as_ref() != Some(at) {
            let node = at.node.as_deref().map(|n| format!(" on node {n}")).unwrap_or_default();
            obs.log(&stage.name, &format!("{} job {}{node} ({executor})", at.engine, at.job));
            obs.placed(&stage.name, at);
            *seen = Some(at.clone());
        }
    };
    let log = |line: &str| obs.log(&stage.name, line);
    let watcher = Watcher {
        cancel,
        placed: &placed,
        log: &log,
    };
    let result = spec.run(&job, &watcher);
    report.placement = placement.into_inner().unwrap();
    match result {
        Ok(_) => {}
        Err(ExecutorError::Cancelled) => return failed(report, State::Interrupted, "interrupted".into()),
        Err(e) => return failed(report, State::Failed, format!("executor `{executor}`: {e}")),
    }
    let entry = match cache.fetch(key) {
        Ok(Some((entry, _))) => entry,
        Ok(None) => {
            return failed(
                report,
                State::Failed,
                format!("executor `{executor}`: the job ended, but the remote cache has no result for key {key}"),
            )
        }
        Err(e) => return failed(report, State::Failed, format!("fetching the job's result: {e}")),
    };
    if let Err(e) = cache.restore(&p.root, &entry.outs) {
        return failed(report, State::Failed, format!("restoring outputs: {e}"));
    }
    report.outs = entry.outs;
    report.metrics = entry.metrics;
    report.duration_ms = entry.duration_ms;
    report.finished_at = now();
    report
}

/// The real places an output must keep clear of. The engine deletes an output before its stage
/// runs and overwrites it on a restore; validation rejects outputs whose text names the project
/// root, `pipelines/` or `cache/`, but only the file system knows where a symbolic link on the
/// path leads, or where `--cache-dir` put the cache.
struct Guards {
    root: PathBuf,
    /// `Options::output_dirs`, resolved.
    allowed: Vec<PathBuf>,
    pipelines: PathBuf,
    file: PathBuf,
    lock: PathBuf,
    cache: PathBuf,
}

impl Guards {
    fn new(p: &Pipeline, cache: &Cache, output_dirs: &[PathBuf]) -> Guards {
        Guards {
            root: real_path(&p.root),
            allowed: output_dirs.iter().map(|d| real_path(d)).collect(),
            pipelines: real_path(&p.root.join("pipelines")),
            file: real_path(&p.file),
            lock: real_path(&super::lock_path(&p.file)),
            cache: real_path(cache.dir()),
        }
    }

    /// Where output `rel` really is, or why the engine must not touch it.
    fn resolve(&self, root: &Path, rel: &str) -> Result<PathBuf, String> {
        let real = real_path(&root.join(rel));
        let place = if real == self.root {
            "the project root itself".to_string()
        } else if self.allowed.contains(&real) {
            format!("the allowed output directory {} itself", real.display())
        } else if !real.starts_with(&self.root) && !self.allowed.iter().any(|a| real.starts_with(a)) {
            format!(
                "outside the project root {} and the allowed output directories (--output-dirs)",
                self.root.display()
            )
        } else if real.starts_with(&self.pipelines) {
            format!("inside the pipelines directory {}", self.pipelines.display())
        } else if real == self.file || real == self.lock {
            "the pipeline file or its lock file".to_string()
        } else if real.starts_with(&self.cache) {
            format!("inside the cache directory {}", self.cache.display())
        } else if self.cache.starts_with(&real) {
            format!("which holds the cache directory {}", self.cache.display())
        } else {
            return Ok(real);
        };
        Err(format!(
            "output `{rel}` resolves to {}, {place}; the engine deletes outputs before a stage runs, so it \
             leaves this one alone: if a symbolic link on its path leads there, remove the link, otherwise \
             write the output elsewhere inside the project (a directory the link leads to on purpose, such as a \
             volume, can be allowed with `--output-dirs DIR`, SENTIFLOW_OUTPUT_DIRS)",
            real.display()
        ))
    }
}

/// Removes old outputs and makes their parent directories.
fn prepare_outputs(root: &Path, outs: &[String]) -> Result<(), CacheError> {
    clear_outputs(root, outs)?;
    for o in outs {
        if let Some(parent) = root.join(o).parent() {
            std::fs::create_dir_all(parent).map_err(|e| CacheError::io(parent, e))?;
        }
    }
    Ok(())
}
