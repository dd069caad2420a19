//! `sluice-worker`: joins a cluster through etcd and runs tasks until stopped.
//!
//! SIGTERM or Ctrl-C drains it: it stops claiming tasks, lets the running ones
//! finish for up to `--drain-timeout`, then abandons the rest and revokes its
//! lease, so their claims vanish at once and other workers take the tasks over
//! without waiting for the lease to expire.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use sluice_proto::etcd::{EtcdKv, EtcdOptions, EtcdUser};
use sluice_proto::keys::Keys;
use sluice_proto::kv::KvStore;
use sluice_proto::timing::LeaseTimings;
use sluice_proto::tls::ClientTlsFiles;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::worker_loop::{WorkerOptions, run_worker};

/// The flags every cluster process shares (`sluice-coordinator` has them too).
#[derive(Debug, clap::Args)]
pub struct ClusterArgs {
    /// etcd endpoints, comma-separated.
    #[arg(
        long = "etcd",
        env = "SLUICE_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd: Vec<String>,
    /// Key prefix in etcd, so that several clusters can share one etcd.
    #[arg(long, env = "SLUICE_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// How long this process's lease (a worker's registration and claims, a
    /// coordinator's leadership) outlives its last keep-alive; keep-alives go
    /// every third of it, and a dead process's part is taken over within it.
    #[arg(long, env = "SLUICE_LEASE_TTL", value_parser = humantime::parse_duration, default_value = "10s")]
    pub lease_ttl: Duration,
    /// Log filter (tracing syntax).
    #[arg(long, env = "SLUICE_LOG", default_value = "info")]
    pub log: String,
    /// Log line format: `text`, or `json` (one object per line, with the spans:
    /// pipeline, flow, batch, task, worker).
    #[arg(long, env = "SLUICE_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    /// Serve Prometheus metrics (`GET /metrics`) on this address.
    #[arg(long, env = "SLUICE_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The CA that signed etcd's server certificate (PEM), for `https://`
    /// endpoints; the system's roots when not given.
    #[arg(long, env = "SLUICE_ETCD_CA_CERT")]
    pub etcd_ca_cert: Option<PathBuf>,
    /// A client certificate (PEM) for an etcd that requires one (`--client-cert-auth`).
    #[arg(long, env = "SLUICE_ETCD_CERT", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// The private key of `--etcd-cert` (PEM).
    #[arg(long, env = "SLUICE_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// etcd user name, for an etcd with authentication enabled.
    #[arg(long, env = "SLUICE_ETCD_USER", requires = "etcd_password")]
    pub etcd_user: Option<String>,
    /// That user's password; prefer the environment variable (from a Secret)
    /// to the flag, which other users of the machine can see.
    #[arg(long, env = "SLUICE_ETCD_PASSWORD", hide_env_values = true, requires = "etcd_user")]
    pub etcd_password: Option<String>,
}

impl ClusterArgs {
    pub fn keys(&self) -> Keys {
        Keys::new(&self.namespace)
    }

    pub fn timings(&self) -> LeaseTimings {
        LeaseTimings { ttl: self.lease_ttl }
    }

    pub fn etcd_options(&self) -> EtcdOptions {
        let mut options = EtcdOptions::new(self.etcd.clone());
        options.tls =
            ClientTlsFiles { ca: self.etcd_ca_cert.clone(), cert: self.etcd_cert.clone(), key: self.etcd_key.clone() };
        if let (Some(name), Some(password)) = (&self.etcd_user, &self.etcd_password) {
            options.user = Some(EtcdUser { name: name.clone(), password: password.clone() });
        }
        options
    }
}

#[derive(Debug, Parser)]
#[command(name = "sluice-worker", version, about = "A Sluice worker: claims tasks through etcd and writes data files.")]
pub struct WorkerArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Concurrent tasks; the number of cores by default.
    #[arg(long, env = "SLUICE_SLOTS")]
    pub slots: Option<usize>,
    /// This worker's id; host name, process id and a random suffix by default.
    #[arg(long, env = "SLUICE_WORKER_ID")]
    pub id: Option<String>,
    /// Serve gRPC health checking (`grpc.health.v1`) on this address: `SERVING`
    /// while the worker is registered in etcd under a live lease, `NOT_SERVING`
    /// otherwise (etcd unreachable, lease lost and not yet registered again).
    #[arg(long, env = "SLUICE_HEALTH_LISTEN")]
    pub health_listen: Option<std::net::SocketAddr>,
    /// On SIGTERM, how long running tasks may take to finish before they are
    /// handed to other workers (keep it under the pod's termination grace period).
    #[arg(long, env = "SLUICE_DRAIN_TIMEOUT", value_parser = humantime::parse_duration, default_value = "30s")]
    pub drain_timeout: Duration,
    /// Where this worker's Ballista executor serves shuffle reads (Arrow
    /// Flight) to the other executors and workers; port 0 picks a free one.
    #[arg(long, env = "SLUICE_BALLISTA_LISTEN", default_value = "0.0.0.0:50051")]
    pub ballista_listen: std::net::SocketAddr,
    /// The host the others reach this executor at (in Kubernetes, the pod's
    /// IP); the listen address when it names one, else the host name.
    #[arg(long, env = "SLUICE_BALLISTA_ADVERTISE")]
    pub ballista_advertise: Option<String>,
    /// Run no Ballista executor: this worker then takes no part in shuffle stages.
    #[arg(long, env = "SLUICE_NO_BALLISTA")]
    pub no_ballista: bool,
}

/// One runtime thread per slot, as in the embedded runtime: a slot's reader and
/// its encoder overlap on the threads of the other slots.
pub fn main() -> ExitCode {
    crate::allocator::keep_freed_memory();
    let args = WorkerArgs::parse();
    init_tracing(&args.cluster.log, args.cluster.log_format == "json");
    let slots = args.slots.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(slots)
        .thread_name("sluice-worker")
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(args, slots))
}

async fn run(args: WorkerArgs, slots: usize) -> ExitCode {
    let id = args.id.clone().unwrap_or_else(default_worker_id);
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());
    let cluster = &args.cluster;
    if let Some(address) = cluster.metrics_listen
        && let Err(e) = crate::telemetry::serve_metrics(address)
    {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let kv = match connect_etcd(cluster, &shutdown).await {
        Ok(Some(kv)) => kv,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    info!(worker = %id, slots, etcd = %cluster.etcd.join(","), namespace = %cluster.namespace, "sluice-worker starting");
    let (timings, keys) = (cluster.timings(), cluster.keys());
    if let Some(address) = args.health_listen {
        let listener = match bind(address).await {
            Ok(listener) => listener,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        let (reporter, service) = tonic_health::server::health_reporter();
        let stop_health = shutdown.clone();
        crate::tls::serve(tonic::transport::Server::builder().add_service(service), listener, None, shutdown.clone());
        // SERVING while this worker's registration key exists (etcd answers, the lease lives).
        let (kv, registration) = (kv.clone(), keys.worker(&id));
        tokio::spawn(async move {
            let check = || async { kv.get(&registration).await.is_ok_and(|v| v.is_some()) };
            let down = "this worker's registration is gone or etcd is unreachable";
            report_health(reporter, &[""], Duration::from_secs(1), down, stop_health, check).await;
        });
    }
    let executor = (!args.no_ballista).then(|| {
        let advertise_host = args.ballista_advertise.clone().unwrap_or_else(|| {
            let ip = args.ballista_listen.ip();
            if ip.is_unspecified() { host_name() } else { ip.to_string() }
        });
        let options = crate::ballista::executor::ExecutorOptions {
            id: id.clone(),
            listen: args.ballista_listen,
            advertise_host,
            vcores: slots,
        };
        tokio::spawn(crate::ballista::executor::follow_scheduler(kv.clone(), keys.clone(), options, shutdown.clone()))
    });
    let options = WorkerOptions { id, slots, timings, drain_timeout: args.drain_timeout, executor: executor.is_some() };
    run_worker(kv, keys, options, shutdown).await;
    if let Some(executor) = executor {
        executor.abort();
    }
    info!("sluice-worker stopped");
    ExitCode::SUCCESS
}

/// Connects to etcd, retrying with backoff until it answers; `Ok(None)` if
/// shut down first, `Err` for settings that cannot work (reported and exit).
pub async fn connect_etcd(
    args: &ClusterArgs,
    shutdown: &CancellationToken,
) -> Result<Option<Arc<dyn KvStore>>, String> {
    let options = args.etcd_options();
    tokio::select! {
        _ = shutdown.cancelled() => Ok(None),
        kv = EtcdKv::connect_with_retry(&options) => Ok(Some(Arc::new(kv?))),
    }
}

/// This machine's host name, or `localhost`.
fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_string())
}

pub fn default_worker_id() -> String {
    let host = host_name();
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &suffix[..6])
}

pub fn init_tracing(filter: &str, json: bool) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().with_current_span(true).with_span_list(true).init();
    } else {
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }
}

/// Cancels `shutdown` on SIGTERM or Ctrl-C.
pub fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut term) = signal(SignalKind::terminate()) else { return };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        info!("shutting down");
        shutdown.cancel();
    });
}

/// Keeps `services` SERVING while `check` passes and NOT_SERVING while it
/// fails (or takes over 3 s), checking every `interval`, until `shutdown`.
/// `down` says, in the log, what a failing check means.
pub async fn report_health<F, Fut>(
    reporter: tonic_health::server::HealthReporter,
    services: &[&str],
    interval: Duration,
    down: &str,
    shutdown: CancellationToken,
    mut check: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut serving = None;
    while !shutdown.is_cancelled() {
        let ok = tokio::time::timeout(Duration::from_secs(3), check()).await.unwrap_or(false);
        if serving != Some(ok) {
            let status = if ok {
                tonic_health::ServingStatus::Serving
            } else {
                warn!("{down}: reporting NOT_SERVING until the check passes again");
                tonic_health::ServingStatus::NotServing
            };
            for service in services {
                reporter.set_service_status(service, status).await;
            }
            serving = Some(ok);
        }
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// Listens on `address`; the error says where it could not.
pub async fn bind(address: std::net::SocketAddr) -> Result<tokio::net::TcpListener, String> {
    tokio::net::TcpListener::bind(address).await.map_err(|e| format!("cannot listen on {address}: {e}"))
}

/// The connections a listener accepts, as a stream for tonic's `serve_with_incoming_shutdown`.
pub fn incoming(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        Some((accepted, listener))
    })
}
