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
    /// Balances over `upstreams` (host:port). A request that fails on one replica (connection
    /// refused or reset, a 502/503/504) goes to the next, POSTs included: a prediction has no
    /// side effect a retry could repeat harmfully, and a training is refused (409) by the
    /// database if it already started.
    pub fn start(upstreams: &[&str]) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        // nginx's workers run as `nobody` when the tests run as root: let them reach their
        // temp directories.
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let port = super::free_port();
        let servers: String = upstreams
            .iter()
            .map(|u| format!("    server {u} max_fails=1 fail_timeout=2s;\n"))
            .collect();
        let d = dir.path().display();
        let conf = format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
               upstream sentiflow {{\n{servers}    keepalive 16;\n  }}\n\
               server {{\n    listen 127.0.0.1:{port};\n    location / {{\n\
                   proxy_pass http://sentiflow;\n      proxy_http_version 1.1;\n\
                   proxy_set_header Connection \"\";\n      proxy_connect_timeout 1s;\n\
                   proxy_next_upstream error timeout http_502 http_503 http_504 non_idempotent;\n\
                   proxy_next_upstream_tries 3;\n    }}\n  }}\n}}\n"
        );
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
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
