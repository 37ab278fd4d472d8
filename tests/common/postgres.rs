//! A throw-away PostgreSQL cluster for the tests: Debian's server binaries, started once per test
//! binary on a free port, as the `postgres` user when the tests run as root (`initdb` refuses
//! root), and stopped when the test binary exits. Each caller gets a database of its own. A test
//! that stops the server starts a cluster of its own ([`Cluster::start`]).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub struct Cluster {
    port: u16,
    data: PathBuf,
}

/// The directory of PostgreSQL's server programs: `$SENTIFLOW_PG_BIN`, else the newest
/// `/usr/lib/postgresql/*/bin` (Debian's layout).
fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("SENTIFLOW_PG_BIN") {
        return dir.into();
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL's server is not installed: apt-get install postgresql, or set SENTIFLOW_PG_BIN")
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("postgres").is_file())
        .collect();
    versions.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
    });
    versions.pop().expect("no /usr/lib/postgresql/*/bin/postgres")
}

/// The uid and gid to run the server as: `postgres`'s when we are root, else our own.
fn server_user() -> Option<(u32, u32)> {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        return None;
    }
    let out = Command::new("id").args(["-u", "postgres"]).output().unwrap();
    let uid = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("no `postgres` user");
    let out = Command::new("id").args(["-g", "postgres"]).output().unwrap();
    let gid = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    Some((uid, gid))
}

/// `program` run as the server's user; with `tied`, it is stopped when this process exits.
fn as_server_user(program: &Path, tied: bool) -> Command {
    let mut cmd = Command::new(program);
    let user = server_user();
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some((uid, gid)) = user {
                if libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // After the change of user, which would clear it.
            if tied {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            }
            Ok(())
        });
    }
    cmd
}

impl Cluster {
    /// A cluster of the caller's own, stopped when the test binary exits (or by [`Cluster::stop`]).
    pub fn start() -> Cluster {
        start()
    }

    /// The URL of a new, empty database on this cluster.
    pub fn database(&self) -> String {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!("t{}_{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst));
        let mut admin = postgres::Client::connect(&url_of(self.port, "postgres"), postgres::NoTls).unwrap();
        admin.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
        url_of(self.port, &name)
    }

    /// Stops the server as an operator would (`pg_ctl stop`, fast mode: clients are cut off).
    pub fn stop(&self) {
        let out = as_server_user(&bin_dir().join("pg_ctl"), false)
            .args(["stop", "-m", "fast", "-w", "-D"])
            .arg(&self.data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn start() -> Cluster {
    let bin = bin_dir();
    let dir = tempfile::Builder::new()
        .prefix("sentiflow-pg")
        .tempdir()
        .unwrap()
        .keep();
    let (data, sockets) = (dir.join("data"), dir.join("run"));
    std::fs::create_dir_all(&sockets).unwrap();
    if let Some((uid, gid)) = server_user() {
        for d in [&dir, &sockets] {
            std::os::unix::fs::chown(d, Some(uid), Some(gid)).unwrap();
        }
    }
    let out = as_server_user(&bin.join("initdb"), false)
        .args([
            "--auth=trust",
            "--username=postgres",
            "--encoding=UTF8",
            "--no-sync",
            "-D",
        ])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
    let port = super::free_port();
    // The postmaster is spawned by a thread that lives as long as the process, since the
    // parent-death signal follows the spawning thread, not the process.
    let (tx, rx) = std::sync::mpsc::channel();
    let log = dir.join("server.log");
    let data_dir = data.clone();
    std::thread::spawn(move || {
        let child = as_server_user(&bin.join("postgres"), true)
            .arg("-D")
            .arg(&data)
            .args([
                "-p",
                &port.to_string(),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
            ])
            .args(["-c", "max_connections=300", "-k"])
            .arg(&sockets)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::process::Stdio::null())
            .spawn();
        tx.send(child.map(|_| ())).unwrap();
        loop {
            std::thread::park();
        }
    });
    rx.recv().unwrap().expect("starting postgres");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match postgres::Client::connect(&url_of(port, "postgres"), postgres::NoTls) {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!(
                "PostgreSQL did not start: {e}; see {}",
                dir.join("server.log").display()
            ),
        }
    }
    Cluster { port, data: data_dir }
}

fn url_of(port: u16, db: &str) -> String {
    format!("postgres://postgres@127.0.0.1:{port}/{db}")
}

/// The URL of a new, empty database on the tests' cluster.
pub fn database() -> String {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(start).database()
}

/// Whether the tests run on PostgreSQL (`SENTIFLOW_TEST_DB=postgres`) rather than SQLite.
pub fn selected() -> bool {
    std::env::var("SENTIFLOW_TEST_DB").is_ok_and(|v| v == "postgres")
}
