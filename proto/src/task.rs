//! What a coordinator asks a worker to do, and what the worker hands back.
//!
//! Both travel through the coordination store as JSON. A task names its files
//! explicitly: a retried task reads exactly the same input. Delta `Add` actions
//! travel as JSON values in Delta's own camelCase form, so this crate needs no
//! Delta dependency.

use arrow_schema::Schema;
use serde::{Deserialize, Serialize};

use crate::spec::{CsvOptions, Format};

/// One source file as discovered: its identity is path + size + modification time (+ etag).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SourceFile {
    /// Full URL of the file.
    pub url: String,
    pub size: u64,
    /// Milliseconds since the Unix epoch.
    pub modified_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
}

/// Identifies one task of one micro-batch of one flow.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TaskId {
    pub pipeline: String,
    pub flow: String,
    pub batch: u64,
    pub index: u32,
}

impl std::fmt::Display for TaskId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/batch-{}/task-{}", self.pipeline, self.flow, self.batch, self.index)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskSpec {
    pub id: TaskId,
    /// Increases each time the coordinator hands the task out again.
    pub attempt: u32,
    pub files: Vec<SourceFile>,
    pub format: Format,
    pub csv: CsvOptions,
    /// The schema files are decoded into (without `_metadata`).
    pub source_schema: Schema,
    pub transform: Option<String>,
    /// The Delta table's root URL; data files are written below it.
    pub table_url: String,
    /// The schema rows are cast to before writing (the table's schema).
    pub table_schema: Schema,
    pub partition_by: Vec<String>,
    /// The batch's ingest time (microseconds since the epoch), fixed at planning.
    pub ingest_time_us: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TaskResult {
    /// Delta `Add` actions for the data files written, as JSON.
    pub adds: Vec<serde_json::Value>,
    pub rows: u64,
    pub files: u64,
    pub bytes_read: u64,
    pub worker: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskOutcome {
    Done(TaskResult),
    Failed(TaskFailure),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskFailure {
    pub message: String,
    /// True when running the task again may succeed (a lost lease, a network error);
    /// false for bad input, which fails the same way every time.
    pub retryable: bool,
    pub worker: String,
}

/// What a worker registers under its lease (`workers/<id>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRegistration {
    pub id: String,
    /// Tasks it runs at a time.
    pub slots: u32,
}

/// The value of a claim key: the claiming worker and a token unique to this
/// claim, so that a worker whose claim lapsed and who claimed the same task
/// again cannot publish the outcome of its first attempt under the second claim.
pub fn claim_value(worker: &str, token: &str) -> String {
    format!("{worker}#{token}")
}

/// The worker named in a claim value.
pub fn claim_worker(value: &[u8]) -> String {
    let text = String::from_utf8_lossy(value);
    text.split_once('#').map_or(text.to_string(), |(worker, _)| worker.to_string())
}
