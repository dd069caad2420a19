//! `sluice-coordinator`: serves the gRPC API, campaigns for leadership, and
//! while leading runs every submitted pipeline.
//!
//! The health service (`grpc.health.v1`) reports `SERVING` while etcd answers
//! and `NOT_SERVING` while it does not; server reflection is on, so `grpcurl`
//! works without the .proto files. SIGTERM or Ctrl-C resigns leadership at once
//! (a standby takes over without waiting for the lease to expire) and exits.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use sluice_proto::pb::v1::FILE_DESCRIPTOR_SET;
use sluice_proto::pb::v1::sluice_server::SluiceServer;
use sluice_worker::cluster_cli::{ClusterArgs, report_health};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::leader::Leadership;
use super::manager::Manager;
use super::server::SluiceService;

#[derive(Debug, Parser)]
#[command(
    name = "sluice-coordinator",
    version,
    about = "The Sluice coordinator: gRPC API, leader election, pipeline runs."
)]
pub struct CoordinatorArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Address the gRPC API listens on.
    #[arg(long, env = "SLUICE_LISTEN", default_value = "0.0.0.0:7070")]
    pub listen: SocketAddr,
    /// The address clients should dial, shown in status and to standbys' callers;
    /// `http://<listen>` by default.
    #[arg(long, env = "SLUICE_ADVERTISE")]
    pub advertise: Option<String>,
    /// This coordinator's id; host name and process id by default.
    #[arg(long, env = "SLUICE_COORDINATOR_ID")]
    pub id: Option<String>,
    /// Require `authorization: Bearer <token>` on the Sluice API, the token being
    /// this file's content (read again when it changes, so it can be rotated).
    /// Health checking and reflection stay open, for probes.
    #[arg(long, env = "SLUICE_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<std::path::PathBuf>,
    /// Only pipelines whose every location starts with one of these prefixes
    /// (comma-separated, e.g. `s3://lake/,s3://landing/`) are accepted; any by default.
    #[arg(long, env = "SLUICE_ALLOWED_LOCATIONS", value_delimiter = ',')]
    pub allowed_locations: Vec<String>,
    #[command(flatten)]
    pub tls: sluice_worker::tls::ServerTlsArgs,
    /// Also serve gRPC health checking alone, without TLS, on this address: for
    /// Kubernetes' gRPC probes, which cannot speak TLS, when the API does.
    #[arg(long, env = "SLUICE_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,
    /// Where this coordinator's Ballista scheduler listens (gRPC). The
    /// leader's runs the cluster's shuffle stages; every worker's executor
    /// polls it. Port 0 picks a free one.
    #[arg(long, env = "SLUICE_BALLISTA_LISTEN", default_value = "0.0.0.0:50050")]
    pub ballista_listen: SocketAddr,
    /// The host workers reach the scheduler at (in Kubernetes, the pod's IP);
    /// the listen address when it names one, else the host of `--advertise`.
    #[arg(long, env = "SLUICE_BALLISTA_ADVERTISE")]
    pub ballista_advertise: Option<String>,
    /// Run no Ballista scheduler: every transform then runs locally in a worker.
    #[arg(long, env = "SLUICE_NO_BALLISTA")]
    pub no_ballista: bool,
}

/// The host the scheduler is advertised at by default: its listen address
/// when that names one, else the host of the API's advertised address.
fn ballista_host(args: &CoordinatorArgs, advertise: &str) -> String {
    let ip = args.ballista_listen.ip();
    if !ip.is_unspecified() {
        return ip.to_string();
    }
    url::Url::parse(advertise)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .filter(|h| h != "0.0.0.0" && h != "[::]")
        .unwrap_or_else(|| "localhost".to_string())
}

pub fn main() -> ExitCode {
    sluice_worker::allocator::keep_freed_memory();
    let args = CoordinatorArgs::parse();
    sluice_worker::cluster_cli::init_tracing(&args.cluster.log, args.cluster.log_format == "json");
    let runtime =
        match tokio::runtime::Builder::new_multi_thread().thread_name("sluice-coordinator").enable_all().build() {
            Ok(runtime) => runtime,
            Err(e) => {
                eprintln!("error: cannot start the runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
    runtime.block_on(run(args))
}

async fn run(args: CoordinatorArgs) -> ExitCode {
    let shutdown = CancellationToken::new();
    sluice_worker::cluster_cli::spawn_signal_handler(shutdown.clone());
    let id = args.id.clone().unwrap_or_else(sluice_worker::cluster_cli::default_worker_id);
    let tls = match args.tls.load() {
        Ok(tls) => tls,
        Err(e) => {
            eprintln!("error: --tls-cert: {e}");
            return ExitCode::FAILURE;
        }
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let advertise = args.advertise.clone().unwrap_or_else(|| format!("{scheme}://{}", args.listen));
    let (keys, timings) = (args.cluster.keys(), args.cluster.timings());

    if let Some(address) = args.cluster.metrics_listen
        && let Err(e) = sluice_worker::telemetry::serve_metrics(address)
    {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let kv = match sluice_worker::cluster_cli::connect_etcd(&args.cluster, &shutdown).await {
        Ok(Some(kv)) => kv,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    let reflection = match tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
    {
        Ok(reflection) => reflection,
        Err(e) => {
            error!(%e, "cannot build the reflection service");
            return ExitCode::FAILURE;
        }
    };
    let listener = match sluice_worker::cluster_cli::bind(args.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    info!(%id, listen = %args.listen, tls = tls.is_some(), advertise, etcd = %args.cluster.etcd.join(","), namespace = %args.cluster.namespace, "sluice-coordinator starting");
    let policy = super::server::SubmitPolicy { allowed_locations: args.allowed_locations.clone() };
    let service = SluiceServer::new(SluiceService::new(kv.clone(), keys.clone()).with_policy(policy));
    let service = tonic::service::interceptor::InterceptedService::new(
        service,
        super::auth::BearerToken::new(args.auth_token_file.clone()),
    );
    if let Some(address) = args.health_listen {
        let listener = match sluice_worker::cluster_cli::bind(address).await {
            Ok(listener) => listener,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        let router = tonic::transport::Server::builder().add_service(health_service.clone());
        sluice_worker::tls::serve(router, listener, None, shutdown.clone());
    }
    let router =
        tonic::transport::Server::builder().add_service(health_service).add_service(reflection).add_service(service);
    let server = sluice_worker::tls::serve(router, listener, tls, shutdown.clone());
    // The API is SERVING only while etcd answers.
    let (health_kv, leader_key, health_stop) = (kv.clone(), keys.leader(), shutdown.clone());
    tokio::spawn(async move {
        let check = || async { health_kv.get(&leader_key).await.is_ok() };
        let services = ["", "sluice.v1.Sluice"];
        report_health(health, &services, Duration::from_secs(2), "etcd is unreachable", health_stop, check).await;
    });

    let scheduler = if args.no_ballista {
        None
    } else {
        let host = args.ballista_advertise.clone().unwrap_or_else(|| ballista_host(&args, &advertise));
        match super::scheduler::start(args.ballista_listen, &host, &id).await {
            Ok(scheduler) => Some(scheduler.address),
            Err(e) => {
                eprintln!("error: {e} (or run without one: --no-ballista)");
                return ExitCode::FAILURE;
            }
        }
    };
    while !shutdown.is_cancelled() {
        let Some(leadership) =
            Leadership::campaign(kv.clone(), &keys, &id, &advertise, scheduler.as_deref(), timings, &shutdown).await
        else {
            break;
        };
        let leadership = Arc::new(leadership);
        metrics::gauge!(sluice_worker::telemetry::LEADER).set(1.0);
        let manager = Manager::new(kv.clone(), keys.clone(), timings, leadership.clone(), scheduler.clone());
        let lead = tokio::spawn(manager.lead());
        let lost = leadership.lost();
        tokio::select! {
            _ = shutdown.cancelled() => {
                leadership.resign().await;
                info!("resigned leadership");
            }
            _ = lost.cancelled() => {
                // Revoke the lease in case etcd still counts it (we could not reach it
                // for a TTL), so that whoever campaigns next does not wait for it.
                leadership.resign().await;
                metrics::counter!(sluice_worker::telemetry::LEASE_LOSSES, "role" => "coordinator").increment(1);
                warn!("lost leadership; campaigning again");
            }
        }
        let _ = lead.await;
        metrics::gauge!(sluice_worker::telemetry::LEADER).set(0.0);
    }
    let _ = server.await;
    info!("sluice-coordinator stopped");
    ExitCode::SUCCESS
}
