//! The Ballista scheduler every coordinator runs in-process.
//!
//! Each coordinator starts one at start-up; only the leader's is used: its
//! address goes into the leader key, every worker's executor polls it, and the
//! leader's flows submit their shuffle stages to it. A standby's scheduler
//! idles. When a worker's lease is gone the leader tells its scheduler that
//! the worker's executor is lost, so that Ballista runs that executor's tasks
//! again elsewhere at once instead of after its own heartbeat timeout.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ballista_core::config::TaskSchedulingPolicy;
use ballista_core::serde::protobuf::ExecutorStoppedParams;
use ballista_core::serde::protobuf::scheduler_grpc_client::SchedulerGrpcClient;
use ballista_scheduler::cluster::BallistaCluster;
use ballista_scheduler::config::SchedulerConfig;
use datafusion_proto::protobuf::{LogicalPlanNode, PhysicalPlanNode};
use tracing::{info, warn};

/// A running scheduler: the address workers reach it at.
#[derive(Debug, Clone)]
pub struct Scheduler {
    pub address: String,
}

/// Starts the scheduler on `listen`, advertised as `advertise_host` with the bound port.
pub async fn start(listen: SocketAddr, advertise_host: &str, id: &str) -> Result<Scheduler, String> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen} for the Ballista scheduler: {e}"))?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let config = SchedulerConfig {
        scheduler_id: id.to_string(),
        external_host: advertise_host.to_string(),
        bind_host: listen.ip().to_string(),
        bind_port: port,
        scheduling_policy: TaskSchedulingPolicy::PullStaged,
        override_physical_codec: Some(sluice_worker::ballista::scan::physical_codec()),
        // A worker's death is reported by the leader as soon as its lease is
        // gone; these bound an executor that hangs while its worker lives on.
        executor_timeout_seconds: 30,
        expire_dead_executor_interval_seconds: 5,
        no_executors_grace_period_seconds: 30,
        finished_job_data_clean_up_interval_seconds: 60,
        finished_job_state_clean_up_interval_seconds: 300,
        ..SchedulerConfig::default()
    };
    let cluster = BallistaCluster::new_from_config(&config).await.map_err(|e| e.to_string())?;
    let server = ballista_scheduler::scheduler_process::create_scheduler::<LogicalPlanNode, PhysicalPlanNode>(
        cluster,
        Arc::new(config),
    )
    .await
    .map_err(|e| format!("cannot start the Ballista scheduler: {e}"))?;
    tokio::spawn(async move {
        if let Err(error) =
            ballista_scheduler::scheduler_process::start_grpc_service_with_listener(listener, server).await
        {
            warn!(%error, "the Ballista scheduler stopped");
        }
    });
    let address = format!("{advertise_host}:{port}");
    info!(address, "Ballista scheduler started");
    Ok(Scheduler { address })
}

/// Tells the scheduler that the executors of workers that were registered
/// (`before`) and are not any more (`now`) are lost.
pub async fn report_lost(scheduler: &str, before: &BTreeSet<String>, now: &BTreeSet<String>) {
    let lost: Vec<&String> = before.difference(now).collect();
    if lost.is_empty() {
        return;
    }
    let endpoint = match tonic::transport::Endpoint::from_shared(format!("http://{scheduler}")) {
        Ok(endpoint) => endpoint.connect_timeout(Duration::from_secs(2)).timeout(Duration::from_secs(5)),
        Err(_) => return,
    };
    let mut client = match endpoint.connect().await {
        Ok(channel) => SchedulerGrpcClient::new(channel),
        Err(error) => {
            warn!(%error, "cannot reach the Ballista scheduler to report lost executors");
            return;
        }
    };
    for worker in lost {
        let params = ExecutorStoppedParams {
            executor_id: worker.clone(),
            reason: "its Sluice worker's lease is gone".to_string(),
        };
        match client.executor_stopped(params).await {
            Ok(_) => info!(worker, "reported the worker's Ballista executor lost"),
            Err(error) => warn!(%error, worker, "cannot report the worker's Ballista executor lost"),
        }
    }
}
