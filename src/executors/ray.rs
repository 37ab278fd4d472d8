//! The Ray executor: a stage is a job of Ray's Jobs REST API (the dashboard's address), whose
//! entrypoint is the worker command; the stage's resources are the entrypoint's.
//!
//! The submission id derives from the stage's cache key and an attempt number, so a client
//! killed mid-run that runs again finds its job and waits for it instead of submitting another;
//! a job that failed or was stopped is followed by the next attempt.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::job::{forwarded_env, shell_quote, tail, ExecutorError, Job, Placement, Watch, POLL};
use super::resources::Resources;

/// An executor of the settings file with `engine: ray`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RaySpec {
    /// The dashboard's address, where the Jobs API answers: `http://HEAD:8265`.
    pub address: String,
    /// The sentiflow program on the cluster's nodes.
    #[serde(default = "default_command")]
    pub command: String,
    /// More variables of this machine to pass to the job (the remote cache's are always passed).
    #[serde(default)]
    pub env: Vec<String>,
    /// A custom resource the job must hold, e.g. `{accelerator: 1}` (Ray's `entrypoint_resources`).
    #[serde(default)]
    pub resources: BTreeMap<String, f64>,
}

fn default_command() -> String {
    "sentiflow".into()
}

/// `POST /api/jobs/`.
#[derive(Serialize)]
struct Submit<'a> {
    entrypoint: String,
    submission_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    entrypoint_num_cpus: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    entrypoint_num_gpus: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    entrypoint_memory: Option<u64>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    entrypoint_resources: &'a BTreeMap<String, f64>,
    runtime_env: RuntimeEnv<'a>,
    metadata: BTreeMap<&'static str, &'a str>,
}

#[derive(Serialize)]
struct RuntimeEnv<'a> {
    env_vars: &'a BTreeMap<String, String>,
}

/// What `GET /api/jobs/{id}` says of a job.
#[derive(Debug, Deserialize)]
struct JobInfo {
    status: Status,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    driver_node_id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
enum Status {
    Pending,
    Running,
    Stopped,
    Succeeded,
    Failed,
}

#[derive(Deserialize)]
struct Logs {
    logs: String,
}

/// A node as the dashboard lists it (`GET /nodes?view=summary`).
#[derive(Deserialize)]
struct Nodes {
    data: NodesData,
}

#[derive(Deserialize)]
struct NodesData {
    summary: Vec<NodeSummary>,
}

#[derive(Deserialize)]
struct NodeSummary {
    raylet: Raylet,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raylet {
    state: String,
    #[serde(default)]
    resources_total: BTreeMap<String, f64>,
}

struct Client {
    base: String,
    agent: ureq::Agent,
}

impl Client {
    fn new(address: &str) -> Client {
        let agent = ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_connect(Some(Duration::from_secs(5)))
                .timeout_global(Some(Duration::from_secs(30)))
                .build(),
        );
        Client {
            base: address.trim_end_matches('/').to_string(),
            agent,
        }
    }

    /// `(status, body)` of a call; an error only when the cluster cannot be reached.
    fn call(&self, method: &str, path: &str, body: Option<String>) -> Result<(u16, String), ExecutorError> {
        let url = format!("{}{path}", self.base);
        let result = match body {
            None if method == "GET" => self.agent.get(&url).call(),
            None => self.agent.post(&url).send_empty(),
            Some(b) => self.agent.post(&url).header("Content-Type", "application/json").send(b),
        };
        let fail = |e: ureq::Error| {
            ExecutorError::Engine(format!(
                "Ray cluster at {}: {e}; is its dashboard (the Jobs API) at this address?",
                self.base
            ))
        };
        let mut response = result.map_err(fail)?;
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().map_err(fail)?;
        Ok((status, text))
    }

    fn parse<T: for<'de> Deserialize<'de>>(&self, path: &str, text: &str) -> Result<T, ExecutorError> {
        serde_json::from_str(text).map_err(|e| {
            ExecutorError::Engine(format!(
                "Ray cluster at {}: unexpected answer to {path}: {e}: {}",
                self.base,
                text.chars().take(300).collect::<String>()
            ))
        })
    }

    /// The job `id`, or `None` when the cluster has none of that name.
    fn job(&self, id: &str) -> Result<Option<JobInfo>, ExecutorError> {
        let path = format!("/api/jobs/{id}");
        match self.call("GET", &path, None)? {
            (404, _) => Ok(None),
            (200, text) => self.parse(&path, &text).map(Some),
            (status, text) => Err(ExecutorError::Engine(format!(
                "Ray cluster at {}: GET {path}: HTTP {status}: {text}",
                self.base
            ))),
        }
    }

    fn logs(&self, id: &str) -> Result<String, ExecutorError> {
        let path = format!("/api/jobs/{id}/logs");
        match self.call("GET", &path, None)? {
            (200, text) => Ok(self.parse::<Logs>(&path, &text)?.logs),
            _ => Ok(String::new()),
        }
    }

    fn stop(&self, id: &str) {
        if let Err(e) = self.call("POST", &format!("/api/jobs/{id}/stop"), None) {
            tracing::warn!("stopping Ray job {id}: {e}");
        }
    }

    /// The total resources of each live node.
    fn nodes(&self) -> Result<Vec<BTreeMap<String, f64>>, ExecutorError> {
        let path = "/nodes?view=summary";
        let (status, text) = self.call("GET", path, None)?;
        if status != 200 {
            return Err(ExecutorError::Engine(format!(
                "Ray cluster at {}: GET {path}: HTTP {status}: {text}",
                self.base
            )));
        }
        let nodes: Nodes = self.parse(path, &text)?;
        Ok(nodes
            .data
            .summary
            .into_iter()
            .filter(|n| n.raylet.state == "ALIVE")
            .map(|n| n.raylet.resources_total)
            .collect())
    }
}

/// What the job asks of a node, as Ray names resources (memory in bytes).
fn demand(resources: &Resources, custom: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    let mut d = custom.clone();
    if let Some(c) = resources.cpus {
        d.insert("CPU".into(), c as f64);
    }
    if let Some(g) = resources.gpus {
        d.insert("GPU".into(), g as f64);
    }
    if let Some(m) = resources.memory {
        d.insert("memory".into(), m.0 as f64);
    }
    d
}

/// Ray keeps a job that no node can take pending forever: refuse it before submitting, naming
/// the resource that no node has enough of.
fn check_fits(client: &Client, job: &Job, demand: &BTreeMap<String, f64>) -> Result<(), ExecutorError> {
    let nodes = client.nodes()?;
    if nodes
        .iter()
        .any(|n| demand.iter().all(|(r, want)| n.get(r).copied().unwrap_or(0.0) >= *want))
    {
        return Ok(());
    }
    let short: Vec<String> = demand
        .iter()
        .filter(|(r, want)| !nodes.iter().any(|n| n.get(*r).copied().unwrap_or(0.0) >= **want))
        .map(|(r, want)| {
            let most = nodes.iter().filter_map(|n| n.get(r)).fold(0.0f64, |a, b| a.max(*b));
            match r.as_str() {
                "memory" => format!(
                    "memory: {} MiB (the most any node has: {} MiB)",
                    (*want / 1048576.0).ceil(),
                    (most / 1048576.0).floor()
                ),
                "CPU" => format!("cpus: {want} (the most any node has: {most})"),
                "GPU" => format!("gpus: {want} (the most any node has: {most})"),
                other => format!("resource `{other}`: {want} (the most any node has: {most})"),
            }
        })
        .collect();
    let why = if short.is_empty() {
        "no single node has all of it at once".to_string()
    } else {
        short.join("; ")
    };
    Err(ExecutorError::Impossible(format!(
        "stage `{}` asks for more than any node of the Ray cluster at {} ({} live) has: {why}; lower \
         `resources` in the pipeline or run it on another executor",
        job.stage,
        client.base,
        nodes.len()
    )))
}

pub(super) fn run(spec: &RaySpec, job: &Job, watch: &dyn Watch) -> Result<Placement, ExecutorError> {
    let client = Client::new(&spec.address);
    let demand = demand(job.resources, &spec.resources);
    let name = job.name();
    let mut attempt = 1u32;
    // The first attempt that is still going, or has not been submitted yet.
    let id = loop {
        let id = format!("{name}-{attempt}");
        match client.job(&id)? {
            None => {
                check_fits(&client, job, &demand)?;
                submit(&client, spec, job, &id)?;
                watch.log(&format!("submitted Ray job {id} to {}", client.base));
                break id;
            }
            Some(info) if matches!(info.status, Status::Pending | Status::Running) => {
                watch.log(&format!("found Ray job {id} still {:?}: following it", info.status));
                break id;
            }
            Some(_) if attempt >= 100 => {
                return Err(ExecutorError::Engine(format!(
                    "Ray cluster at {}: 100 jobs of stage `{}` ended already ({name}-1 … {id}); stop there",
                    client.base, job.stage
                )))
            }
            Some(_) => attempt += 1,
        }
    };
    let mut placement = Placement {
        executor: job.executor.to_string(),
        engine: "ray".into(),
        job: id.clone(),
        node: None,
        url: Some(format!("{}/#/jobs/{id}", client.base)),
    };
    watch.placed(&placement);
    let started = Instant::now();
    let mut shown = 0usize;
    loop {
        let info = client
            .job(&id)?
            .ok_or_else(|| ExecutorError::Engine(format!("Ray cluster at {}: job {id} disappeared", client.base)))?;
        if placement.node.is_none() && info.driver_node_id.as_deref().is_some_and(|n| !n.is_empty()) {
            placement.node = info.driver_node_id.clone();
            watch.placed(&placement);
        }
        let logs = client.logs(&id)?;
        if logs.len() > shown {
            // Whole lines only: a partial last line waits for the next look.
            let end = logs[shown..].rfind('\n').map(|i| shown + i + 1).unwrap_or(shown);
            if matches!(info.status, Status::Pending | Status::Running) {
                logs[shown..end].lines().for_each(|l| watch.log(l));
                shown = end;
            } else {
                logs[shown..].lines().for_each(|l| watch.log(l));
                shown = logs.len();
            }
        }
        match info.status {
            Status::Succeeded => return Ok(placement),
            Status::Failed | Status::Stopped => {
                return Err(ExecutorError::Failed(format!(
                    "Ray job {id} {}: {}; its log ends:\n{}",
                    if info.status == Status::Failed {
                        "failed"
                    } else {
                        "was stopped"
                    },
                    info.message.unwrap_or_default(),
                    tail(&logs, 20)
                )))
            }
            Status::Pending | Status::Running => {}
        }
        if watch.cancelled() {
            client.stop(&id);
            return Err(ExecutorError::Cancelled);
        }
        if let Some(limit) = job.resources.timeout {
            if started.elapsed() > limit.0 {
                client.stop(&id);
                return Err(ExecutorError::Failed(format!(
                    "Ray job {id} ran past the stage's timeout of {limit}; stopped it"
                )));
            }
        }
        std::thread::sleep(POLL);
    }
}

fn submit(client: &Client, spec: &RaySpec, job: &Job, id: &str) -> Result<(), ExecutorError> {
    // The remote cache's variables, which Ray does not pass on from this machine.
    let env = forwarded_env(&spec.env);
    let entrypoint = std::iter::once(spec.command.clone())
        .chain(job.worker_args())
        .map(|a| shell_quote(&a))
        .collect::<Vec<_>>()
        .join(" ");
    let body = Submit {
        entrypoint,
        submission_id: id,
        entrypoint_num_cpus: job.resources.cpus.map(f64::from),
        entrypoint_num_gpus: job.resources.gpus.map(f64::from),
        entrypoint_memory: job.resources.memory.map(|m| m.0),
        entrypoint_resources: &spec.resources,
        runtime_env: RuntimeEnv { env_vars: &env },
        metadata: [("sentiflow_stage", job.stage), ("sentiflow_key", job.key)].into(),
    };
    let body = serde_json::to_string(&body).expect("requests serialize");
    match client.call("POST", "/api/jobs/", Some(body))? {
        (200, _) => Ok(()),
        (status, text) => Err(ExecutorError::Engine(format!(
            "Ray cluster at {} refused job {id}: HTTP {status}: {text}",
            client.base
        ))),
    }
}
