//! The embedded runtime: coordinator and workers in one process, with the
//! in-memory coordination store. The same roles and the same task protocol as
//! a cluster; no etcd.
//!
//! Workers run on a runtime of their own, with one thread per slot, so that
//! decoding and Parquet encoding never hold up the coordinator's loop.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use sluice_coordinator::pipeline_runner::{RunEnvironment, RunFailure, run_pipeline};
use sluice_coordinator::progress::{ProgressSink, RunSummary};
use sluice_proto::keys::Keys;
use sluice_proto::kv::{KvStore, MemoryKv};
use sluice_proto::spec::PipelineSpec;
use sluice_proto::timing::LeaseTimings;
use sluice_worker::worker_loop::{WorkerOptions, run_worker};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// Worker slots (concurrent tasks); the number of cores by default.
    pub slots: usize,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self { slots: std::thread::available_parallelism().map_or(1, |n| n.get()) }
    }
}

/// Worker threads for embedded runs. Create it outside of any async context and
/// drop it there too (a tokio runtime cannot be dropped from inside another).
pub struct Embedded {
    workers: tokio::runtime::Runtime,
    slots: usize,
}

impl Embedded {
    pub fn start(options: EmbeddedOptions) -> std::io::Result<Self> {
        let slots = options.slots.max(1);
        let workers = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(slots)
            .thread_name("sluice-worker")
            .enable_all()
            .build()?;
        Ok(Self { workers, slots })
    }

    /// Runs the pipeline to the end of its trigger (or until `cancel`).
    pub async fn run(
        &self,
        spec: &PipelineSpec,
        progress: ProgressSink,
        cancel: CancellationToken,
    ) -> Result<RunSummary, RunFailure> {
        let kv: Arc<dyn KvStore> = Arc::new(MemoryKv::new());
        let keys = Keys::new("embedded");
        let timings = LeaseTimings::default();
        let worker_shutdown = CancellationToken::new();
        let worker = self.workers.spawn(run_worker(
            kv.clone(),
            keys.clone(),
            // The run is over when the workers stop: nothing is left to drain.
            WorkerOptions {
                id: format!("embedded-{}", std::process::id()),
                slots: self.slots,
                timings,
                drain_timeout: std::time::Duration::ZERO,
                executor: false,
            },
            worker_shutdown.clone(),
        ));
        let parallelism = Arc::new(AtomicUsize::new(self.slots));
        let env = RunEnvironment { kv, keys, parallelism, timings, progress, fence: None, query: None };
        let result = run_pipeline(spec, env, cancel).await;
        worker_shutdown.cancel();
        let _ = worker.await;
        result
    }
}
