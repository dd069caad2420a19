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
use sluice_proto::spec::{PipelineSpec, SourceSpec, Trigger, WatermarkInput, WatermarkSource};
use sluice_proto::timing::LeaseTimings;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::checkpoint::Checkpoint;
use crate::delta_flow::DeltaFlowRunner;
use crate::error::CoordinatorError;
use crate::event_log::{Event, EventLog};
use crate::flow_runner::{CommitFence, FlowContext, FlowRunner};
use crate::progress::{FlowSummary, ProgressEvent, ProgressSink, RunSummary};
use crate::watermark_files::WatermarkFilesRunner;

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
    /// The cluster's Ballista scheduler; `None` runs every transform locally.
    pub query: Option<Arc<crate::flow_runner::QueryCluster>>,
}

enum Runner {
    Files(Box<FlowRunner>),
    Delta(Box<DeltaFlowRunner>),
    WatermarkFiles(Box<WatermarkFilesRunner>),
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
    preflight(spec)?;
    let checkpoint = Arc::new(Checkpoint::open(&spec.checkpoint, &spec.storage)?);
    let event_log = EventLog::new(&spec.checkpoint, &spec.storage, &spec.name);
    let mut runners: Vec<Runner> = spec
        .flows
        .iter()
        .map(|flow| {
            let ctx = FlowContext {
                pipeline: spec.name.clone(),
                flow: flow.clone(),
                storage: spec.storage.clone(),
                checkpoint: checkpoint.clone(),
                kv: env.kv.clone(),
                keys: env.keys.clone(),
                parallelism: env.parallelism.clone(),
                timings: env.timings,
                progress: env.progress.for_pipeline(&spec.name),
                fence: env.fence.clone(),
                query: env.query.clone(),
            };
            match &flow.source {
                SourceSpec::Files(files) => Runner::Files(Box::new(FlowRunner::new(ctx, files.clone()))),
                SourceSpec::Watermark(WatermarkSource { input: WatermarkInput::Files(_), .. }) => {
                    Runner::WatermarkFiles(Box::new(WatermarkFilesRunner::new(ctx).expect("a watermark over files")))
                }
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
                Runner::WatermarkFiles(runner) => runner.run_until_caught_up(cancel, summary).await,
            };
            let mut events: Vec<Event> = std::mem::take(&mut summary.unlogged)
                .into_iter()
                .filter(|report| report.version.is_some())
                .map(|report| Event { flow: summary.name.clone(), kind: "batch", report: Some(report), error: None })
                .collect();
            if let Err(error) = &result {
                let error = Some(error.to_string());
                events.push(Event { flow: summary.name.clone(), kind: "error", report: None, error });
            }
            event_log.append(&events).await;
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

/// The checks a pipeline passes before anything runs (on `sluice run`,
/// `sluice validate` and a cluster's submit), beyond the pipeline file's own
/// validation: every transform is one query, and every location's store can
/// be built from its options.
pub fn preflight(spec: &PipelineSpec) -> Result<(), CoordinatorError> {
    for flow in &spec.flows {
        if let Some(sql) = &flow.transform {
            sluice_worker::transform::check_query(sql).map_err(|message| CoordinatorError::Schema {
                flow: flow.name.clone(),
                message: format!("transform {message}"),
            })?;
        }
    }
    check_storage(spec)
}

/// Builds the object store of every location the pipeline names (no I/O), so
/// that a misspelt storage option or an unset `${NAME}` is an error before
/// anything runs, naming the location.
pub fn check_storage(spec: &PipelineSpec) -> Result<(), CoordinatorError> {
    for location in locations(spec) {
        sluice_worker::storage::check_location(location, &spec.storage)
            .map_err(|e| CoordinatorError::Storage { location: location.to_string(), message: e.to_string() })?;
    }
    Ok(())
}

/// Every location the pipeline reads or writes: the checkpoint, and each flow's
/// source, sink and quarantine table.
pub fn locations(spec: &PipelineSpec) -> Vec<&url::Url> {
    let mut locations = vec![&spec.checkpoint];
    for flow in &spec.flows {
        locations.push(&flow.sink.table);
        locations.push(&flow.quarantine);
        match flow.source.files() {
            Some(files) => locations.push(&files.location),
            None => locations.extend(flow.source.table().map(|t| &t.url)),
        }
    }
    locations
}
