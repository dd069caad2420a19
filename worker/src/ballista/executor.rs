//! The Ballista executor every worker process runs, for the scheduler of the
//! leader coordinator.
//!
//! The leader publishes its scheduler's address in the leader key
//! ([`LeaderValue::ballista`]). This loop follows that key: when the address
//! appears or changes (a new leader), the executor is stopped and started
//! again for the new scheduler. The executor has the worker's id, so the
//! leader can tell its scheduler at once when the worker's lease is gone.
//!
//! Written from Ballista's parts (`Executor`, its poll loop and Flight
//! service) rather than `start_executor_process`, which owns the process's
//! signals and cannot be stopped and started again for another scheduler.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arrow_flight::flight_service_server::FlightServiceServer;
use ballista_core::registry::BallistaFunctionRegistry;
use ballista_core::serde::protobuf::ExecutorRegistration;
use ballista_core::serde::protobuf::scheduler_grpc_client::SchedulerGrpcClient;
use ballista_core::serde::scheduler::{ExecutorOperatingSystemSpecification, ExecutorSpecification};
use ballista_core::serde::{BallistaCodec, BallistaLogicalExtensionCodec};
use ballista_core::utils::{GrpcServerConfig, create_grpc_server, default_config_producer};
use ballista_core::{BALLISTA_PROTOCOL_VERSION, ConfigProducer, RuntimeProducer};
use ballista_executor::executor::Executor;
use ballista_executor::flight_service::BallistaFlightService;
use ballista_executor::metrics::LoggingMetricsCollector;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion_proto::protobuf::{LogicalPlanNode, PhysicalPlanNode};
use sluice_proto::keys::Keys;
use sluice_proto::kv::KvStore;
use sluice_proto::registry::LeaderValue;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::scan::physical_codec;

/// Where and as what this worker's executor runs.
#[derive(Debug, Clone)]
pub struct ExecutorOptions {
    /// The worker's id; the executor registers under it.
    pub id: String,
    /// Where its Arrow Flight service (shuffle reads) listens; port 0 picks one.
    pub listen: SocketAddr,
    /// The host other executors and workers reach it at.
    pub advertise_host: String,
    /// Tasks it runs at once.
    pub vcores: usize,
}

/// A running executor: its poll loop and its Flight server.
struct Running {
    scheduler: String,
    tasks: Vec<JoinHandle<()>>,
    work_dir: PathBuf,
}

impl Running {
    fn stop(self) {
        for task in self.tasks {
            task.abort();
        }
        let _ = std::fs::remove_dir_all(&self.work_dir);
    }
}

/// Runs an executor for the current leader's scheduler until `cancel`.
pub async fn follow_scheduler(kv: Arc<dyn KvStore>, keys: Keys, options: ExecutorOptions, cancel: CancellationToken) {
    let mut running: Option<Running> = None;
    let key = keys.leader();
    while !cancel.is_cancelled() {
        let (scheduler, revision) = match kv.list(&key).await {
            Ok(listing) => {
                let leader = listing.entries.iter().find(|(k, _)| *k == key).and_then(|(_, v)| LeaderValue::decode(v));
                (leader.and_then(|l| l.ballista), listing.revision)
            }
            Err(error) => {
                warn!(%error, "cannot read the leader key; the Ballista executor keeps its scheduler");
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        let current = running.as_ref().map(|r| r.scheduler.clone());
        let stopped = running.as_ref().is_some_and(|r| r.tasks.iter().any(JoinHandle::is_finished));
        if current != scheduler || stopped {
            if let Some(old) = running.take() {
                info!(scheduler = old.scheduler, "stopping the Ballista executor");
                old.stop();
            }
            if let Some(address) = scheduler {
                match start(&options, &address).await {
                    Ok(started) => running = Some(started),
                    Err(error) => {
                        warn!(%error, scheduler = address, "cannot start the Ballista executor; trying again")
                    }
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = kv.wait_for_change(&key, revision, Duration::from_secs(2)) => {}
        }
    }
    if let Some(old) = running.take() {
        old.stop();
    }
}

async fn start(options: &ExecutorOptions, scheduler: &str) -> Result<Running, String> {
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|e| format!("cannot listen on {} for Ballista's shuffle reads: {e}", options.listen))?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let work_dir = std::env::temp_dir().join(format!("sluice-ballista-{}-{port}", options.id));
    std::fs::create_dir_all(&work_dir).map_err(|e| format!("cannot create {}: {e}", work_dir.display()))?;
    let work = work_dir.to_string_lossy().to_string();
    let metadata = ExecutorRegistration {
        id: options.id.clone(),
        host: Some(options.advertise_host.clone()),
        port: port as u32,
        grpc_port: 0,
        specification: Some(ExecutorSpecification::default().with_vcores(options.vcores as u32).into()),
        os_info: Some(ExecutorOperatingSystemSpecification::default().into()),
        ballista_protocol_version: BALLISTA_PROTOCOL_VERSION,
    };
    let config_producer: ConfigProducer = Arc::new(default_config_producer);
    let spill_dir = work.clone();
    let runtime_producer: RuntimeProducer =
        Arc::new(move |_| Ok(Arc::new(RuntimeEnvBuilder::new().with_temp_file_path(spill_dir.clone()).build()?)));
    let executor = Arc::new(Executor::with_default_execution_engine(
        metadata,
        &work,
        runtime_producer,
        config_producer,
        Arc::new(BallistaFunctionRegistry::default()),
        Arc::new(LoggingMetricsCollector::default()),
        options.vcores,
    ));
    let codec: BallistaCodec<LogicalPlanNode, PhysicalPlanNode> =
        BallistaCodec::new(Arc::new(BallistaLogicalExtensionCodec::default()), physical_codec());
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{scheduler}"))
        .map_err(|e| format!("`{scheduler}` is not a scheduler address: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy();
    let client =
        SchedulerGrpcClient::new(channel).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20);
    let flight = FlightServiceServer::new(BallistaFlightService::new(work.clone()))
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let server = tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        if let Err(error) =
            create_grpc_server(&GrpcServerConfig::default()).add_service(flight).serve_with_incoming(incoming).await
        {
            warn!(%error, "the Ballista executor's Flight service stopped");
        }
    });
    let poll = tokio::spawn(async move {
        let health = ballista_executor::health::ExecutorHealth::new();
        if let Err(error) =
            ballista_executor::execution_loop::poll_loop(client, executor, codec, None, None, health).await
        {
            warn!(%error, "the Ballista executor's poll loop stopped");
        }
    });
    info!(scheduler, port, vcores = options.vcores, "Ballista executor started");
    Ok(Running { scheduler: scheduler.to_string(), tasks: vec![server, poll], work_dir })
}
