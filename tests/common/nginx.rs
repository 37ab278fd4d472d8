//! A real load balancer for the replica tests: Debian's nginx in front of some servers, on a free
//! port, with a configuration of its own (nothing of the machine's), stopped when dropped.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub struct Nginx {
    child: Child,
    dir: tempfile::TempDir,
    pub addr: String,
}

/// `nginx`: `$SENTIFLOW_NGINX`, else Debian's.
fn nginx() -> PathBuf {
    std::env::var_os("SENTIFLOW_NGINX")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/usr/sbin/nginx".into())
}

impl Nginx {
    /// `container/nginx.conf`, the configuration users get, with the two replicas of its
    /// upstream replaced by `replicas` and its files kept in a temporary directory.
    pub fn start(replicas: [&str; 2]) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        // nginx's workers run as `nobody` when the tests run as root: let them reach their
        // temp directories.
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let port = super::free_port();
        let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/container/nginx.conf");
        let mut conf = std::fs::read_to_string(shipped).unwrap();
        let d = dir.path().display();
        for (from, to) in [
            ("server sentiflow-a:8080", format!("server {}", replicas[0])),
            ("server sentiflow-b:8080", format!("server {}", replicas[1])),
            ("listen 80;", format!("listen 127.0.0.1:{port};")),
            (
                "http {",
                format!(
                    "http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
                     fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;"
                ),
            ),
        ] {
            assert!(conf.contains(from), "{shipped} has no `{from}`");
            conf = conf.replacen(from, &to, 1);
        }
        let conf = format!("daemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n{conf}");
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let child = Command::new(nginx())
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&path)
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e} (apt-get install nginx-light)", nginx().display()));
        let addr = format!("127.0.0.1:{port}");
        let start = Instant::now();
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "nginx did not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Nginx { child, dir, addr }
    }

    /// nginx's error log: which upstreams failed and why.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM, not SIGKILL: the master stops its workers, which would otherwise outlive it
        // (holding whatever the test's parent left open, such as a build lock).
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}
