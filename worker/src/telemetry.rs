//! Prometheus metrics, through the `metrics` facade and
//! `metrics-exporter-prometheus`'s HTTP listener (`GET /metrics`).
//!
//! Every process serves them when given `--metrics-listen ADDR`
//! (`SLUICE_METRICS_LISTEN`); without it no recorder is installed and the
//! counters cost nothing. Names and labels are documented in `docs/OPERATIONS.md`.

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;

pub const BATCHES: &str = "sluice_batches_committed_total";
pub const ROWS: &str = "sluice_rows_total";
pub const BYTES: &str = "sluice_bytes_total";
pub const FILES: &str = "sluice_files_total";
pub const BATCH_SECONDS: &str = "sluice_batch_duration_seconds";
pub const COMMIT_SECONDS: &str = "sluice_commit_duration_seconds";
pub const QUARANTINED_ROWS: &str = "sluice_quarantined_rows_total";
pub const TASK_RETRIES: &str = "sluice_task_retries_total";
pub const BACKLOG_FILES: &str = "sluice_backlog_files";
pub const BACKLOG_BYTES: &str = "sluice_backlog_bytes";
pub const BACKLOG_VERSIONS: &str = "sluice_backlog_source_versions";
pub const LISTING_SECONDS: &str = "sluice_source_listing_duration_seconds";
pub const TASKS: &str = "sluice_worker_tasks_total";
pub const TASK_SECONDS: &str = "sluice_worker_task_duration_seconds";
pub const LEASE_LOSSES: &str = "sluice_lease_losses_total";
pub const LEADER: &str = "sluice_coordinator_leader";

/// Starts serving `/metrics` on `addr` (in the current Tokio runtime) and
/// describes the metrics. Call once per process.
pub fn serve_metrics(addr: SocketAddr) -> Result<(), String> {
    let buckets = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets(&buckets)
        .map_err(|e| e.to_string())?
        .upkeep_timeout(Duration::from_secs(5))
        .install()
        .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
    describe();
    Ok(())
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(BATCHES, "Micro-batches committed, per pipeline and flow.");
    describe_counter!(ROWS, Unit::Count, "Rows committed to sink tables.");
    describe_counter!(BYTES, Unit::Bytes, "Source bytes of committed batches.");
    describe_counter!(FILES, Unit::Count, "Source files of committed batches.");
    describe_histogram!(BATCH_SECONDS, Unit::Seconds, "Time from a batch's plan to its commit.");
    describe_histogram!(COMMIT_SECONDS, Unit::Seconds, "Time of one Delta commit (the txn check included).");
    describe_counter!(QUARANTINED_ROWS, Unit::Count, "Rows and files sent to quarantine tables.");
    describe_counter!(TASK_RETRIES, Unit::Count, "Tasks handed out again after a failure or a lost lease.");
    describe_gauge!(BACKLOG_FILES, Unit::Count, "Files discovered and not committed yet.");
    describe_gauge!(BACKLOG_BYTES, Unit::Bytes, "Bytes of files discovered and not committed yet.");
    describe_gauge!(BACKLOG_VERSIONS, Unit::Count, "Source table versions not consumed yet (Delta sources).");
    describe_histogram!(
        LISTING_SECONDS,
        Unit::Seconds,
        "Time to list a files source (label listing: full or incremental)."
    );
    describe_counter!(TASKS, Unit::Count, "Tasks a worker ran, by outcome.");
    describe_histogram!(TASK_SECONDS, Unit::Seconds, "Time a worker spent on one task.");
    describe_counter!(LEASE_LOSSES, Unit::Count, "Leases (worker claims or leadership) lost.");
    describe_gauge!(LEADER, "1 while this coordinator leads, else 0.");
}
