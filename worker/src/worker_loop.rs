//! The worker loop: register under a lease, keep it alive, and run up to
//! `slots` tasks at a time, each claimed through the task queue.
//!
//! If the lease is lost (the store was unreachable for longer than the TTL),
//! every running task is abandoned, since its claim is gone and its outcome
//! could not be published anyway, and the worker registers again.
//!
//! On shutdown (SIGTERM) the worker drains: it stops claiming, lets its running
//! tasks finish and publish for up to `drain_timeout`, then abandons what is
//! left and revokes its lease, so those claims vanish at once and other
//! workers take the tasks over.

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use sluice_proto::keys::Keys;
use sluice_proto::kv::{KvError, KvStore, LeaseId};
use sluice_proto::queue::TaskQueue;
use sluice_proto::task::{TaskFailure, TaskOutcome, TaskSpec, WorkerRegistration};
use sluice_proto::timing::LeaseTimings;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::error::WorkerError;
use crate::task_runner::run_task;

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub id: String,
    pub slots: usize,
    pub timings: LeaseTimings,
    /// On shutdown, how long running tasks may take to finish before they are abandoned.
    pub drain_timeout: Duration,
    /// Whether this worker runs a Ballista executor (announced in its registration).
    pub executor: bool,
}

const RETRY_DELAY: Duration = Duration::from_millis(500);

/// Runs until `shutdown` is cancelled.
pub async fn run_worker(kv: Arc<dyn KvStore>, keys: Keys, options: WorkerOptions, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        let lease = match register(kv.as_ref(), &keys, &options).await {
            Ok(lease) => lease,
            Err(error) => {
                warn!(worker = %options.id, %error, "cannot register; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(RETRY_DELAY) => continue,
                }
            }
        };
        info!(worker = %options.id, slots = options.slots, "worker registered");
        // Cancelled when the lease is lost, or when a drain ends.
        let lease_scope = CancellationToken::new();
        let keeper = tokio::spawn(keep_alive(kv.clone(), lease, options.timings, lease_scope.clone()));
        let mut slots = JoinSet::new();
        for _ in 0..options.slots.max(1) {
            let (kv, keys, options) = (kv.clone(), keys.clone(), options.clone());
            slots.spawn(slot_loop(kv, keys, options, lease, lease_scope.clone(), shutdown.clone()));
        }
        tokio::select! {
            _ = lease_scope.cancelled() => {}
            // A drain of zero (the embedded runtime, whose run is over) has nothing to wait for.
            _ = shutdown.cancelled(), if options.drain_timeout.is_zero() => lease_scope.cancel(),
            _ = shutdown.cancelled(), if !options.drain_timeout.is_zero() => {
                // Drain: no new claims (the slots see `shutdown`), running tasks finish.
                info!(worker = %options.id, deadline = ?options.drain_timeout, "draining: no new tasks; waiting for running ones");
                let finished = tokio::time::timeout(options.drain_timeout, async {
                    while slots.join_next().await.is_some() {}
                })
                .await;
                if finished.is_err() {
                    let busy = slots.len();
                    warn!(worker = %options.id, busy, "drain deadline passed; abandoning the running tasks to other workers");
                }
                lease_scope.cancel();
            }
        }
        while slots.join_next().await.is_some() {}
        let _ = keeper.await;
        // On shutdown, and when we think the lease is lost while etcd may think
        // otherwise (it could not be reached for a TTL): revoking frees our
        // claims and registration now instead of when etcd expires the lease.
        let _ = kv.revoke_lease(lease).await;
        if shutdown.is_cancelled() {
            return;
        }
        metrics::counter!(crate::telemetry::LEASE_LOSSES, "role" => "worker").increment(1);
        warn!(worker = %options.id, "lease lost; running tasks were abandoned, registering again");
    }
}

async fn register(kv: &dyn KvStore, keys: &Keys, options: &WorkerOptions) -> Result<LeaseId, WorkerError> {
    let queue_error = |e| WorkerError::Queue(sluice_proto::queue::QueueError::Kv(e));
    let lease = kv.grant_lease(options.timings.ttl).await.map_err(queue_error)?;
    let registration =
        WorkerRegistration { id: options.id.clone(), slots: options.slots.max(1) as u32, executor: options.executor };
    let value = serde_json::to_vec(&registration).unwrap_or_default();
    if !kv.create_if_absent(&keys.worker(&options.id), value, Some(lease)).await.map_err(queue_error)? {
        // Our previous registration, whose lease has not expired yet: it goes with that lease.
        warn!(worker = %options.id, "an earlier registration of this worker is still there; waiting for it to expire");
        let _ = kv.revoke_lease(lease).await;
        return Err(queue_error(KvError::Unavailable("worker id still registered".into())));
    }
    Ok(lease)
}

/// Keeps the lease alive; cancels `scope` when it is lost (etcd said so, or no
/// keep-alive got through for a whole TTL).
pub async fn keep_alive(kv: Arc<dyn KvStore>, lease: LeaseId, timings: LeaseTimings, scope: CancellationToken) {
    let deadline_after = |now: tokio::time::Instant| now + timings.ttl;
    let mut lease_deadline = deadline_after(tokio::time::Instant::now());
    loop {
        tokio::select! {
            _ = scope.cancelled() => return,
            _ = tokio::time::sleep(timings.keep_alive_interval()) => {}
        }
        let sent_at = tokio::time::Instant::now();
        match kv.keep_alive(lease).await {
            Ok(true) => lease_deadline = deadline_after(sent_at),
            Ok(false) => break,
            Err(error) => {
                warn!(lease, %error, "keep-alive failed");
                if tokio::time::Instant::now() >= lease_deadline {
                    break;
                }
            }
        }
    }
    scope.cancel();
}

/// Claims and runs tasks one at a time until `scope` is cancelled (the lease is
/// gone: a running task is abandoned) or `stop` is (a drain: no new claim, the
/// running task finishes).
async fn slot_loop(
    kv: Arc<dyn KvStore>,
    keys: Keys,
    options: WorkerOptions,
    lease: LeaseId,
    scope: CancellationToken,
    stop: CancellationToken,
) {
    let queue = TaskQueue { kv: kv.as_ref(), keys: &keys };
    while !scope.is_cancelled() && !stop.is_cancelled() {
        let revision = queue.revision().await.unwrap_or(0);
        match queue.claim_next(&options.id, lease).await {
            Ok(Some((task, claim))) => {
                let span = info_span!("task", task = %task.id, worker = %options.id, attempt = task.attempt);
                run_claimed(&queue, &options.id, &claim, task, &scope).instrument(span).await;
            }
            Ok(None) => {
                tokio::select! {
                    _ = scope.cancelled() => return,
                    _ = stop.cancelled() => return,
                    waited = queue.wait_for_work(revision, options.timings.poll_interval()) => {
                        if waited.is_err() {
                            tokio::time::sleep(RETRY_DELAY).await;
                        }
                    }
                }
            }
            Err(error) => {
                warn!(worker = %options.id, %error, "cannot claim a task; retrying");
                tokio::select! {
                    _ = scope.cancelled() => return,
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(RETRY_DELAY) => {}
                }
            }
        }
    }
}

async fn run_claimed(queue: &TaskQueue<'_>, worker: &str, claim: &str, task: TaskSpec, scope: &CancellationToken) {
    let started = std::time::Instant::now();
    // A panic is a bug in Sluice: it fails the task with its message rather
    // than leaving the batch waiting for an outcome that never comes.
    let result = match std::panic::AssertUnwindSafe(run_task(&task, worker, scope)).catch_unwind().await {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(WorkerError::Bug(message))
        }
    };
    if scope.is_cancelled() {
        return;
    }
    let outcome_label = match &result {
        Ok(_) => "done",
        Err(error) if error.is_retryable() => "failed_retryable",
        Err(_) => "failed",
    };
    let labels = [("pipeline", task.id.pipeline.clone()), ("flow", task.id.flow.clone())];
    metrics::histogram!(crate::telemetry::TASK_SECONDS, &labels).record(started.elapsed().as_secs_f64());
    metrics::counter!(crate::telemetry::TASKS, "outcome" => outcome_label).increment(1);
    let outcome = match result {
        Ok(result) => {
            info!(rows = result.rows, files = result.files, seconds = started.elapsed().as_secs_f64(), "task done");
            TaskOutcome::Done(result)
        }
        Err(error) => {
            info!(%error, retryable = error.is_retryable(), "task failed");
            TaskOutcome::Failed(TaskFailure {
                message: error.to_string(),
                retryable: error.is_retryable(),
                worker: worker.to_string(),
                new_columns: match error {
                    WorkerError::NewColumns(found) => Some(*found),
                    _ => None,
                },
            })
        }
    };
    publish(queue, claim, &task, &outcome, scope).await;
}

/// Publishes an outcome, retrying while the store is unreachable. Gives up only
/// when the claim is gone or the lease is lost: then the task runs again elsewhere.
async fn publish(
    queue: &TaskQueue<'_>,
    claim: &str,
    task: &TaskSpec,
    outcome: &TaskOutcome,
    scope: &CancellationToken,
) {
    let mut delay = RETRY_DELAY;
    loop {
        match queue.publish_outcome(claim, &task.id, outcome).await {
            Ok(true) => return,
            Ok(false) => {
                warn!("the claim on the task is gone; its outcome is discarded");
                return;
            }
            Err(error) => warn!(%error, "cannot publish the task's outcome yet; retrying"),
        }
        tokio::select! {
            _ = scope.cancelled() => return,
            _ = tokio::time::sleep(delay) => delay = (delay * 2).min(Duration::from_secs(5)),
        }
    }
}
