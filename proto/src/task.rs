//! What a coordinator asks a worker to do, and what the worker hands back.
//!
//! Both travel through the coordination store as JSON. A task names its files
//! explicitly: a retried task reads exactly the same input. Delta `Add` actions
//! travel as JSON values in Delta's own camelCase form, so this crate needs no
//! Delta dependency.

use arrow_schema::Schema;
use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;

use crate::spec::{CsvOptions, Expectation, Format, MergeSpec, OnMalformed, SchemaEvolution};
use crate::storage::StorageOptions;

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
    /// Set when the task reads a Delta table instead of `files`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta_read: Option<DeltaRead>,
    /// Set when the output is merged into the table by key instead of appended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge: Option<MergeTask>,
    /// Set for a watermark source: only rows beyond `after` are read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watermark: Option<WatermarkRead>,
    /// What a record that cannot be decoded does.
    #[serde(default)]
    pub on_malformed: OnMalformed,
    /// What a field the schema lacks, or a value that does not fit, does.
    #[serde(default)]
    pub schema_evolution: SchemaEvolution,
    /// Checks on the output rows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expectations: Vec<Expectation>,
    /// The quarantine table's root URL: rows and files that cannot be read, and
    /// rows failing a `quarantine` expectation, are written below it.
    pub quarantine_url: String,
    /// Object-store options of the pipeline's locations (`${NAME}` values are
    /// resolved by the worker, from its own environment).
    #[serde(default, skip_serializing_if = "StorageOptions::is_empty")]
    pub storage: StorageOptions,
    /// Tables the transform reads by name beside `source`, each at the
    /// version pinned when the batch was planned.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tables: Vec<NamedTable>,
    /// Set when the transform runs on the cluster's Ballista executors
    /// instead of in the worker; the worker streams the result and writes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ballista: Option<BallistaRun>,
}

/// A Delta table a transform reads under `name`, at `version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedTable {
    pub name: String,
    pub table_url: String,
    pub version: u64,
}

/// Where a transform runs on Ballista.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BallistaRun {
    /// The scheduler's gRPC address, `host:port`.
    pub scheduler: String,
    /// How many partitions the query's stages are cut into (the executors' slots).
    pub partitions: usize,
}

/// What a task reads from a Delta table. `source_schema` is then the relation's
/// whole schema (no `_metadata`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaRead {
    pub table_url: String,
    pub kind: DeltaReadKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeltaReadKind {
    /// The change data feed of versions `start..=end`.
    Changes { start: u64, end: u64 },
    /// The table's snapshot at `version`.
    Snapshot { version: u64 },
}

/// A merge of the task's output into the table as of `target_version`
/// (`None`: the table does not exist yet). The coordinator commits the
/// result only on that very version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeTask {
    pub spec: MergeSpec,
    pub target_version: Option<u64>,
}

/// What a merge did, by row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeCounts {
    pub inserted: u64,
    pub updated: u64,
    pub deleted: u64,
    /// Changes older than the row the table holds, and deletes of absent keys.
    pub ignored: u64,
    /// Target files read to find the batch's keys, and files rewritten.
    pub files_scanned: u64,
    pub files_rewritten: u64,
}

impl MergeCounts {
    /// The counts of both, summed.
    pub fn plus(self, other: Self) -> Self {
        Self {
            inserted: self.inserted + other.inserted,
            updated: self.updated + other.updated,
            deleted: self.deleted + other.deleted,
            ignored: self.ignored + other.ignored,
            files_scanned: self.files_scanned + other.files_scanned,
            files_rewritten: self.files_rewritten + other.files_rewritten,
        }
    }

    /// `(name, value)` for each count, as commitInfo and summaries name them.
    pub fn named(&self) -> [(&'static str, u64); 6] {
        [
            ("inserted", self.inserted),
            ("updated", self.updated),
            ("deleted", self.deleted),
            ("ignored", self.ignored),
            ("files_scanned", self.files_scanned),
            ("files_rewritten", self.files_rewritten),
        ]
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TaskResult {
    /// Delta `Add` actions for the data files written, as JSON.
    pub adds: Vec<serde_json::Value>,
    pub rows: u64,
    pub files: u64,
    pub bytes_read: u64,
    pub worker: String,
    /// Delta `Remove` actions (a merge's rewritten files), as JSON.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removes: Vec<serde_json::Value>,
    /// Delta `cdc` actions (a merge's change data files), as JSON.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cdc: Vec<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge: Option<MergeCounts>,
    /// For a watermark source: the highest value of the column among the rows read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watermark: Option<i64>,
    /// Delta `Add` actions for quarantine data files, as JSON; committed to the
    /// quarantine table before the batch's own commit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quarantine_adds: Vec<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Quality::is_empty")]
    pub quality: Quality,
}

/// What a task found wrong with its input, and what it did about it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quality {
    /// Records that could not be decoded (quarantined).
    #[serde(default)]
    pub malformed_rows: u64,
    /// Files that could not be read (one quarantine entry each).
    #[serde(default)]
    pub unreadable_files: u64,
    /// Rows written to the quarantine table, of every kind.
    #[serde(default)]
    pub quarantined_rows: u64,
    /// Output rows that failed each expectation.
    #[serde(default)]
    pub expectations: BTreeMap<String, ExpectationCount>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpectationCount {
    /// `warn`, `drop`, `quarantine` or `fail`.
    pub action: String,
    pub failed: u64,
}

impl Quality {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// The counts of both, summed.
    pub fn plus(mut self, other: &Self) -> Self {
        self.malformed_rows += other.malformed_rows;
        self.unreadable_files += other.unreadable_files;
        self.quarantined_rows += other.quarantined_rows;
        for (name, count) in &other.expectations {
            let entry = self
                .expectations
                .entry(name.clone())
                .or_insert_with(|| ExpectationCount { action: count.action.clone(), failed: 0 });
            entry.failed += count.failed;
        }
        self
    }
}

/// Which rows of a watermark source a task reads: those whose `column`, as a
/// number (a time in microseconds since the epoch), is greater than `after`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatermarkRead {
    pub column: String,
    pub after: Option<i64>,
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
    /// Set when the task stopped at columns its schema lacks, which the flow
    /// adds (`schema_evolution: add_new_columns`): the coordinator evolves the
    /// schema and hands the task out again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_columns: Option<NewColumns>,
}

/// Columns found in a file that the task's schema does not have.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewColumns {
    pub file: String,
    /// The line where the first was seen (JSON lines), when known.
    pub line: Option<u64>,
    /// Their names (`parent.child` for a field of a struct).
    pub columns: Vec<String>,
    /// The schema inferred from the task's files from this one on: the new
    /// columns' types come from it.
    pub observed: Schema,
}

/// What a worker registers under its lease (`workers/<id>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRegistration {
    pub id: String,
    /// Tasks it runs at a time.
    pub slots: u32,
    /// Whether it runs a Ballista executor (shuffle stages).
    #[serde(default)]
    pub executor: bool,
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
