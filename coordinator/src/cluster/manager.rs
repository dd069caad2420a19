//! What the leader does: run every submitted pipeline that should run, and
//! keep its status in the store.
//!
//! The manager reacts to the `pipelines/` keys (submit, replace, stop, resume)
//! and to its runs ending. A run that fails with an error that may pass (etcd
//! or storage unreachable, a commit conflict) is started again with backoff
//! from the durable state, up to [`MAX_ATTEMPTS_WITHOUT_PROGRESS`] times in a
//! row without a commit; the status shows the error meanwhile. When leadership
//! is lost, every run is aborted at once: nothing it did is visible until a
//! commit, and it can no longer commit (see [`super::leader`]).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sluice_proto::keys::Keys;
use sluice_proto::kv::KvStore;
use sluice_proto::pb::v1::{PipelineState, PipelineStatus};
use sluice_proto::registry::{Desired, PipelineRecord};
use sluice_proto::spec::{PipelineSpec, parse_pipeline};
use sluice_proto::task::WorkerRegistration;
use sluice_proto::timing::LeaseTimings;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::leader::Leadership;
use super::status::{self, apply, is_terminal, now_ms, pending_status, read_status};
use crate::flow_runner::QueryCluster;
use crate::pipeline_runner::{RunEnvironment, run_pipeline};
use crate::progress::{ProgressEvent, ProgressSink};

/// A run that keeps failing with retryable errors, with no commit in between,
/// fails for good after this many attempts.
pub const MAX_ATTEMPTS_WITHOUT_PROGRESS: u32 = 20;

/// How often status counters are written while a batch runs.
const STATUS_INTERVAL: Duration = Duration::from_millis(500);

struct ActiveRun {
    generation: u64,
    cancel: CancellationToken,
    handle: JoinHandle<()>,
}

pub struct Manager {
    kv: Arc<dyn KvStore>,
    keys: Keys,
    timings: LeaseTimings,
    leadership: Arc<Leadership>,
    parallelism: Arc<AtomicUsize>,
    query: Option<Arc<QueryCluster>>,
    runs: HashMap<String, ActiveRun>,
}

impl Manager {
    /// `scheduler`: this coordinator's Ballista scheduler, if it runs one.
    pub fn new(
        kv: Arc<dyn KvStore>,
        keys: Keys,
        timings: LeaseTimings,
        leadership: Arc<Leadership>,
        scheduler: Option<String>,
    ) -> Self {
        let parallelism = Arc::new(AtomicUsize::new(1));
        let query = scheduler.map(|address| Arc::new(QueryCluster::new(address)));
        Self { kv, keys, timings, leadership, parallelism, query, runs: HashMap::new() }
    }

    /// Leads until leadership is lost; then aborts every run.
    pub async fn lead(mut self) {
        let lost = self.leadership.lost();
        let watcher = tokio::spawn(track_workers(
            self.kv.clone(),
            self.keys.clone(),
            self.parallelism.clone(),
            self.query.clone(),
        ));
        while !lost.is_cancelled() {
            let revision = match self.kv.list(&self.keys.pipelines_prefix()).await {
                Ok(listing) => {
                    self.runs.retain(|_, run| !run.handle.is_finished());
                    for (_, value) in &listing.entries {
                        match PipelineRecord::decode(value) {
                            Ok(record) => self.reconcile(record).await,
                            Err(error) => warn!(%error, "ignoring a malformed pipeline record"),
                        }
                    }
                    listing.revision
                }
                Err(error) => {
                    warn!(%error, "cannot list pipelines; retrying");
                    tokio::select! {
                        _ = lost.cancelled() => {}
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    continue;
                }
            };
            let prefix = self.keys.pipelines_prefix();
            tokio::select! {
                _ = lost.cancelled() => {}
                _ = self.kv.wait_for_change(&prefix, revision, Duration::from_secs(1)) => {}
            }
        }
        warn!("leadership lost: aborting every run (nothing uncommitted is visible, and nothing more is committed)");
        watcher.abort();
        for (_, run) in self.runs.drain() {
            run.handle.abort();
        }
    }

    async fn reconcile(&mut self, record: PipelineRecord) {
        if let Some(run) = self.runs.get(&record.name) {
            let outdated = run.generation != record.generation || record.desired == Desired::Stopped;
            if outdated && !run.cancel.is_cancelled() {
                info!(pipeline = %record.name, "stopping the run between two batches");
                run.cancel.cancel();
            }
            return;
        }
        let stored = match read_status(self.kv.as_ref(), &self.keys, &record.name).await {
            Ok(stored) => stored,
            Err(error) => {
                warn!(pipeline = %record.name, %error, "cannot read the pipeline's status; trying again");
                return;
            }
        };
        let current = stored.filter(|s| s.generation == record.generation);
        if record.desired == Desired::Stopped {
            if current.as_ref().is_none_or(|s| s.state != PipelineState::Stopped as i32) {
                let mut stopped = current.unwrap_or_else(|| pending_status(&record, None));
                stopped.state = PipelineState::Stopped as i32;
                self.publish(&record.name, &mut stopped).await;
            }
            return;
        }
        if current.as_ref().is_some_and(|s| is_terminal(s.state)) {
            return;
        }
        let spec = match parse_pipeline(&record.yaml, record.base_dir.as_deref().map(Path::new)) {
            Ok(spec) => spec,
            Err(error) => {
                let mut failed = pending_status(&record, None);
                failed.state = PipelineState::Failed as i32;
                failed.last_error = format!("invalid pipeline: {error}");
                self.publish(&record.name, &mut failed).await;
                return;
            }
        };
        let mut initial = current.unwrap_or_else(|| pending_status(&record, Some(&spec)));
        initial.state = PipelineState::Running as i32;
        initial.leader = self.leadership.me.describe();
        self.publish(&record.name, &mut initial).await;
        info!(pipeline = %record.name, generation = record.generation, "starting the pipeline");
        let cancel = self.leadership.lost().child_token();
        let run = PipelineRun {
            kv: self.kv.clone(),
            keys: self.keys.clone(),
            timings: self.timings,
            leadership: self.leadership.clone(),
            parallelism: self.parallelism.clone(),
            query: self.query.clone(),
            spec,
            cancel: cancel.clone(),
        };
        let handle = tokio::spawn(run.run(initial));
        self.runs.insert(record.name.clone(), ActiveRun { generation: record.generation, cancel, handle });
    }

    async fn publish(&self, name: &str, status: &mut PipelineStatus) {
        publish(&self.leadership, &self.keys, name, status).await;
    }
}

async fn publish(leadership: &Leadership, keys: &Keys, name: &str, status: &mut PipelineStatus) {
    status.updated_at_ms = now_ms();
    status.leader = leadership.me.describe();
    let mut delay = Duration::from_millis(200);
    for _ in 0..10 {
        match leadership.put_fenced(&keys.status(name), status::encode(status)).await {
            Ok(_) => return,
            Err(error) => warn!(pipeline = name, %error, "cannot write the pipeline's status; retrying"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Keeps `parallelism` at the number of live worker slots and `query`'s
/// count of workers with an executor; tells the scheduler at once of such a
/// worker that is gone.
async fn track_workers(
    kv: Arc<dyn KvStore>,
    keys: Keys,
    parallelism: Arc<AtomicUsize>,
    query: Option<Arc<QueryCluster>>,
) {
    let prefix = keys.workers_prefix();
    let mut known: BTreeSet<String> = BTreeSet::new();
    loop {
        match kv.list(&prefix).await {
            Ok(listing) => {
                let workers: Vec<WorkerRegistration> =
                    listing.entries.iter().filter_map(|(_, v)| serde_json::from_slice(v).ok()).collect();
                let slots: usize = workers.iter().map(|w| w.slots as usize).sum();
                parallelism.store(slots.max(1), Ordering::Relaxed);
                // The workers that run a Ballista executor.
                let live: BTreeSet<String> = workers.into_iter().filter(|w| w.executor).map(|w| w.id).collect();
                if let Some(query) = &query {
                    query.workers.store(live.len(), Ordering::Relaxed);
                    super::scheduler::report_lost(&query.scheduler, &known, &live).await;
                }
                known = live;
                let _ = kv.wait_for_change(&prefix, listing.revision, Duration::from_secs(2)).await;
            }
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

struct PipelineRun {
    kv: Arc<dyn KvStore>,
    keys: Keys,
    timings: LeaseTimings,
    leadership: Arc<Leadership>,
    parallelism: Arc<AtomicUsize>,
    query: Option<Arc<QueryCluster>>,
    spec: PipelineSpec,
    cancel: CancellationToken,
}

impl PipelineRun {
    async fn run(self, mut status: PipelineStatus) {
        let name = self.spec.name.clone();
        let mut failures = 0u32;
        let mut backoff = Duration::from_secs(1);
        loop {
            let (sender, events) = tokio::sync::mpsc::unbounded_channel();
            let env = RunEnvironment {
                kv: self.kv.clone(),
                keys: self.keys.clone(),
                parallelism: self.parallelism.clone(),
                timings: self.timings,
                progress: ProgressSink::new(sender),
                fence: Some(self.leadership.clone() as Arc<dyn crate::flow_runner::CommitFence>),
                query: self.query.clone(),
            };
            let before = committed(&status);
            let reporter =
                tokio::spawn(report(self.leadership.clone(), self.keys.clone(), name.clone(), status, events));
            let result = run_pipeline(&self.spec, env, self.cancel.clone()).await;
            status = match reporter.await {
                Ok(status) => status,
                Err(_) => return,
            };
            if self.leadership.lost().is_cancelled() {
                return;
            }
            match result {
                Ok(_) if self.cancel.is_cancelled() => {
                    status.state = PipelineState::Stopped as i32;
                }
                Ok(_) => {
                    status.state = PipelineState::Completed as i32;
                    status.last_error.clear();
                }
                Err(failure) if failure.error.is_retryable() => {
                    failures = if committed(&status) > before { 1 } else { failures + 1 };
                    status.last_error = failure.error.to_string();
                    if failures < MAX_ATTEMPTS_WITHOUT_PROGRESS {
                        warn!(pipeline = %name, error = %failure.error, attempt = failures, "run failed; starting it again");
                        publish(&self.leadership, &self.keys, &name, &mut status).await;
                        tokio::select! {
                            _ = self.cancel.cancelled() => {}
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                        if !self.cancel.is_cancelled() {
                            continue;
                        }
                        status.state = PipelineState::Stopped as i32;
                    } else {
                        status.state = PipelineState::Failed as i32;
                    }
                }
                Err(failure) => {
                    warn!(pipeline = %name, error = %failure.error, "pipeline failed");
                    status.state = PipelineState::Failed as i32;
                    status.last_error = failure.error.to_string();
                }
            }
            info!(pipeline = %name, state = ?PipelineState::try_from(status.state), "run ended");
            publish(&self.leadership, &self.keys, &name, &mut status).await;
            return;
        }
    }
}

fn committed(status: &PipelineStatus) -> u64 {
    status.flows.iter().map(|f| f.batches_committed).sum()
}

/// Folds a run's progress events into its status and publishes it: at once on
/// a state change, at most every [`STATUS_INTERVAL`] otherwise. Returns the
/// final status when the run's events end.
async fn report(
    leadership: Arc<Leadership>,
    keys: Keys,
    name: String,
    mut status: PipelineStatus,
    mut events: UnboundedReceiver<ProgressEvent>,
) -> PipelineStatus {
    let mut dirty = false;
    let mut tick = tokio::time::interval(STATUS_INTERVAL);
    loop {
        tokio::select! {
            event = events.recv() => {
                let Some(event) = event else { break };
                if apply(&mut status, &event) {
                    publish(&leadership, &keys, &name, &mut status).await;
                    dirty = false;
                } else {
                    dirty = true;
                }
            }
            _ = tick.tick() => {
                if dirty {
                    publish(&leadership, &keys, &name, &mut status).await;
                    dirty = false;
                }
            }
        }
    }
    status
}
