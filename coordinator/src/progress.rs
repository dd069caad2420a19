//! What a run reports while it works, and its summary.

use std::sync::Arc;

use serde::Serialize;
use sluice_proto::task::{MergeCounts, Quality};

#[derive(Debug, Clone)]
pub enum ProgressEvent {
    /// A flow listed its source: this many files (and bytes) are new and wait for a batch.
    Discovered {
        flow: String,
        files: u64,
        bytes: u64,
    },
    /// A batch's files are fixed in the checkpoint and its tasks are about to run.
    BatchStarted {
        flow: String,
        batch: u64,
        files: u64,
        bytes: u64,
        tasks: usize,
        resumed: bool,
        /// For a Delta source: the source versions the batch reads (first, last).
        source_versions: Option<(u64, u64)>,
    },
    TaskFinished {
        flow: String,
        batch: u64,
        rows: u64,
        files: u64,
        bytes: u64,
    },
    /// A task failed and was handed out again.
    TaskRetried {
        flow: String,
        batch: u64,
        message: String,
    },
    BatchCommitted(BatchReport),
    /// A file that was ingested before has changed; it is skipped (`allow_overwrites: false`).
    RewrittenFileSkipped {
        flow: String,
        file: String,
    },
    /// A file of an uncommitted batch was deleted before the batch could commit.
    PlannedFileVanished {
        flow: String,
        batch: u64,
        file: String,
    },
    FlowCaughtUp {
        flow: String,
    },
    /// The schema a files source decodes into, when it is first settled and
    /// each time it gains columns.
    SchemaVersion {
        flow: String,
        version: u64,
        /// `inferred`, `declared` or `evolved`.
        origin: String,
        /// Columns added by this version.
        added: Vec<String>,
        /// The file where they were first seen.
        file: Option<String>,
        /// The whole schema, as DDL.
        schema: String,
    },
    /// Interval trigger: a round of the flow failed with an error that may pass;
    /// the next round tries again from the durable state.
    RoundFailed {
        flow: String,
        message: String,
    },
    /// A flow did not run because a flow it reads from failed.
    FlowSkipped {
        flow: String,
        upstream: String,
    },
    /// Interval trigger: the next round starts after this long.
    Waiting {
        seconds: f64,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct BatchReport {
    pub flow: String,
    pub batch: u64,
    pub files: u64,
    pub rows: u64,
    pub bytes: u64,
    pub seconds: f64,
    /// The Delta version committed; `None` when the batch turned out to be committed already.
    pub version: Option<i64>,
    /// For a Delta source: the source versions read (first, last); `files` is then 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_versions: Option<(u64, u64)>,
    /// For a merge sink: what the merge did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merge: Option<MergeCounts>,
    /// Bad input quarantined and expectation counts, when there were any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quality: Option<Quality>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct FlowSummary {
    pub name: String,
    pub table: String,
    /// The flow's quarantine table.
    pub quarantine: String,
    pub batches: u64,
    pub files: u64,
    pub rows: u64,
    pub bytes: u64,
    /// Delta versions committed by this run, in order.
    pub versions: Vec<i64>,
    /// For a Delta source: the first and last source versions read by this run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_versions: Option<(u64, u64)>,
    /// For a merge sink: what this run's merges did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merge: Option<MergeCounts>,
    /// Bad input quarantined and expectation counts of this run, when there were any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quality: Option<Quality>,
    /// For a files source: the schema version in use at the end of the run,
    /// and the columns this run's evolutions added.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schema_version: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub schema_added: Vec<String>,
    /// Batch reports not yet written to the event log.
    #[serde(skip)]
    pub unlogged: Vec<BatchReport>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RunSummary {
    pub pipeline: String,
    pub flows: Vec<FlowSummary>,
    pub batches: u64,
    pub files: u64,
    pub rows: u64,
    pub bytes: u64,
    pub seconds: f64,
}

impl FlowSummary {
    pub fn add(&mut self, report: &BatchReport) {
        self.unlogged.push(report.clone());
        self.batches += 1;
        self.files += report.files;
        self.rows += report.rows;
        self.bytes += report.bytes;
        self.versions.extend(report.version);
        if let Some((first, last)) = report.source_versions {
            let (start, _) = self.source_versions.unwrap_or((first, last));
            self.source_versions = Some((start.min(first), last));
        }
        if let Some(merge) = report.merge {
            self.merge = Some(self.merge.unwrap_or_default().plus(merge));
        }
        if let Some(quality) = &report.quality {
            self.quality = Some(self.quality.take().unwrap_or_default().plus(quality));
        }
    }
}

impl RunSummary {
    pub fn from_flows(pipeline: &str, flows: Vec<FlowSummary>, seconds: f64) -> Self {
        Self {
            pipeline: pipeline.to_string(),
            batches: flows.iter().map(|f| f.batches).sum(),
            files: flows.iter().map(|f| f.files).sum(),
            rows: flows.iter().map(|f| f.rows).sum(),
            bytes: flows.iter().map(|f| f.bytes).sum(),
            flows,
            seconds,
        }
    }
}

/// Where progress events go; sending never blocks and never fails the run.
/// Each event also updates the process's metrics (see `sluice_worker::telemetry`),
/// labelled with the pipeline the sink is for.
#[derive(Clone)]
pub struct ProgressSink {
    sender: Option<tokio::sync::mpsc::UnboundedSender<ProgressEvent>>,
    pipeline: Arc<str>,
}

impl ProgressSink {
    pub fn new(sender: tokio::sync::mpsc::UnboundedSender<ProgressEvent>) -> Self {
        Self { sender: Some(sender), pipeline: Arc::from("") }
    }

    pub fn none() -> Self {
        Self { sender: None, pipeline: Arc::from("") }
    }

    /// The same sink, labelling metrics with `pipeline`.
    pub fn for_pipeline(&self, pipeline: &str) -> Self {
        Self { sender: self.sender.clone(), pipeline: Arc::from(pipeline) }
    }

    pub fn send(&self, event: ProgressEvent) {
        record(&self.pipeline, &event);
        if let Some(sender) = &self.sender {
            let _ = sender.send(event);
        }
    }
}

/// Updates the metrics an event stands for.
fn record(pipeline: &str, event: &ProgressEvent) {
    use sluice_worker::telemetry::*;
    let labels = |flow: &str| [("pipeline", pipeline.to_string()), ("flow", flow.to_string())];
    match event {
        ProgressEvent::Discovered { flow, files, bytes } => {
            metrics::gauge!(BACKLOG_FILES, &labels(flow)).set(*files as f64);
            metrics::gauge!(BACKLOG_BYTES, &labels(flow)).set(*bytes as f64);
        }
        ProgressEvent::BatchCommitted(report) => {
            let labels = labels(&report.flow);
            metrics::counter!(BATCHES, &labels).increment(1);
            metrics::counter!(ROWS, &labels).increment(report.rows);
            metrics::counter!(BYTES, &labels).increment(report.bytes);
            metrics::counter!(FILES, &labels).increment(report.files);
            metrics::histogram!(BATCH_SECONDS, &labels).record(report.seconds);
            if let Some(quality) = &report.quality {
                metrics::counter!(QUARANTINED_ROWS, &labels).increment(quality.quarantined_rows);
            }
            metrics::gauge!(BACKLOG_FILES, &labels).decrement(report.files as f64);
            metrics::gauge!(BACKLOG_BYTES, &labels).decrement(report.bytes as f64);
        }
        ProgressEvent::TaskRetried { flow, .. } => metrics::counter!(TASK_RETRIES, &labels(flow)).increment(1),
        ProgressEvent::FlowCaughtUp { flow } => {
            metrics::gauge!(BACKLOG_FILES, &labels(flow)).set(0.0);
            metrics::gauge!(BACKLOG_BYTES, &labels(flow)).set(0.0);
            metrics::gauge!(BACKLOG_VERSIONS, &labels(flow)).set(0.0);
        }
        _ => {}
    }
}
