//! A real two-node Ray cluster for the Ray engine tests, from the Ray of requirements-dev.txt
//! (`ray start --block`): a head node (1 CPU, no GPU) and a second node (2 CPUs, 1 GPU and 1 of
//! the custom resource `accelerator`), on free ports, sharing a temp dir of their own. Dropping it
//! kills every process the cluster started (its daemons, workers and job entrypoints) and nothing
//! else, so clusters of tests that run at once stay apart.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::daemon::{free_ports, sweep, tail, Daemon};

pub struct Ray {
    dir: tempfile::TempDir,
    head: Daemon,
    node: Option<Daemon>,
    /// The GCS port, which the job entrypoints' `RAY_ADDRESS` ends with.
    gcs_port: u16,
    /// `http://127.0.0.1:PORT`: the dashboard, which serves the Jobs REST API (`/api/jobs/`).
    pub address: String,
    /// The node with the GPU and the `accelerator` resource.
    pub gpu_node_id: String,
    /// The head node: 1 CPU, no GPU.
    pub cpu_node_id: String,
}

/// `ray`: `$SENTIFLOW_RAY`, else the one in `$SENTIFLOW_VENV` (scripts/test sets it).
fn ray() -> PathBuf {
    if let Some(path) = std::env::var_os("SENTIFLOW_RAY") {
        return path.into();
    }
    let venv = std::env::var_os("SENTIFLOW_VENV")
        .or_else(|| std::env::var_os("VIRTUAL_ENV"))
        .expect("set SENTIFLOW_RAY to Ray's `ray`, or run through scripts/test");
    PathBuf::from(venv).join("bin/ray")
}

fn get_json(agent: &ureq::Agent, url: &str) -> Option<serde_json::Value> {
    let mut response = agent.get(url).call().ok()?;
    if response.status() != 200 {
        return None;
    }
    serde_json::from_str(&response.body_mut().read_to_string().ok()?).ok()
}

impl Ray {
    /// Starts the head, waits until the Jobs API answers, starts the GPU node and waits until
    /// both nodes are alive. `env` goes into both nodes' environment, which job entrypoints
    /// inherit (with their `runtime_env.env_vars` on top).
    pub fn start(env: &[(&str, String)]) -> Ray {
        let dir = tempfile::Builder::new().prefix("sentiflow-ray").tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let ports = free_ports(17);
        let port = |i: usize| ports[i].to_string();
        let address = format!("http://127.0.0.1:{}", ports[1]);
        let command = |log: &str| {
            let log = std::fs::File::create(root.join(log)).unwrap();
            let mut cmd = Command::new(ray());
            cmd.args(["start", "--block", "--disable-usage-stats", "--temp-dir"])
                .arg(&root)
                .args(["--object-store-memory", "100000000"])
                // Random worker ports, not the shared default range 10002-19999.
                .args(["--min-worker-port", "0", "--max-worker-port", "0"])
                .args(["--log-style", "record", "--log-color", "false"])
                .env("RAY_USAGE_STATS_ENABLED", "0")
                .env_remove("RAY_ADDRESS")
                .env_remove("RAY_API_SERVER_ADDRESS")
                .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log);
            cmd
        };
        let mut head = command("head.log");
        head.args(["--head", "--port", &port(0), "--num-cpus", "1", "--num-gpus", "0"])
            .args(["--include-dashboard", "true", "--dashboard-host", "127.0.0.1"])
            .args(["--dashboard-port", &port(1), "--ray-client-server-port", &port(2)])
            .args([
                "--dashboard-agent-listen-port",
                &port(3),
                "--dashboard-agent-grpc-port",
                &port(4),
            ])
            .args(["--metrics-export-port", &port(5), "--runtime-env-agent-port", &port(6)])
            .args(["--node-manager-port", &port(7), "--object-manager-port", &port(8)]);
        let head = Daemon::spawn(head, None);
        let mut ray = Ray {
            dir,
            head,
            node: None,
            gcs_port: ports[0],
            address,
            gpu_node_id: String::new(),
            cpu_node_id: String::new(),
        };
        let agent = ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(10)))
                .build(),
        );
        ray.wait("the head's Jobs API", |ray| {
            get_json(&agent, &format!("{}/api/jobs/", ray.address)).is_some_and(|jobs| jobs.is_array())
        });
        let mut node = command("node.log");
        node.args(["--address", &format!("127.0.0.1:{}", ports[0])])
            .args([
                "--num-cpus",
                "2",
                "--num-gpus",
                "1",
                "--resources",
                r#"{"accelerator": 1}"#,
            ])
            .args([
                "--dashboard-agent-listen-port",
                &port(9),
                "--dashboard-agent-grpc-port",
                &port(10),
            ])
            .args([
                "--metrics-export-port",
                &port(11),
                "--runtime-env-agent-port",
                &port(12),
            ])
            .args(["--node-manager-port", &port(13), "--object-manager-port", &port(14)]);
        ray.node = Some(Daemon::spawn(node, None));
        let nodes_url = format!("{}/api/v0/nodes?detail=1", ray.address);
        let mut ids = (String::new(), String::new());
        ray.wait("both Ray nodes", |_| {
            let Some(nodes) = get_json(&agent, &nodes_url) else {
                return false;
            };
            let alive: Vec<&serde_json::Value> = nodes["data"]["result"]["result"]
                .as_array()
                .map(|nodes| nodes.iter().filter(|n| n["state"] == "ALIVE").collect())
                .unwrap_or_default();
            let id = |gpu: bool| {
                alive
                    .iter()
                    .find(|n| (n["resources_total"]["GPU"].as_f64().unwrap_or(0.0) > 0.0) == gpu)
                    .and_then(|n| n["node_id"].as_str())
                    .map(str::to_string)
            };
            match (alive.len(), id(true), id(false)) {
                (2, Some(gpu), Some(cpu)) => {
                    ids = (gpu, cpu);
                    true
                }
                _ => false,
            }
        });
        (ray.gpu_node_id, ray.cpu_node_id) = ids;
        ray
    }

    /// Polls `ready` for up to 120 s, panicking with the logs if a node exits or time runs out.
    fn wait(&self, what: &str, mut ready: impl FnMut(&Ray) -> bool) {
        let start = Instant::now();
        while !ready(self) {
            for (name, daemon) in [("head", Some(&self.head)), ("GPU node", self.node.as_ref())] {
                if let Some(status) = daemon.and_then(Daemon::exited) {
                    panic!("the Ray {name} exited ({status}):\n{}", self.log());
                }
            }
            if start.elapsed() > Duration::from_secs(120) {
                panic!("{what} not up within 120 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The logs that matter: both `ray start`s' output, then the tails of the GCS', raylets',
    /// dashboard's, job agents' and job drivers' logs.
    pub fn log(&self) -> String {
        let mut out = String::new();
        for name in ["head.log", "node.log"] {
            out.push_str(&format!(
                "==> {name} <==\n{}\n",
                tail(&self.dir.path().join(name), 20_000)
            ));
        }
        let logs = self.dir.path().join("session_latest/logs");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&logs)
            .map(|entries| entries.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        let wanted = [
            "gcs_server",
            "raylet",
            "dashboard.",
            "dashboard_JobHead",
            "dashboard_agent",
            "runtime_env_agent",
            "job-driver-",
        ];
        for file in files {
            let name = file.file_name().unwrap().to_string_lossy().into_owned();
            if !wanted.iter().any(|w| name.starts_with(w)) {
                continue;
            }
            let text = tail(&file, 8_000);
            if !text.trim().is_empty() {
                out.push_str(&format!("==> {name} <==\n{text}\n"));
            }
        }
        out
    }
}

impl Drop for Ray {
    /// Kills both `ray start`s, everything in their sessions (GCS, raylets, dashboard, agents,
    /// workers, job supervisors) and the job entrypoints, which Ray starts in sessions of their
    /// own but with `RAY_ADDRESS` pointing at this cluster's GCS.
    fn drop(&mut self) {
        let mut sessions = vec![self.head.pid];
        sessions.extend(self.node.as_ref().map(|n| n.pid));
        let suffix = format!(":{}", self.gcs_port);
        sweep(&sessions, |var| {
            var.starts_with(b"RAY_ADDRESS=") && var.ends_with(suffix.as_bytes())
        });
    }
}
