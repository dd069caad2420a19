//! A real cluster for tests: an etcd server on a free loopback port with its
//! own data directory, and real `sluice-coordinator` and `sluice-worker`
//! processes (this package's `*-under-test` builds of them).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::{RunOutput, Sandbox, sluice_bin};

/// A free TCP port on 127.0.0.1 (free when this returns; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

fn sibling_bin(name: &str) -> PathBuf {
    let cli = sluice_bin();
    let bin = cli.with_file_name(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(bin.exists(), "{} is missing: `cargo test` builds it", bin.display());
    bin
}

/// The etcd binary: `$SLUICE_ETCD_BIN`, or `etcd` on the PATH (Debian's `etcd-server`).
fn etcd_bin() -> PathBuf {
    if let Ok(path) = std::env::var("SLUICE_ETCD_BIN") {
        return PathBuf::from(path);
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':').chain(["/usr/bin", "/usr/local/bin"]) {
        let candidate = PathBuf::from(dir).join("etcd");
        if candidate.exists() {
            return candidate;
        }
    }
    panic!(
        "etcd is not installed: the cluster tests need it (`apt-get install etcd-server`, or run tests/run.sh, which installs it)"
    );
}

/// An etcd server of our own. Killed on drop.
pub struct Etcd {
    child: Option<Child>,
    data: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    /// Plain-HTTP `/health` (and `/metrics`), whether or not clients use TLS.
    metrics_port: u16,
    /// Server certificate, key and the CA clients' certificates must chain to.
    tls: Option<(PathBuf, PathBuf, PathBuf)>,
}

impl Etcd {
    /// Starts etcd on free ports. A port can be taken between `free_port` and
    /// etcd's bind (the tests of a binary run in parallel), so an etcd that does
    /// not come up is started again on other ports, up to three times.
    pub fn start() -> Self {
        Self::start_with_tls(None)
    }

    /// Starts etcd serving clients over TLS with `certs`' server certificate
    /// and requiring client certificates signed by their CA (`--client-cert-auth`).
    pub fn start_tls(certs: &crate::tls::Certs) -> Self {
        Self::start_with_tls(Some((certs.server_cert.clone(), certs.server_key.clone(), certs.ca.clone())))
    }

    fn start_with_tls(tls: Option<(PathBuf, PathBuf, PathBuf)>) -> Self {
        for _ in 0..3 {
            let mut etcd = Self {
                child: None,
                data: tempfile::tempdir().expect("a data directory"),
                client_port: free_port(),
                peer_port: free_port(),
                metrics_port: free_port(),
                tls: tls.clone(),
            };
            etcd.spawn_child();
            if etcd.wait_healthy(Duration::from_secs(30)) {
                return etcd;
            }
        }
        panic!("etcd did not become healthy within 30 s, three times on different ports");
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    fn spawn(&mut self) {
        self.spawn_child();
        assert!(
            self.wait_healthy(Duration::from_secs(30)),
            "etcd did not become healthy on port {} within 30 s",
            self.client_port
        );
    }

    fn spawn_child(&mut self) {
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut command = Command::new(etcd_bin());
        command
            .args(["--name", "sluice-test", "--data-dir"])
            .arg(self.data.path().join("etcd"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("sluice-test={peer}")])
            .args(["--listen-metrics-urls", &format!("http://127.0.0.1:{}", self.metrics_port)])
            .args(["--log-level", "error", "--logger", "zap"]);
        if let Some((cert, key, ca)) = &self.tls {
            command.arg("--cert-file").arg(cert).arg("--key-file").arg(key);
            command.arg("--trusted-ca-file").arg(ca).arg("--client-cert-auth");
        }
        let child = command.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("etcd starts");
        self.child = Some(child);
    }

    /// Whether etcd answers healthy within `timeout`; `false` at once if it exited.
    fn wait_healthy(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.healthy() {
                return true;
            }
            if self.child.as_mut().is_none_or(|c| c.try_wait().is_ok_and(|status| status.is_some())) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.stop();
        false
    }

    fn healthy(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.metrics_port)) else { return false };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        if stream.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
            return false;
        }
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        response.contains("\"health\":\"true\"")
    }

    /// Kills etcd with SIGKILL (its data stays).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same ports and data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A running Sluice process whose stderr is collected.
pub struct Proc {
    pub name: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    fn spawn(name: &str, mut command: Command) -> Self {
        let mut child = command.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("the process starts");
        let stderr = child.stderr.take().expect("piped stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().expect("log lock").push(line);
            }
        });
        Self { name: name.to_string(), child, lines }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        self.lines.lock().expect("log lock").join("\n")
    }

    /// Waits until a stderr line contains `text`.
    pub fn wait_for(&self, text: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.lines.lock().expect("log lock").iter().any(|l| l.contains(text)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{} did not log `{text}` within {timeout:?}; its log:\n{}", self.name, self.log());
    }

    pub fn logged(&self, text: &str) -> bool {
        self.lines.lock().expect("log lock").iter().any(|l| l.contains(text))
    }

    pub fn kill_hard(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends a signal by name (`STOP`, `CONT`, `TERM`) with the `kill` command.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").arg(format!("-{signal}")).arg(self.pid().to_string()).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{signal} {}", self.pid());
    }

    /// Waits for the process to exit (after SIGTERM, say).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{} did not exit within {timeout:?}", self.name);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-CONT").arg(self.child.id().to_string()).stderr(Stdio::null()).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// etcd plus coordinators and workers, sharing one namespace; the CLI pointed at
/// every coordinator.
pub struct Cluster {
    pub etcd: Etcd,
    pub namespace: String,
    pub lease_ttl: String,
    /// Arguments every coordinator and worker gets (etcd TLS and credentials).
    pub common_args: Vec<String>,
    pub coordinators: Vec<Proc>,
    pub coordinator_urls: Vec<String>,
    pub workers: Vec<Proc>,
}

impl Cluster {
    pub fn new(lease_ttl: &str) -> Self {
        Self::with_etcd(Etcd::start(), lease_ttl)
    }

    pub fn with_etcd(etcd: Etcd, lease_ttl: &str) -> Self {
        Self {
            etcd,
            namespace: format!("test-{}", std::process::id()),
            lease_ttl: lease_ttl.to_string(),
            common_args: Vec::new(),
            coordinators: Vec::new(),
            coordinator_urls: Vec::new(),
            workers: Vec::new(),
        }
    }

    /// Starts a coordinator with `failpoints` (`SLUICE_FAILPOINTS`, may be empty); returns its index.
    pub fn start_coordinator(&mut self, failpoints: &str) -> usize {
        self.start_coordinator_with(failpoints, &[])
    }

    /// Starts a coordinator with extra command-line arguments.
    pub fn start_coordinator_with(&mut self, failpoints: &str, extra: &[&str]) -> usize {
        let port = free_port();
        let index = self.coordinators.len();
        let mut command = Command::new(sibling_bin("sluice-coordinator-under-test"));
        command
            .args(extra)
            .args(&self.common_args)
            .args(["--etcd", &self.etcd.endpoint(), "--namespace", &self.namespace])
            .args(["--listen", &format!("127.0.0.1:{port}"), "--lease-ttl", &self.lease_ttl])
            .args(["--id", &format!("coordinator-{index}")])
            // Its Ballista scheduler on a free loopback port (tests run side by side).
            .args(["--ballista-listen", "127.0.0.1:0"])
            .env("SLUICE_LOG", "info,sluice_coordinator=debug")
            .env("SLUICE_FAILPOINTS", failpoints);
        self.coordinators.push(Proc::spawn(&format!("coordinator-{index}"), command));
        let scheme = if extra.contains(&"--tls-cert") { "https" } else { "http" };
        self.coordinator_urls.push(format!("{scheme}://127.0.0.1:{port}"));
        self.wait_serving(&self.coordinator_urls[index].clone());
        index
    }

    fn wait_serving(&self, url: &str) {
        let port: u16 = url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("a port");
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("no coordinator listening at {url}");
    }

    /// Starts a worker with `slots` slots and `failpoints`; returns its index.
    pub fn start_worker(&mut self, slots: usize, failpoints: &str) -> usize {
        self.start_worker_with(slots, failpoints, &[])
    }

    /// Starts a worker with extra command-line arguments.
    pub fn start_worker_with(&mut self, slots: usize, failpoints: &str, extra: &[&str]) -> usize {
        let index = self.workers.len();
        let mut command = self.worker_command(slots, index);
        command.args(extra).env("SLUICE_FAILPOINTS", failpoints);
        let worker = Proc::spawn(&format!("worker-{index}"), command);
        worker.wait_for("worker registered", Duration::from_secs(60));
        self.workers.push(worker);
        index
    }

    /// The command that starts worker `index` (not started).
    pub fn worker_command(&self, slots: usize, index: usize) -> Command {
        let mut command = Command::new(sibling_bin("sluice-worker-under-test"));
        command
            .args(&self.common_args)
            .args(["--etcd", &self.etcd.endpoint(), "--namespace", &self.namespace])
            .args(["--slots", &slots.to_string(), "--lease-ttl", &self.lease_ttl])
            .args(["--id", &format!("worker-{index}")])
            .args(["--ballista-listen", "127.0.0.1:0"])
            .env("SLUICE_LOG", "info");
        command
    }

    /// Runs the `sluice` CLI in `sandbox` against this cluster's coordinators.
    pub fn cli(&self, sandbox: &Sandbox, args: &[&str]) -> RunOutput {
        let output: Output = sandbox
            .command(args)
            .env("SLUICE_COORDINATOR", self.coordinator_urls.join(","))
            .output()
            .expect("sluice starts");
        output.into()
    }

    /// `sluice status NAME --json`, parsed.
    pub fn status(&self, sandbox: &Sandbox, name: &str) -> serde_json::Value {
        let output = self.cli(sandbox, &["status", name, "--json"]);
        assert_eq!(output.code, Some(0), "sluice status failed: {output:?}");
        serde_json::from_str(output.stdout.trim()).unwrap_or_else(|e| panic!("status is not JSON ({e}): {output:?}"))
    }

    /// Polls the status until its state is `state`; returns that status.
    pub fn wait_for_state(&self, sandbox: &Sandbox, name: &str, state: &str, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        let mut last = serde_json::Value::Null;
        while Instant::now() < deadline {
            let output = self.cli(sandbox, &["status", name, "--json"]);
            if output.code == Some(0)
                && let Ok(status) = serde_json::from_str::<serde_json::Value>(output.stdout.trim())
            {
                if status["state"] == state {
                    return status;
                }
                assert_ne!(status["state"], "failed", "the pipeline failed: {status:#}\n{}", self.logs());
                last = status;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!(
            "pipeline {name} did not reach state {state} within {timeout:?}; last status: {last:#}\n{}",
            self.logs()
        );
    }

    /// Every process's log, for failure messages.
    pub fn logs(&self) -> String {
        self.coordinators
            .iter()
            .chain(&self.workers)
            .map(|p| format!("----- {} -----\n{}", p.name, p.log()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The gRPC health status (`grpc.health.v1`, service "") served at `url`, or
/// `None` if nothing answers.
pub fn health(url: &str) -> Option<&'static str> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    runtime.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(url.to_string()).ok()?.connect().await.ok()?;
        let mut client = HealthClient::new(channel);
        let response = client.check(HealthCheckRequest { service: String::new() }).await.ok()?;
        Some(match response.into_inner().status {
            1 => "SERVING",
            2 => "NOT_SERVING",
            _ => "UNKNOWN",
        })
    })
}

/// Waits until `health(url)` is `expected`.
pub fn wait_for_health(url: &str, expected: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    while Instant::now() < deadline {
        last = health(url);
        if last == Some(expected) {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{url} did not report {expected} within {timeout:?} (last: {last:?})");
}

/// The services listed by gRPC server reflection at `url`.
pub fn reflected_services(url: &str) -> Vec<String> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    runtime.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(url.to_string())
            .expect("a URL")
            .connect()
            .await
            .expect("connect for reflection");
        let mut client = ServerReflectionClient::new(channel);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses =
            client.server_reflection_info(futures::stream::iter([request])).await.expect("reflection").into_inner();
        let response = responses.message().await.expect("a reflection response").expect("one response");
        match response.message_response {
            Some(MessageResponse::ListServicesResponse(list)) => list.service.into_iter().map(|s| s.name).collect(),
            other => panic!("unexpected reflection response {other:?}"),
        }
    })
}
