//! Runs every flow of a pipeline on the pipeline's trigger.
//!
//! `available_now`: each flow, in file order, catches up with the files there
//! are, then the run ends. `interval`: rounds of that, one every interval,
//! until cancelled; cancellation is honoured between batches, so a stop never
//! leaves a batch half-done (and a kill would not either: see `docs/DESIGN.md`).
//! In interval mode an error that may pass (storage, commit conflicts) is
//! reported and the next round starts over from the durable state; any other
//! error ends the run.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Instant;

use sluice_proto::keys::Keys;
use sluice_proto::kv::KvStore;
use sluice_proto::spec::{PipelineSpec, SourceSpec, Trigger};
use sluice_proto::timing::LeaseTimings;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::checkpoint::Checkpoint;
use crate::delta_flow::DeltaFlowRunner;
use crate::error::CoordinatorError;
use crate::flow_runner::{CommitFence, FlowContext, FlowRunner};
use crate::progress::{FlowSummary, ProgressEvent, ProgressSink, RunSummary};

/// Where a pipeline runs: the coordination store its tasks go through, and how
/// many worker slots serve it.
#[derive(Clone)]
pub struct RunEnvironment {
    pub kv: Arc<dyn KvStore>,
    pub keys: Keys,
    /// Worker slots serving the pipeline; a cluster coordinator keeps it up to date.
    pub parallelism: Arc<AtomicUsize>,
    pub timings: LeaseTimings,
    pub progress: ProgressSink,
    /// Checked before every commit (a cluster coordinator's leadership).
    pub fence: Option<Arc<dyn CommitFence>>,
}

enum Runner {
    Files(Box<FlowRunner>),
    Delta(Box<DeltaFlowRunner>),
}

/// A failed run: the error, and what was committed before it.
#[derive(Debug)]
pub struct RunFailure {
    pub error: CoordinatorError,
    pub summary: RunSummary,
}

pub async fn run_pipeline(
    spec: &PipelineSpec,
    env: RunEnvironment,
    cancel: CancellationToken,
) -> Result<RunSummary, RunFailure> {
    let started = Instant::now();
    let mut summaries: Vec<FlowSummary> = spec
        .flows
        .iter()
        .map(|f| FlowSummary {
            name: f.name.clone(),
            table: f.sink.table.to_string(),
            quarantine: f.quarantine.to_string(),
            ..Default::default()
        })
        .collect();
    let result = run_rounds(spec, &env, &cancel, &mut summaries).await;
    let summary = RunSummary::from_flows(&spec.name, summaries, started.elapsed().as_secs_f64());
    match result {
        Ok(()) => Ok(summary),
        Err(error) => Err(RunFailure { error, summary }),
    }
}

async fn run_rounds(
    spec: &PipelineSpec,
    env: &RunEnvironment,
    cancel: &CancellationToken,
    summaries: &mut [FlowSummary],
) -> Result<(), CoordinatorError> {
    let checkpoint = Arc::new(Checkpoint::open(&spec.checkpoint)?);
    let mut runners: Vec<Runner> = spec
        .flows
        .iter()
        .map(|flow| {
            let ctx = FlowContext {
                pipeline: spec.name.clone(),
                flow: flow.clone(),
                checkpoint: checkpoint.clone(),
                kv: env.kv.clone(),
                keys: env.keys.clone(),
                parallelism: env.parallelism.clone(),
                timings: env.timings,
                progress: env.progress.clone(),
                fence: env.fence.clone(),
            };
            match &flow.source {
                SourceSpec::Files(files) => Runner::Files(Box::new(FlowRunner::new(ctx, files.clone()))),
                _ => Runner::Delta(Box::new(DeltaFlowRunner::new(ctx).expect("a Delta source"))),
            }
        })
        .collect();
    let order = spec.dependency_order();
    let continuous = matches!(spec.trigger, Trigger::Interval(_));
    loop {
        let round_started = Instant::now();
        // Flows that failed this round, and those skipped because of them.
        let mut failed: Vec<&str> = Vec::new();
        let mut skipped: Vec<String> = Vec::new();
        let mut first_error: Option<CoordinatorError> = None;
        for &index in &order {
            if cancel.is_cancelled() {
                return Ok(());
            }
            let flow = &spec.flows[index];
            if let Some(upstream) = flow.source.upstream().filter(|u| failed.contains(u)) {
                info!(flow = %flow.name, upstream, "not running: a flow it reads from failed");
                env.progress
                    .send(ProgressEvent::FlowSkipped { flow: flow.name.clone(), upstream: upstream.to_string() });
                failed.push(&flow.name);
                skipped.push(flow.name.clone());
                continue;
            }
            let summary = &mut summaries[index];
            let result = match &mut runners[index] {
                Runner::Files(runner) => runner.run_until_caught_up(cancel, summary).await,
                Runner::Delta(runner) => runner.run_until_caught_up(cancel, summary).await,
            };
            match result {
                Ok(()) => {}
                Err(error) if continuous && error.is_retryable() => {
                    info!(flow = %summary.name, %error, "round failed; trying again next round");
                    let event = ProgressEvent::RoundFailed { flow: summary.name.clone(), message: error.to_string() };
                    env.progress.send(event);
                    failed.push(&flow.name);
                }
                Err(error) => {
                    // The flows that do not depend on this one still run.
                    failed.push(&flow.name);
                    first_error.get_or_insert(error);
                }
            }
        }
        if let Some(error) = first_error {
            if skipped.is_empty() {
                return Err(error);
            }
            return Err(CoordinatorError::DependentsSkipped { error: Box::new(error), skipped });
        }
        let Trigger::Interval(interval) = spec.trigger else { return Ok(()) };
        let wait = interval.saturating_sub(round_started.elapsed());
        env.progress.send(ProgressEvent::Waiting { seconds: wait.as_secs_f64() });
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
