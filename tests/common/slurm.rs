//! A throw-away single-host Slurm cluster for the Slurm engine tests: Debian's slurm-wlm
//! (`slurmctld`, `slurmd`) and `munged`, run in the foreground as children with a munge key and
//! socket, a `slurm.conf`, state and logs of their own in a temp dir, on free ports. Its one node
//! (this host's name) has 2 CPUs, 2048 MB and one GPU (a gres backed by /dev/null); partition
//! `debug`. Clients reach it with `SLURM_CONF` ([`Slurm::env`]). Dropping it kills the daemons and
//! every job they started, nothing else, so clusters of tests that run at once stay apart. Needs
//! root: `munged` runs as `munge`, `slurmd` as root.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::daemon::{free_ports, sweep, tail, Daemon};

pub struct Slurm {
    dir: tempfile::TempDir,
    munged: Daemon,
    slurmctld: Option<Daemon>,
    slurmd: Option<Daemon>,
    /// The node's name: this host's short name.
    pub node: String,
}

/// A daemon program: `/usr/sbin/NAME` (Debian's place), else `NAME` from `PATH`.
fn sbin(name: &str) -> PathBuf {
    let path = Path::new("/usr/sbin").join(name);
    if path.is_file() {
        path
    } else {
        name.into()
    }
}

/// The uid and gid of `user`.
fn ids(user: &str) -> (u32, u32) {
    let id = |flag: &str| {
        let out = Command::new("id").args([flag, user]).output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("no `{user}` user (is munge installed?)"))
    };
    (id("-u"), id("-g"))
}

impl Slurm {
    /// Starts munged, slurmctld and slurmd, and waits until `sinfo` shows the node idle.
    pub fn start() -> Slurm {
        // SAFETY: getuid has no preconditions.
        assert_eq!(
            unsafe { libc::getuid() },
            0,
            "the Slurm tests run munged and slurmd: run them as root"
        );
        let dir = tempfile::Builder::new().prefix("sentiflow-slurm").tempdir().unwrap();
        let root = dir.path().to_path_buf();
        // munged wants every directory above its socket searchable by all.
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();

        // munge: a key of this cluster's own, and munged as `munge` on a socket in `munge/`.
        let munge = root.join("munge");
        std::fs::create_dir(&munge).unwrap();
        let key = munge.join("munge.key");
        let out = Command::new(sbin("mungekey"))
            .args(["--create", "--keyfile"])
            .arg(&key)
            .output()
            .unwrap_or_else(|e| panic!("mungekey: {e} (is munge installed?)"));
        assert!(
            out.status.success(),
            "mungekey: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (uid, gid) = ids("munge");
        for path in [&munge, &key] {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
        }
        std::fs::set_permissions(&munge, std::fs::Permissions::from_mode(0o755)).unwrap();
        let socket = munge.join("munge.socket");
        let log = |name: &str| {
            let file = std::fs::File::create(root.join(name)).unwrap();
            (file.try_clone().unwrap(), file)
        };
        let (stdout, stderr) = log("munged.log");
        let mut munged = Command::new(sbin("munged"));
        munged
            .arg("--foreground")
            .arg(format!("--key-file={}", key.display()))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--pid-file={}", munge.join("munged.pid").display()))
            .arg(format!("--log-file={}", munge.join("munged.log").display()))
            .arg(format!("--seed-file={}", munge.join("munged.seed").display()))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let munged = Daemon::spawn(munged, Some((uid, gid)));

        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        let host = host.trim().split('.').next().unwrap().to_string();
        let mut slurm = Slurm {
            dir,
            munged,
            slurmctld: None,
            slurmd: None,
            node: host.clone(),
        };
        slurm.wait("munged", || {
            Command::new("munge")
                .args(["--no-input", "--socket"])
                .arg(&socket)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });

        let ports = free_ports(2);
        let at = |name: &str| root.join(name).display().to_string();
        for name in ["state", "spool"] {
            std::fs::create_dir(root.join(name)).unwrap();
        }
        let conf = format!(
            "ClusterName=sentiflow
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket}
StateSaveLocation={state}
SlurmdSpoolDir={spool}
SlurmctldPidFile={ctld_pid}
SlurmdPidFile={slurmd_pid}
SlurmctldLogFile={ctld_log}
SlurmdLogFile={slurmd_log}
# Process groups: what a job leaves behind when its batch script ends (or is cancelled) is
# killed. proctrack/linuxproc loses processes whose parent died, and cgroups are not there.
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# Finished jobs stay in squeue -t all and scontrol show job this long (seconds).
MinJobAge=300
# From SIGTERM to SIGKILL on scancel or at the time limit (seconds).
KillWait=30
GresTypes=gpu
# The node is what this file says, whatever the hardware.
SlurmdParameters=config_overrides
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 RealMemory=2048 Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
",
            ctld_port = ports[0],
            slurmd_port = ports[1],
            socket = socket.display(),
            state = at("state"),
            spool = at("spool"),
            ctld_pid = at("slurmctld.pid"),
            slurmd_pid = at("slurmd.pid"),
            ctld_log = at("slurmctld.log"),
            slurmd_log = at("slurmd.log"),
        );
        std::fs::write(root.join("slurm.conf"), conf).unwrap();
        std::fs::write(
            root.join("gres.conf"),
            format!("NodeName={host} Name=gpu File=/dev/null\n"),
        )
        .unwrap();
        for daemon in ["slurmctld", "slurmd"] {
            let (stdout, stderr) = log(&format!("{daemon}.out"));
            let mut cmd = Command::new(sbin(daemon));
            cmd.arg("-D")
                .arg("-f")
                .arg(root.join("slurm.conf"))
                .env("SLURM_CONF", root.join("slurm.conf"))
                .stdin(Stdio::null())
                .stdout(stdout)
                .stderr(stderr);
            let started = Some(Daemon::spawn(cmd, None));
            match daemon {
                "slurmctld" => slurm.slurmctld = started,
                _ => slurm.slurmd = started,
            }
        }
        let conf = slurm.conf();
        slurm.wait("the Slurm node idle", || {
            Command::new("sinfo")
                .args(["-h", "-N", "-o", "%t"])
                .env("SLURM_CONF", &conf)
                .stderr(Stdio::null())
                .output()
                .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "idle")
        });
        slurm
    }

    /// Polls `ready` for up to 60 s, panicking with the logs if a daemon exits or time runs out.
    fn wait(&self, what: &str, mut ready: impl FnMut() -> bool) {
        let start = Instant::now();
        while !ready() {
            let daemons = [
                ("munged", Some(&self.munged)),
                ("slurmctld", self.slurmctld.as_ref()),
                ("slurmd", self.slurmd.as_ref()),
            ];
            for (name, daemon) in daemons {
                if let Some(status) = daemon.and_then(Daemon::exited) {
                    panic!("{name} exited ({status}):\n{}", self.log());
                }
            }
            if start.elapsed() > Duration::from_secs(60) {
                panic!("{what} not up within 60 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The cluster's `slurm.conf`.
    pub fn conf(&self) -> PathBuf {
        self.dir.path().join("slurm.conf")
    }

    /// The variables that point `sbatch`, `squeue`, `scontrol`, `scancel` and `sinfo` at it.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![("SLURM_CONF", self.conf().display().to_string())]
    }

    /// `squeue`'s lines for this cluster's jobs: `ID NAME STATE`.
    pub fn squeue(&self) -> String {
        let out = Command::new("squeue")
            .args(["-h", "-o", "%i %j %T"])
            .envs(self.env())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The daemons' logs (and what they printed before their logs were open).
    pub fn log(&self) -> String {
        let mut out = String::new();
        for name in [
            "munged.log",
            "slurmctld.out",
            "slurmctld.log",
            "slurmd.out",
            "slurmd.log",
        ] {
            let text = tail(&self.dir.path().join(name), 20_000);
            if !text.trim().is_empty() {
                out.push_str(&format!("==> {name} <==\n{text}\n"));
            }
        }
        out
    }
}

impl Drop for Slurm {
    /// Kills the daemons (everything in their sessions) and the job steps with their jobs:
    /// `slurmstepd`s run in sessions of their own, but with this cluster's `SLURM_CONF`, which
    /// jobs inherit too.
    fn drop(&mut self) {
        let sessions: Vec<i32> = [Some(&self.munged), self.slurmctld.as_ref(), self.slurmd.as_ref()]
            .into_iter()
            .flatten()
            .map(|d| d.pid)
            .collect();
        let marker = format!("SLURM_CONF={}", self.conf().display());
        sweep(&sessions, |var| var == marker.as_bytes());
    }
}
