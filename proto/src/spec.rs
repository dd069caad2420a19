//! The pipeline file.
//!
//! Users write YAML ([`RawPipeline`] and friends mirror it key for key, and reject
//! unknown keys); [`parse_pipeline`] validates it once into a [`PipelineSpec`],
//! resolving relative paths against the pipeline file's folder. Every error names
//! the field, as `flows[0].source.files.format`, and what is allowed there.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arrow_schema::Schema;
use serde::{Deserialize, Serialize};
use url::Url;

use crate::schema_ddl;
use crate::storage::{LocationOptions, StorageOptions};

/// Files per micro-batch when the pipeline file does not say (Auto Loader's default).
pub const DEFAULT_MAX_FILES_PER_BATCH: u64 = 1000;

/// URL schemes a location may use.
pub const SUPPORTED_SCHEMES: &[&str] = &["file", "s3", "s3a", "az", "abfs", "abfss", "gs"];

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The YAML does not have the shape of a pipeline file; the message names the
    /// field path, the line and the column.
    #[error("invalid pipeline file: {0}")]
    Shape(String),
    #[error("invalid pipeline file: {field}: {message}")]
    Invalid { field: String, message: String },
}

impl SpecError {
    fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid { field: field.into(), message: message.into() }
    }
}

// ---------------------------------------------------------------------------
// The file as written.
// ---------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPipeline {
    pub pipeline: String,
    pub checkpoint: String,
    #[serde(default)]
    pub trigger: Option<serde_yaml::Value>,
    /// Object-store options for every location of the pipeline (see [`crate::storage`]).
    #[serde(default)]
    pub storage_options: BTreeMap<String, serde_yaml::Value>,
    pub flows: Vec<RawFlow>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFlow {
    pub name: String,
    pub source: RawSource,
    #[serde(default)]
    pub transform: Option<String>,
    pub sink: RawSink,
    #[serde(default)]
    pub expectations: Vec<RawExpectation>,
    /// Where rows that cannot be decoded or that fail a `quarantine`
    /// expectation go (default: the sink's location with `_quarantine` appended).
    #[serde(default)]
    pub quarantine: Option<String>,
    /// Where the transform runs: `auto` (default), `local` or `ballista`.
    #[serde(default)]
    pub engine: Engine,
    /// More Delta tables the transform can read by name, beside `source`.
    #[serde(default)]
    pub tables: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExpectation {
    pub name: String,
    pub expr: String,
    #[serde(default)]
    pub on_violation: OnViolation,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    #[serde(default)]
    pub files: Option<RawFilesSource>,
    #[serde(default)]
    pub delta_changes: Option<RawDeltaChanges>,
    #[serde(default)]
    pub delta: Option<RawDeltaSnapshot>,
    #[serde(default)]
    pub watermark: Option<RawWatermark>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWatermark {
    /// A Delta table URL or path, or `flow:<name>`.
    #[serde(default)]
    pub table: Option<String>,
    /// Or a folder of files (the keys of a `files:` source).
    #[serde(default)]
    pub files: Option<RawFilesSource>,
    pub column: String,
    #[serde(default)]
    pub initial_value: Option<serde_yaml::Value>,
    #[serde(default)]
    pub lag: Option<serde_yaml::Value>,
    #[serde(default)]
    pub storage_options: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDeltaChanges {
    /// A table URL or path, or `flow:<name>` for another flow's sink.
    pub table: String,
    #[serde(default)]
    pub starting_version: Option<u64>,
    #[serde(default)]
    pub starting_timestamp: Option<String>,
    #[serde(default)]
    pub max_versions_per_batch: Option<u64>,
    #[serde(default)]
    pub storage_options: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDeltaSnapshot {
    pub table: String,
    #[serde(default)]
    pub version: Option<u64>,
    #[serde(default)]
    pub storage_options: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFilesSource {
    pub path: String,
    pub format: Format,
    #[serde(default)]
    pub glob: Option<String>,
    #[serde(default)]
    pub schema: Option<String>,
    #[serde(default)]
    pub max_files_per_batch: Option<u64>,
    #[serde(default)]
    pub max_bytes_per_batch: Option<serde_yaml::Value>,
    #[serde(default)]
    pub allow_overwrites: bool,
    #[serde(default)]
    pub csv: Option<CsvOptions>,
    #[serde(default)]
    pub on_malformed: OnMalformed,
    #[serde(default)]
    pub listing: Listing,
    #[serde(default)]
    pub backfill_interval: Option<String>,
    #[serde(default)]
    pub schema_hints: Option<String>,
    #[serde(default)]
    pub schema_evolution: Option<SchemaEvolution>,
    #[serde(default)]
    pub schema_sample: Option<RawSchemaSample>,
    #[serde(default)]
    pub storage_options: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSchemaSample {
    #[serde(default)]
    pub max_files: Option<u64>,
    #[serde(default)]
    pub max_bytes: Option<serde_yaml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSink {
    pub table: String,
    #[serde(default)]
    pub mode: SinkMode,
    #[serde(default)]
    pub partition_by: Vec<String>,
    #[serde(default)]
    pub properties: BTreeMap<String, serde_yaml::Value>,
    // Merge sinks only.
    #[serde(default)]
    pub keys: Vec<String>,
    #[serde(default)]
    pub sequence_by: Option<String>,
    #[serde(default)]
    pub delete_when: Option<String>,
    #[serde(default)]
    pub ignore_null_updates: Option<bool>,
    #[serde(default)]
    pub except_columns: Vec<String>,
    #[serde(default)]
    pub scd: Option<u8>,
    #[serde(default)]
    pub track_history_columns: Vec<String>,
    #[serde(default)]
    pub replace_rows_per_key: Option<bool>,
    /// Object-store options for the sink's table (and its quarantine table).
    #[serde(default)]
    pub storage_options: BTreeMap<String, serde_yaml::Value>,
}

// ---------------------------------------------------------------------------
// The validated spec.
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct PipelineSpec {
    pub name: String,
    pub checkpoint: Url,
    pub trigger: Trigger,
    pub flows: Vec<FlowSpec>,
    /// Object-store options of every location, by location.
    pub storage: StorageOptions,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Process everything there is now, in as many batches as the limits need, then stop.
    AvailableNow,
    /// Keep running, starting a new round this long after the previous one began.
    Interval(Duration),
}

#[derive(Debug, Clone)]
pub struct FlowSpec {
    pub name: String,
    pub source: SourceSpec,
    /// DataFusion SQL over the relation `source`; `None` means `SELECT * FROM source`.
    pub transform: Option<String>,
    pub sink: SinkSpec,
    /// Checks on the flow's output rows, in the order written.
    pub expectations: Vec<Expectation>,
    /// The Delta table of rows that could not be decoded or failed a
    /// `quarantine` expectation, and of files that could not be read.
    pub quarantine: Url,
    pub engine: Engine,
    /// Tables the transform reads by name beside `source` (`tables:`), each
    /// read whole at its latest version when a batch is planned.
    pub tables: BTreeMap<String, Url>,
}

/// Where a flow's transform runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// On Ballista when the transform needs a shuffle (an aggregation, a join,
    /// a window, a distinct) and more than one worker is live; locally otherwise.
    #[default]
    Auto,
    /// In the worker that runs the task, with DataFusion.
    Local,
    /// On the cluster's Ballista executors (in a cluster; the embedded
    /// runtime runs every transform locally).
    Ballista,
}

impl Engine {
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Auto => "auto",
            Engine::Local => "local",
            Engine::Ballista => "ballista",
        }
    }
}

/// A named check on each output row of a flow, and what a failing row does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expectation {
    pub name: String,
    /// A SQL predicate over the flow's output; a row fails it when it is false
    /// (NULL passes, as in a SQL CHECK constraint).
    pub expr: String,
    pub on_violation: OnViolation,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnViolation {
    /// Keep the row and count it.
    #[default]
    Warn,
    /// Leave the row out and count it.
    Drop,
    /// Move the row to the quarantine table, with the expectations it failed.
    Quarantine,
    /// Fail the batch; nothing is committed.
    Fail,
}

impl OnViolation {
    pub fn name(self) -> &'static str {
        match self {
            OnViolation::Warn => "warn",
            OnViolation::Drop => "drop",
            OnViolation::Quarantine => "quarantine",
            OnViolation::Fail => "fail",
        }
    }
}

/// What a files source does with columns its schema does not have, and with
/// values that do not fit their column's type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchemaEvolution {
    /// A new column is added to the schema and to the sink table, in the commit
    /// of the batch that brought it (the default with `schema: infer`).
    AddNewColumns,
    /// The schema never changes; unknown fields and values that do not fit go
    /// into the `_rescued_data` column as a JSON object.
    Rescue,
    /// A new column fails the batch, naming the column and the file.
    FailOnNewColumns,
    /// New columns are ignored (the default with a declared schema).
    #[default]
    None,
}

impl SchemaEvolution {
    pub fn as_str(self) -> &'static str {
        match self {
            SchemaEvolution::AddNewColumns => "add_new_columns",
            SchemaEvolution::Rescue => "rescue",
            SchemaEvolution::FailOnNewColumns => "fail_on_new_columns",
            SchemaEvolution::None => "none",
        }
    }

    /// Whether files are decoded strictly, so that a field the schema lacks is noticed.
    pub fn notices_new_columns(self) -> bool {
        self != SchemaEvolution::None
    }
}

/// The column that holds, in `rescue` mode, what did not fit the schema.
pub const RESCUED_DATA: &str = "_rescued_data";

/// How much of the first batch's files `schema: infer` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaSample {
    pub max_files: u64,
    pub max_bytes: u64,
}

impl Default for SchemaSample {
    fn default() -> Self {
        Self { max_files: 1000, max_bytes: 64 << 20 }
    }
}

/// How a files source finds its new files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Listing {
    /// Incremental while every batch so far brought keys greater than all the
    /// earlier batches' keys (time-prefixed names), full otherwise.
    #[default]
    Auto,
    /// Always list after the greatest key ingested: the user vouches that keys
    /// arrive in lexical order. A file landing under a smaller key waits for the
    /// next backfill.
    Incremental,
    /// Always list everything and compare with the ledger.
    Full,
}

/// The default `backfill_interval`: one full listing a day catches files that
/// incremental listing cannot see (a key below the greatest one ingested).
pub const DEFAULT_BACKFILL_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// What a record of a source file that cannot be decoded does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnMalformed {
    /// Goes to the quarantine table with its file, line, text and error; the batch goes on.
    #[default]
    Quarantine,
    /// Fails the batch with the file, the line and the error.
    Fail,
}

#[derive(Debug, Clone)]
pub enum SourceSpec {
    Files(FilesSource),
    /// The change data feed of a Delta table, version range by version range.
    DeltaChanges(DeltaChangesSource),
    /// A Delta table's snapshot, read whole each time it has a new version.
    Delta(DeltaSnapshotSource),
    /// The rows of a Delta table whose `column` is beyond the last watermark.
    Watermark(WatermarkSource),
}

/// A Delta table a flow reads: its location, and the flow that writes it when
/// it was named as `flow:<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRef {
    pub url: Url,
    pub upstream: Option<String>,
    /// The source's `storage_options`, as written.
    pub storage_options: LocationOptions,
}

#[derive(Debug, Clone)]
pub struct DeltaChangesSource {
    pub table: TableRef,
    pub starting_version: Option<u64>,
    /// Milliseconds since the epoch; the first version committed at or after it.
    pub starting_timestamp_ms: Option<i64>,
    pub max_versions_per_batch: Option<u64>,
}

/// Incremental loading by a column that only grows (a timestamp, a sequence
/// number): each batch reads the rows beyond the watermark, and the new
/// watermark, the highest value read, is the txn version of the batch's commit.
#[derive(Debug, Clone)]
pub struct WatermarkSource {
    pub input: WatermarkInput,
    pub column: String,
    /// Rows at or below it are never read.
    pub initial_value: Option<WatermarkValue>,
    /// How far below the watermark each batch reads again, for late rows.
    pub lag: Option<WatermarkValue>,
}

/// What a watermark source reads: a Delta table's latest snapshot, or every
/// file of a folder (as a `files:` source lists and decodes them).
#[derive(Debug, Clone)]
pub enum WatermarkInput {
    Table(TableRef),
    Files(Box<FilesSource>),
}

/// A watermark value or lag, as written in the pipeline file: a number (for an
/// integer column) or a time (an RFC 3339 timestamp, a date, or for a lag a
/// duration like `10m`), in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatermarkValue {
    Number(i64),
    Micros(i64),
}

#[derive(Debug, Clone)]
pub struct DeltaSnapshotSource {
    pub table: TableRef,
    /// A fixed version (time travel); `None` follows the latest.
    pub version: Option<u64>,
}

impl SourceSpec {
    /// The flow this source reads from, if it names one.
    pub fn upstream(&self) -> Option<&str> {
        self.table()?.upstream.as_deref()
    }

    /// The folder of files this source reads, if it reads one (`files:`, or a
    /// watermark over files).
    pub fn files(&self) -> Option<&FilesSource> {
        match self {
            SourceSpec::Files(files) => Some(files),
            SourceSpec::Watermark(WatermarkSource { input: WatermarkInput::Files(files), .. }) => Some(files),
            _ => None,
        }
    }

    /// The Delta table this source reads, if it reads one.
    pub fn table(&self) -> Option<&TableRef> {
        match self {
            SourceSpec::Files(_) => None,
            SourceSpec::DeltaChanges(s) => Some(&s.table),
            SourceSpec::Delta(s) => Some(&s.table),
            SourceSpec::Watermark(s) => match &s.input {
                WatermarkInput::Table(table) => Some(table),
                WatermarkInput::Files(_) => None,
            },
        }
    }

    fn table_mut(&mut self) -> Option<&mut TableRef> {
        match self {
            SourceSpec::Files(_) => None,
            SourceSpec::DeltaChanges(s) => Some(&mut s.table),
            SourceSpec::Delta(s) => Some(&mut s.table),
            SourceSpec::Watermark(s) => match &mut s.input {
                WatermarkInput::Table(table) => Some(table),
                WatermarkInput::Files(_) => None,
            },
        }
    }
}

#[derive(Debug, Clone)]
pub struct FilesSource {
    pub location: Url,
    /// The source's `storage_options`, as written.
    pub storage_options: LocationOptions,
    pub format: Format,
    pub glob: Option<String>,
    pub schema: SchemaSpec,
    pub max_files_per_batch: u64,
    pub max_bytes_per_batch: Option<u64>,
    pub allow_overwrites: bool,
    pub csv: CsvOptions,
    pub on_malformed: OnMalformed,
    pub listing: Listing,
    /// How often an incremental listing is replaced by a full one; `None`: never.
    pub backfill_interval: Option<Duration>,
    /// Types that override (or add to) the inferred schema.
    pub schema_hints: Option<Arc<Schema>>,
    pub schema_evolution: SchemaEvolution,
    pub schema_sample: SchemaSample,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Newline-delimited JSON.
    Json,
    Csv,
    Parquet,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsvOptions {
    #[serde(default = "default_true")]
    pub header: bool,
    #[serde(default = "default_delimiter")]
    pub delimiter: char,
    #[serde(default = "default_quote")]
    pub quote: char,
    #[serde(default)]
    pub escape: Option<char>,
}

impl Default for CsvOptions {
    fn default() -> Self {
        Self { header: true, delimiter: ',', quote: '"', escape: None }
    }
}

fn default_true() -> bool {
    true
}
fn default_delimiter() -> char {
    ','
}
fn default_quote() -> char {
    '"'
}

#[derive(Debug, Clone)]
pub enum SchemaSpec {
    /// Sample the files of the first batch and keep the result in the checkpoint.
    Infer,
    Declared(Arc<Schema>),
}

#[derive(Debug, Clone)]
pub struct SinkSpec {
    pub table: Url,
    pub mode: SinkMode,
    pub partition_by: Vec<String>,
    pub properties: BTreeMap<String, String>,
    /// Set when `mode` is `merge`.
    pub merge: Option<MergeSpec>,
    /// The sink's `storage_options`, as written.
    pub storage_options: LocationOptions,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkMode {
    #[default]
    Append,
    /// Apply changes by key (upserts and deletes).
    Merge,
    /// Replace the table's contents with each batch.
    Overwrite,
}

/// How a merge sink applies changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeSpec {
    pub keys: Vec<String>,
    pub sequence_by: String,
    /// SQL predicate over a change row: true means "delete this key". `None`
    /// when the source has no `_change_type` and the user gave none.
    pub delete_when: Option<String>,
    pub ignore_null_updates: bool,
    pub except_columns: Vec<String>,
    pub scd: u8,
    pub track_history_columns: Vec<String>,
    /// A key holds several rows (an invoice's lines): the rows of a key's
    /// newest change replace all the rows the table holds for it.
    #[serde(default)]
    pub replace_rows_per_key: bool,
}

/// The relation a transform reads its source as.
pub const SOURCE_RELATION: &str = "source";

/// The default `delete_when` of a merge fed by a change data feed.
pub const CDF_DELETE_WHEN: &str = "_change_type = 'delete'";

impl FlowSpec {
    /// The Delta `txn` application id under which this flow's batches are committed.
    pub fn app_id(&self, pipeline: &str) -> String {
        format!("sluice:{pipeline}/{}", self.name)
    }

    pub fn files_source(&self) -> Option<&FilesSource> {
        match &self.source {
            SourceSpec::Files(files) => Some(files),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------
// Validation.
// ---------------------------------------------------------------------------

/// Parses and validates a pipeline file. Relative local paths are resolved
/// against `base_dir` (the pipeline file's folder), or kept relative to the
/// working directory when it is `None`.
pub fn parse_pipeline(yaml: &str, base_dir: Option<&Path>) -> Result<PipelineSpec, SpecError> {
    let raw: RawPipeline = serde_yaml::from_str(yaml).map_err(|e| SpecError::Shape(e.to_string()))?;
    PipelineSpec::from_raw(raw, base_dir)
}

impl PipelineSpec {
    pub fn from_raw(raw: RawPipeline, base_dir: Option<&Path>) -> Result<Self, SpecError> {
        validate_name("pipeline", &raw.pipeline)?;
        let checkpoint = parse_location("checkpoint", &raw.checkpoint, base_dir)?;
        let trigger = parse_trigger(raw.trigger.as_ref())?;
        let base = option_values("storage_options", raw.storage_options)?;
        if raw.flows.is_empty() {
            return Err(SpecError::invalid("flows", "a pipeline needs at least one flow"));
        }
        let mut flows: Vec<FlowSpec> = Vec::with_capacity(raw.flows.len());
        for (index, raw_flow) in raw.flows.into_iter().enumerate() {
            let flow = FlowSpec::from_raw(raw_flow, &format!("flows[{index}]"), base_dir)?;
            if flows.iter().any(|f| f.name == flow.name) {
                return Err(SpecError::invalid(
                    format!("flows[{index}].name"),
                    format!("flow `{}` is defined twice; flow names must be unique", flow.name),
                ));
            }
            if let Some(other) = flows.iter().find(|f| f.sink.table == flow.sink.table) {
                return Err(SpecError::invalid(
                    format!("flows[{index}].sink.table"),
                    format!("flow `{}` writes to the same table; each flow needs its own sink", other.name),
                ));
            }
            let tables = |f: &FlowSpec| [f.sink.table.clone(), f.quarantine.clone()];
            if let Some(other) = flows.iter().find(|f| tables(f).iter().any(|t| tables(&flow).contains(t))) {
                return Err(SpecError::invalid(
                    format!("flows[{index}].quarantine"),
                    format!(
                        "flow `{}` uses the same table for its sink or quarantine; give `quarantine:` a location of its own",
                        other.name
                    ),
                ));
            }
            flows.push(flow);
        }
        resolve_flow_references(&mut flows)?;
        let storage = storage_of(base, &flows);
        Ok(Self { name: raw.pipeline, checkpoint, trigger, flows, storage })
    }

    /// Flow indexes in an order where every flow comes after the flows it reads.
    pub fn dependency_order(&self) -> Vec<usize> {
        let mut order: Vec<usize> = Vec::with_capacity(self.flows.len());
        while order.len() < self.flows.len() {
            let before = order.len();
            for (index, flow) in self.flows.iter().enumerate() {
                if order.contains(&index) {
                    continue;
                }
                let ready = match flow.source.upstream() {
                    None => true,
                    Some(name) => order.iter().any(|&i| self.flows[i].name == name),
                };
                if ready {
                    order.push(index);
                }
            }
            if order.len() == before {
                // A cycle; `from_raw` rejects those, so this only guards against a hand-built spec.
                let rest: Vec<usize> = (0..self.flows.len()).filter(|i| !order.contains(i)).collect();
                order.extend(rest);
            }
        }
        order
    }
}

/// Replaces `flow:<name>` references by the named flow's sink and rejects
/// references to unknown flows and cycles.
fn resolve_flow_references(flows: &mut [FlowSpec]) -> Result<(), SpecError> {
    let sinks: BTreeMap<String, Url> = flows.iter().map(|f| (f.name.clone(), f.sink.table.clone())).collect();
    for (index, flow) in flows.iter_mut().enumerate() {
        let field = format!("flows[{index}].source");
        let own = flow.name.clone();
        let Some(table) = flow.source.table_mut() else { continue };
        let Some(name) = table.upstream.clone() else { continue };
        if name == own {
            return Err(SpecError::invalid(format!("{field}.table"), "a flow cannot read its own sink"));
        }
        match sinks.get(&name) {
            Some(url) => table.url = url.clone(),
            None => {
                let known: Vec<&str> = sinks.keys().map(String::as_str).collect();
                return Err(SpecError::invalid(
                    format!("{field}.table"),
                    format!("`flow:{name}` names no flow of this pipeline; flows: {}", known.join(", ")),
                ));
            }
        }
    }
    // Cycles: follow each flow's upstream chain.
    for (index, flow) in flows.iter().enumerate() {
        let mut seen = vec![flow.name.as_str()];
        let mut current = flow.source.upstream();
        while let Some(name) = current {
            if seen.contains(&name) {
                seen.push(name);
                return Err(SpecError::invalid(
                    format!("flows[{index}].source.table"),
                    format!("flows read each other in a cycle: {}", seen.join(" -> ")),
                ));
            }
            seen.push(name);
            current = flows.iter().find(|f| f.name == name).and_then(|f| f.source.upstream());
        }
    }
    Ok(())
}

impl FlowSpec {
    fn from_raw(raw: RawFlow, field: &str, base_dir: Option<&Path>) -> Result<Self, SpecError> {
        validate_name(&format!("{field}.name"), &raw.name)?;
        let source = SourceSpec::from_raw(raw.source, &format!("{field}.source"), base_dir)?;
        let transform = match raw.transform {
            Some(sql) if sql.trim().is_empty() => {
                return Err(SpecError::invalid(
                    format!("{field}.transform"),
                    "is empty; leave it out to keep every column",
                ));
            }
            other => other,
        };
        let cdf = matches!(source, SourceSpec::DeltaChanges(_));
        let sink = SinkSpec::from_raw(raw.sink, &format!("{field}.sink"), base_dir, cdf)?;
        if let SourceSpec::Watermark(watermark) = &source
            && watermark.lag.is_some()
            && sink.mode == SinkMode::Append
        {
            return Err(SpecError::invalid(
                format!("{field}.source.watermark.lag"),
                "re-reads rows below the watermark, which an append sink would add twice; use `mode: merge` with the table's keys",
            ));
        }
        let quarantine = match raw.quarantine.as_deref() {
            Some(text) => parse_location(&format!("{field}.quarantine"), text, base_dir)?,
            None => default_quarantine(&sink.table),
        };
        if quarantine == sink.table {
            return Err(SpecError::invalid(format!("{field}.quarantine"), "must not be the sink's own table"));
        }
        let expectations = parse_expectations(raw.expectations, field)?;
        let shuffles_whole_input = matches!(source, SourceSpec::Delta(_));
        if raw.engine == Engine::Ballista && !shuffles_whole_input {
            return Err(SpecError::invalid(
                format!("{field}.engine"),
                "`ballista` runs a transform over a whole table: it needs a `delta:` source \
                 (files and change feeds are split into independent tasks and run locally)",
            ));
        }
        if !raw.tables.is_empty() && source.table().is_none() {
            return Err(SpecError::invalid(
                format!("{field}.tables"),
                "joins tables into a flow that reads a Delta table (`delta`, `delta_changes`, or a watermark over a \
                 table); a flow over files cannot use it yet: load the files into a table first, and join in the next flow",
            ));
        }
        let mut tables = BTreeMap::new();
        for (name, location) in raw.tables {
            let at = format!("{field}.tables.{name}");
            validate_name(&at, &name)?;
            if name == crate::spec::SOURCE_RELATION {
                return Err(SpecError::invalid(at, "`source` is the flow's own source; give this table another name"));
            }
            if location.trim().starts_with("flow:") {
                return Err(SpecError::invalid(
                    at,
                    "takes a table's location; `flow:` names are for sources (a table read here does not order the flows)",
                ));
            }
            tables.insert(name, parse_location(&at, &location, base_dir)?);
        }
        Ok(Self { name: raw.name, source, transform, sink, expectations, quarantine, engine: raw.engine, tables })
    }
}

/// The sink's location with `_quarantine` appended to its last segment.
fn default_quarantine(sink: &Url) -> Url {
    let mut url = sink.clone();
    let path = sink.path().trim_end_matches('/');
    url.set_path(&format!("{path}_quarantine"));
    url
}

fn parse_expectations(raw: Vec<RawExpectation>, field: &str) -> Result<Vec<Expectation>, SpecError> {
    let mut expectations: Vec<Expectation> = Vec::with_capacity(raw.len());
    for (index, expectation) in raw.into_iter().enumerate() {
        let field = format!("{field}.expectations[{index}]");
        validate_name(&format!("{field}.name"), &expectation.name)?;
        if expectations.iter().any(|e| e.name == expectation.name) {
            return Err(SpecError::invalid(
                format!("{field}.name"),
                format!("expectation `{}` is defined twice; names must be unique in a flow", expectation.name),
            ));
        }
        if expectation.expr.trim().is_empty() {
            return Err(SpecError::invalid(format!("{field}.expr"), "is empty; write a SQL predicate"));
        }
        expectations.push(Expectation {
            name: expectation.name,
            expr: expectation.expr,
            on_violation: expectation.on_violation,
        });
    }
    Ok(expectations)
}

impl SourceSpec {
    fn from_raw(raw: RawSource, field: &str, base_dir: Option<&Path>) -> Result<Self, SpecError> {
        const KINDS: &str = "`files:`, `delta_changes:`, `delta:` or `watermark:`";
        let given = [raw.files.is_some(), raw.delta_changes.is_some(), raw.delta.is_some(), raw.watermark.is_some()];
        match given.iter().filter(|g| **g).count() {
            0 => return Err(SpecError::invalid(field, format!("a source needs one of {KINDS}"))),
            1 => {}
            _ => return Err(SpecError::invalid(field, format!("give only one of {KINDS}"))),
        }
        if let Some(files) = raw.files {
            return Ok(SourceSpec::Files(FilesSource::from_raw(files, &format!("{field}.files"), base_dir)?));
        }
        if let Some(changes) = raw.delta_changes {
            let field = format!("{field}.delta_changes");
            let table = parse_table_ref(&field, &changes.table, base_dir, changes.storage_options)?;
            if changes.starting_version.is_some() && changes.starting_timestamp.is_some() {
                return Err(SpecError::invalid(field, "give `starting_version` or `starting_timestamp`, not both"));
            }
            let starting_timestamp_ms = changes
                .starting_timestamp
                .as_deref()
                .map(|text| {
                    humantime::parse_rfc3339_weak(text.trim())
                        .map(|t| t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64))
                        .map_err(|e| {
                            SpecError::invalid(
                                format!("{field}.starting_timestamp"),
                                format!("`{text}` is not a timestamp ({e}); write e.g. `2026-01-31T00:00:00Z`"),
                            )
                        })
                })
                .transpose()?;
            if changes.max_versions_per_batch == Some(0) {
                return Err(SpecError::invalid(format!("{field}.max_versions_per_batch"), "must be at least 1"));
            }
            return Ok(SourceSpec::DeltaChanges(DeltaChangesSource {
                table,
                starting_version: changes.starting_version,
                starting_timestamp_ms,
                max_versions_per_batch: changes.max_versions_per_batch,
            }));
        }
        if let Some(watermark) = raw.watermark {
            let field = format!("{field}.watermark");
            let input = match (watermark.table, watermark.files) {
                (Some(table), None) => {
                    WatermarkInput::Table(parse_table_ref(&field, &table, base_dir, watermark.storage_options)?)
                }
                (None, Some(files)) => {
                    if !watermark.storage_options.is_empty() {
                        return Err(SpecError::invalid(
                            format!("{field}.storage_options"),
                            "goes inside `files:` for a folder of files",
                        ));
                    }
                    let files = FilesSource::from_raw(files, &format!("{field}.files"), base_dir)?;
                    WatermarkInput::Files(Box::new(files))
                }
                _ => {
                    return Err(SpecError::invalid(
                        field,
                        "needs either `table:` (a Delta table or `flow:<name>`) or `files:` (a folder), not both",
                    ));
                }
            };
            if watermark.column.trim().is_empty() {
                return Err(SpecError::invalid(format!("{field}.column"), "is empty; name the column that only grows"));
            }
            let initial_value = watermark
                .initial_value
                .as_ref()
                .map(|v| parse_watermark_value(&format!("{field}.initial_value"), v, false))
                .transpose()?;
            let lag =
                watermark.lag.as_ref().map(|v| parse_watermark_value(&format!("{field}.lag"), v, true)).transpose()?;
            if matches!(lag, Some(WatermarkValue::Number(n) | WatermarkValue::Micros(n)) if n < 0) {
                return Err(SpecError::invalid(format!("{field}.lag"), "must not be negative"));
            }
            return Ok(SourceSpec::Watermark(WatermarkSource { input, column: watermark.column, initial_value, lag }));
        }
        let snapshot = raw.delta.expect("one source kind is set");
        let table = parse_table_ref(&format!("{field}.delta"), &snapshot.table, base_dir, snapshot.storage_options)?;
        Ok(SourceSpec::Delta(DeltaSnapshotSource { table, version: snapshot.version }))
    }
}

/// A number, or a time: an RFC 3339 timestamp or a date, or for a lag a duration.
fn parse_watermark_value(field: &str, value: &serde_yaml::Value, lag: bool) -> Result<WatermarkValue, SpecError> {
    let allowed = if lag {
        "a number (for an integer column) or a duration such as `10m` or `2h` (for a time column)"
    } else {
        "a number (for an integer column) or a timestamp such as `2026-01-31T00:00:00Z` or a date (for a time column)"
    };
    let text = match value {
        serde_yaml::Value::Number(n) => {
            return n.as_i64().map(WatermarkValue::Number).ok_or_else(|| SpecError::invalid(field, allowed));
        }
        serde_yaml::Value::String(text) => text.trim(),
        _ => return Err(SpecError::invalid(field, allowed)),
    };
    if let Ok(number) = text.parse::<i64>() {
        return Ok(WatermarkValue::Number(number));
    }
    let micros = if lag {
        humantime::parse_duration(text).ok().and_then(|d| i64::try_from(d.as_micros()).ok())
    } else {
        let timestamp = if text.len() == 10 { format!("{text}T00:00:00Z") } else { text.to_string() };
        humantime::parse_rfc3339_weak(&timestamp)
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .and_then(|d| i64::try_from(d.as_micros()).ok())
    };
    micros.map(WatermarkValue::Micros).ok_or_else(|| SpecError::invalid(field, format!("`{text}` is not {allowed}")))
}

/// `flow:<name>` (resolved once every flow is known) or a location, with the
/// source's `storage_options` (`field` is the source's, as `flows[0].source.delta`).
fn parse_table_ref(
    field: &str,
    text: &str,
    base_dir: Option<&Path>,
    storage_options: BTreeMap<String, serde_yaml::Value>,
) -> Result<TableRef, SpecError> {
    let storage_options = LocationOptions(option_values(&format!("{field}.storage_options"), storage_options)?);
    let field = format!("{field}.table");
    if let Some(name) = text.trim().strip_prefix("flow:") {
        let name = name.trim();
        validate_name(&field, name)?;
        // A placeholder until `resolve_flow_references` puts the flow's sink here.
        let url = Url::parse("file:///").expect("a valid URL");
        return Ok(TableRef { url, upstream: Some(name.to_string()), storage_options });
    }
    Ok(TableRef { url: parse_location(&field, text, base_dir)?, upstream: None, storage_options })
}

/// A map of option values as strings: each value a string, number or boolean.
fn option_values(field: &str, raw: BTreeMap<String, serde_yaml::Value>) -> Result<BTreeMap<String, String>, SpecError> {
    raw.into_iter()
        .map(|(key, value)| {
            let text = match value {
                serde_yaml::Value::String(s) => s,
                serde_yaml::Value::Bool(b) => b.to_string(),
                serde_yaml::Value::Number(n) => n.to_string(),
                _ => return Err(SpecError::invalid(format!("{field}.{key}"), "must be a string, number or boolean")),
            };
            Ok((key, text))
        })
        .collect()
}

/// The storage options of every location the flows name. A quarantine table
/// takes its sink's options; a `flow:` reference those of the sink it names,
/// under its own.
fn storage_of(base: BTreeMap<String, String>, flows: &[FlowSpec]) -> StorageOptions {
    let mut storage = StorageOptions { base, scopes: Vec::new() };
    for flow in flows {
        storage.add_scope(&flow.sink.table, &flow.sink.storage_options);
        storage.add_scope(&flow.quarantine, &flow.sink.storage_options);
    }
    for flow in flows {
        if let Some(files) = flow.source.files() {
            storage.add_scope(&files.location, &files.storage_options);
        } else if let Some(table) = flow.source.table() {
            storage.add_scope(&table.url, &table.storage_options);
        }
    }

    storage
}

impl FilesSource {
    fn from_raw(raw: RawFilesSource, field: &str, base_dir: Option<&Path>) -> Result<Self, SpecError> {
        let location = parse_location(&format!("{field}.path"), &raw.path, base_dir)?;
        if let Some(glob) = &raw.glob {
            globset::Glob::new(glob)
                .map_err(|e| SpecError::invalid(format!("{field}.glob"), format!("not a valid glob: {e}")))?;
        }
        let schema = match raw.schema.as_deref().map(str::trim) {
            None | Some("infer") => SchemaSpec::Infer,
            Some(ddl) => SchemaSpec::Declared(Arc::new(
                schema_ddl::parse_schema(ddl)
                    .map_err(|e| SpecError::invalid(format!("{field}.schema"), format!("{e} (or write `infer`)")))?,
            )),
        };
        let max_files_per_batch = raw.max_files_per_batch.unwrap_or(DEFAULT_MAX_FILES_PER_BATCH);
        if max_files_per_batch == 0 {
            return Err(SpecError::invalid(format!("{field}.max_files_per_batch"), "must be at least 1"));
        }
        let max_bytes_per_batch = raw
            .max_bytes_per_batch
            .as_ref()
            .map(|value| parse_byte_size(&format!("{field}.max_bytes_per_batch"), value))
            .transpose()?;
        if raw.csv.is_some() && raw.format != Format::Csv {
            return Err(SpecError::invalid(format!("{field}.csv"), "csv options need `format: csv`"));
        }
        let schema_hints = match (&raw.schema_hints, &schema) {
            (None, _) => None,
            (Some(_), SchemaSpec::Declared(_)) => {
                return Err(SpecError::invalid(
                    format!("{field}.schema_hints"),
                    "hints apply to an inferred schema (`schema: infer`); with a declared schema, write the types in `schema`",
                ));
            }
            (Some(ddl), SchemaSpec::Infer) => Some(Arc::new(
                schema_ddl::parse_schema(ddl)
                    .map_err(|e| SpecError::invalid(format!("{field}.schema_hints"), e.to_string()))?,
            )),
        };
        let schema_evolution = raw.schema_evolution.unwrap_or(match schema {
            SchemaSpec::Infer => SchemaEvolution::AddNewColumns,
            SchemaSpec::Declared(_) => SchemaEvolution::None,
        });
        if let SchemaSpec::Declared(declared) = &schema
            && declared.field_with_name(RESCUED_DATA).is_ok()
        {
            return Err(SpecError::invalid(
                format!("{field}.schema"),
                format!("`{RESCUED_DATA}` is added by `schema_evolution: rescue`; do not declare it"),
            ));
        }
        let mut schema_sample = SchemaSample::default();
        if let Some(sample) = &raw.schema_sample {
            if let Some(files) = sample.max_files {
                if files == 0 {
                    return Err(SpecError::invalid(format!("{field}.schema_sample.max_files"), "must be at least 1"));
                }
                schema_sample.max_files = files;
            }
            if let Some(bytes) = &sample.max_bytes {
                schema_sample.max_bytes = parse_byte_size(&format!("{field}.schema_sample.max_bytes"), bytes)?;
            }
        }
        let backfill_interval = match raw.backfill_interval.as_deref().map(str::trim) {
            None => Some(DEFAULT_BACKFILL_INTERVAL),
            Some("never") => None,
            Some(text) => Some(humantime::parse_duration(text).map_err(|e| {
                SpecError::invalid(
                    format!("{field}.backfill_interval"),
                    format!("`{text}` is not a duration ({e}); write e.g. `6h` or `1d`, or `never`"),
                )
            })?),
        };
        let storage_options = LocationOptions(option_values(&format!("{field}.storage_options"), raw.storage_options)?);
        Ok(Self {
            location,
            storage_options,
            format: raw.format,
            glob: raw.glob,
            schema,
            max_files_per_batch,
            max_bytes_per_batch,
            allow_overwrites: raw.allow_overwrites,
            csv: raw.csv.unwrap_or_default(),
            on_malformed: raw.on_malformed,
            listing: raw.listing,
            backfill_interval,
            schema_hints,
            schema_evolution,
            schema_sample,
        })
    }
}

impl SinkSpec {
    fn from_raw(raw: RawSink, field: &str, base_dir: Option<&Path>, cdf_source: bool) -> Result<Self, SpecError> {
        let table = parse_location(&format!("{field}.table"), &raw.table, base_dir)?;
        for (index, column) in raw.partition_by.iter().enumerate() {
            if column.trim().is_empty() || raw.partition_by[..index].contains(column) {
                return Err(SpecError::invalid(
                    format!("{field}.partition_by[{index}]"),
                    format!("`{column}` is empty or repeated"),
                ));
            }
        }
        let merge = merge_spec(&raw, field, cdf_source)?;
        let properties = option_values(&format!("{field}.properties"), raw.properties)?;
        let storage_options = LocationOptions(option_values(&format!("{field}.storage_options"), raw.storage_options)?);
        Ok(Self { table, mode: raw.mode, partition_by: raw.partition_by, properties, merge, storage_options })
    }
}

fn merge_spec(raw: &RawSink, field: &str, cdf_source: bool) -> Result<Option<MergeSpec>, SpecError> {
    if raw.mode != SinkMode::Merge {
        let merge_only = [
            ("keys", !raw.keys.is_empty()),
            ("sequence_by", raw.sequence_by.is_some()),
            ("delete_when", raw.delete_when.is_some()),
            ("ignore_null_updates", raw.ignore_null_updates.is_some()),
            ("except_columns", !raw.except_columns.is_empty()),
            ("scd", raw.scd.is_some()),
            ("track_history_columns", !raw.track_history_columns.is_empty()),
            ("replace_rows_per_key", raw.replace_rows_per_key.is_some()),
        ];
        if let Some((key, _)) = merge_only.iter().find(|(_, given)| *given) {
            return Err(SpecError::invalid(format!("{field}.{key}"), "applies to `mode: merge` only"));
        }
        return Ok(None);
    }
    if raw.keys.is_empty() {
        return Err(SpecError::invalid(
            format!("{field}.keys"),
            "a merge sink needs `keys: [..]`, the columns that identify a row",
        ));
    }
    for (index, key) in raw.keys.iter().enumerate() {
        if key.trim().is_empty() || raw.keys[..index].contains(key) {
            return Err(SpecError::invalid(format!("{field}.keys[{index}]"), format!("`{key}` is empty or repeated")));
        }
    }
    let Some(sequence_by) = raw.sequence_by.clone().filter(|s| !s.trim().is_empty()) else {
        return Err(SpecError::invalid(
            format!("{field}.sequence_by"),
            "a merge sink needs `sequence_by: <column>`, the column that orders the changes of a key (for a change data feed: `_commit_version`)",
        ));
    };
    let scd = raw.scd.unwrap_or(1);
    if scd != 1 && scd != 2 {
        return Err(SpecError::invalid(format!("{field}.scd"), "must be 1 (latest row per key) or 2 (history)"));
    }
    if raw.replace_rows_per_key == Some(true) && (scd == 2 || raw.ignore_null_updates == Some(true)) {
        return Err(SpecError::invalid(
            format!("{field}.replace_rows_per_key"),
            "replaces a key's rows as a group: it goes with `scd: 1` and without `ignore_null_updates`",
        ));
    }
    if !raw.track_history_columns.is_empty() && scd != 2 {
        return Err(SpecError::invalid(format!("{field}.track_history_columns"), "applies to `scd: 2` only"));
    }
    for (index, column) in raw.track_history_columns.iter().enumerate() {
        if raw.keys.contains(column) || raw.except_columns.contains(column) || Some(column) == raw.sequence_by.as_ref()
        {
            return Err(SpecError::invalid(
                format!("{field}.track_history_columns[{index}]"),
                format!("`{column}` is a key, the sequence column or an excepted column; list data columns only"),
            ));
        }
    }
    if let Some(column) = raw.except_columns.iter().find(|c| raw.keys.contains(c) || **c == sequence_by) {
        return Err(SpecError::invalid(
            format!("{field}.except_columns"),
            format!("`{column}` is a key or the sequence column; the table needs it"),
        ));
    }
    let delete_when = match &raw.delete_when {
        Some(sql) if sql.trim().is_empty() => {
            return Err(SpecError::invalid(format!("{field}.delete_when"), "is empty"));
        }
        Some(sql) => Some(sql.clone()),
        None if cdf_source => Some(CDF_DELETE_WHEN.to_string()),
        None => None,
    };
    Ok(Some(MergeSpec {
        keys: raw.keys.clone(),
        sequence_by,
        delete_when,
        ignore_null_updates: raw.ignore_null_updates.unwrap_or(false),
        except_columns: raw.except_columns.clone(),
        scd,
        track_history_columns: raw.track_history_columns.clone(),
        replace_rows_per_key: raw.replace_rows_per_key.unwrap_or(false),
    }))
}

fn validate_name(field: &str, name: &str) -> Result<(), SpecError> {
    let valid = !name.is_empty()
        && name.len() <= 128
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if valid {
        Ok(())
    } else {
        Err(SpecError::invalid(
            field,
            format!("`{name}` is not a valid name: use 1 to 128 letters, digits, `_` or `-`"),
        ))
    }
}

fn parse_trigger(value: Option<&serde_yaml::Value>) -> Result<Trigger, SpecError> {
    const ALLOWED: &str = "allowed: `available_now` or `{ interval: 30s }`";
    let Some(value) = value else { return Ok(Trigger::AvailableNow) };
    if value.as_str() == Some("available_now") {
        return Ok(Trigger::AvailableNow);
    }
    let interval = value
        .as_mapping()
        .filter(|m| m.len() == 1)
        .and_then(|m| m.get("interval"))
        .ok_or_else(|| SpecError::invalid("trigger", format!("unknown trigger; {ALLOWED}")))?;
    let text = interval
        .as_str()
        .ok_or_else(|| SpecError::invalid("trigger.interval", "must be a duration such as `30s` or `5m`"))?;
    let duration = humantime::parse_duration(text).map_err(|e| {
        SpecError::invalid("trigger.interval", format!("`{text}` is not a duration ({e}); write e.g. `30s` or `5m`"))
    })?;
    if duration.is_zero() {
        return Err(SpecError::invalid("trigger.interval", "must be longer than zero"));
    }
    Ok(Trigger::Interval(duration))
}

fn parse_byte_size(field: &str, value: &serde_yaml::Value) -> Result<u64, SpecError> {
    let bytes = match value {
        serde_yaml::Value::Number(n) => n.as_u64(),
        serde_yaml::Value::String(s) => s.parse::<bytesize::ByteSize>().ok().map(|b| b.as_u64()),
        _ => None,
    };
    match bytes {
        Some(b) if b > 0 => Ok(b),
        _ => Err(SpecError::invalid(field, "must be a size such as `512MiB`, `1GiB` or a number of bytes")),
    }
}

/// A location as a URL: `scheme://...` as written, a local path as `file://`.
pub fn parse_location(field: &str, text: &str, base_dir: Option<&Path>) -> Result<Url, SpecError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(SpecError::invalid(field, "is empty"));
    }
    if text.contains("://") {
        let url =
            Url::parse(text).map_err(|e| SpecError::invalid(field, format!("`{text}` is not a valid URL: {e}")))?;
        if !SUPPORTED_SCHEMES.contains(&url.scheme()) {
            return Err(SpecError::invalid(
                field,
                format!(
                    "unsupported scheme `{}`; allowed: a local path or {}",
                    url.scheme(),
                    SUPPORTED_SCHEMES.join(", ")
                ),
            ));
        }
        return Ok(url);
    }
    let path = Path::new(text);
    let absolute = match (path.is_absolute(), base_dir) {
        (true, _) => path.to_path_buf(),
        (false, Some(base)) => base.join(path),
        (false, None) => std::env::current_dir().map(|cwd| cwd.join(path)).unwrap_or_else(|_| path.to_path_buf()),
    };
    Url::from_directory_path(normalize(&absolute))
        .map_err(|()| SpecError::invalid(field, format!("`{text}` cannot be made an absolute path")))
}

/// Removes `.` and `..` components without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
pipeline: retail
checkpoint: ./lake/_checkpoints/retail
trigger: { interval: 30s }
flows:
  - name: invoices_bronze
    source:
      files:
        path: ./landing/invoices
        format: json
        glob: "*.json"
        schema: "InvoiceNumber STRING, CreatedTime BIGINT"
        max_files_per_batch: 10
        max_bytes_per_batch: 1GiB
    transform: SELECT * FROM source
    sink:
      table: ./lake/bronze/invoices
      partition_by: [StoreID]
      properties: { delta.appendOnly: true }
"#;

    fn error_of(yaml: &str) -> String {
        parse_pipeline(yaml, Some(Path::new("/base"))).unwrap_err().to_string()
    }

    #[test]
    fn parses_a_complete_file() {
        let spec = parse_pipeline(GOOD, Some(Path::new("/base/dir"))).unwrap();
        assert_eq!(spec.trigger, Trigger::Interval(Duration::from_secs(30)));
        assert_eq!(spec.checkpoint.as_str(), "file:///base/dir/lake/_checkpoints/retail/");
        let flow = &spec.flows[0];
        let files = flow.files_source().unwrap();
        assert_eq!(files.max_bytes_per_batch, Some(1 << 30));
        assert_eq!(files.location.path(), "/base/dir/landing/invoices/");
        assert_eq!(flow.sink.properties["delta.appendOnly"], "true");
        assert_eq!(flow.app_id(&spec.name), "sluice:retail/invoices_bronze");
    }

    #[test]
    fn listing_and_backfill_interval() {
        let files = |yaml: &str| parse_pipeline(yaml, None).unwrap().flows[0].files_source().unwrap().clone();
        let default = files(GOOD);
        assert_eq!((default.listing, default.backfill_interval), (Listing::Auto, Some(DEFAULT_BACKFILL_INTERVAL)));
        let set =
            files(&GOOD.replace(
                "format: json",
                "format: json\n        listing: incremental\n        backfill_interval: never",
            ));
        assert_eq!((set.listing, set.backfill_interval), (Listing::Incremental, None));
        let set = files(&GOOD.replace("format: json", "format: json\n        backfill_interval: 6h"));
        assert_eq!(set.backfill_interval, Some(Duration::from_secs(6 * 3600)));
        let err = error_of(&GOOD.replace("format: json", "format: json\n        backfill_interval: soon"));
        assert!(err.contains("flows[0].source.files.backfill_interval") && err.contains("`never`"), "{err}");
        let err = error_of(&GOOD.replace("format: json", "format: json\n        listing: sometimes"));
        assert!(err.contains("`auto`, `incremental`, `full`"), "{err}");
    }

    #[test]
    fn unknown_keys_are_named_with_the_allowed_ones() {
        let err = error_of(&GOOD.replace("glob:", "globb:"));
        assert!(err.contains("flows[0].source.files") && err.contains("unknown field `globb`"), "{err}");
        assert!(err.contains("expected one of"), "{err}");
    }

    #[test]
    fn bad_values_name_the_field() {
        let err = error_of(&GOOD.replace("format: json", "format: xml"));
        assert!(err.contains("flows[0].source.files.format") && err.contains("`json`, `csv`, `parquet`"), "{err}");
        let err = error_of(&GOOD.replace("interval: 30s", "interval: soon"));
        assert!(err.contains("trigger.interval"), "{err}");
        let err = error_of(&GOOD.replace("1GiB", "lots"));
        assert!(err.contains("max_bytes_per_batch"), "{err}");
        let err = error_of(&GOOD.replace("BIGINT", "BIGNUM"));
        assert!(err.contains("flows[0].source.files.schema") && err.contains("unknown type `BIGNUM`"), "{err}");
        let err = error_of(&GOOD.replace("./landing/invoices", "ftp://host/x"));
        assert!(err.contains("unsupported scheme `ftp`"), "{err}");
        let err = error_of(&GOOD.replace("pipeline: retail", "pipeline: re tail"));
        assert!(err.contains("pipeline: `re tail` is not a valid name"), "{err}");
        let err =
            error_of(&GOOD.replace("mode: append", "").replace("partition_by", "mode: upsert\n      partition_by"));
        assert!(err.contains("unknown variant `upsert`") && err.contains("`merge`"), "{err}");
    }

    const MEDALLION: &str = r#"
pipeline: retail
checkpoint: /lake/_checkpoints
flows:
  - name: gold
    source: { delta: { table: "flow:silver" } }
    transform: SELECT StoreID, count(*) AS n FROM source GROUP BY StoreID
    sink: { table: /lake/gold, mode: overwrite }
  - name: silver
    source: { delta_changes: { table: "flow:bronze" } }
    sink:
      table: /lake/silver
      mode: merge
      keys: [InvoiceNumber]
      sequence_by: CreatedTime
      except_columns: [_change_type]
  - name: bronze
    source: { files: { path: /landing, format: json } }
    sink: { table: /lake/bronze }
"#;

    #[test]
    fn engine_and_tables_are_checked() {
        let gold = MEDALLION.replace(
            "    transform: SELECT StoreID",
            "    engine: ballista\n    tables: { stores: /lake/stores }\n    transform: SELECT StoreID",
        );
        let spec = parse_pipeline(&gold, None).unwrap();
        assert_eq!(spec.flows[0].engine, Engine::Ballista);
        assert_eq!(spec.flows[0].tables["stores"].as_str(), "file:///lake/stores/");
        assert_eq!(spec.flows[1].engine, Engine::Auto, "auto by default");
        let err = error_of(&gold.replace("engine: ballista", "engine: spark"));
        assert!(err.contains("engine") && err.contains("auto") && err.contains("ballista"), "{err}");
        let err =
            error_of(&MEDALLION.replace(
                "    sink: { table: /lake/bronze }",
                "    engine: ballista\n    sink: { table: /lake/bronze }",
            ));
        assert!(err.contains("flows[2].engine") && err.contains("`delta:` source"), "{err}");
        let err = error_of(&MEDALLION.replace(
            "    sink: { table: /lake/bronze }",
            "    tables: { stores: /lake/stores }\n    sink: { table: /lake/bronze }",
        ));
        assert!(err.contains("flows[2].tables") && err.contains("flow over files"), "{err}");
        let err = error_of(&gold.replace("stores: /lake/stores", "source: /lake/stores"));
        assert!(err.contains("`source` is the flow's own source"), "{err}");
        let err = error_of(&gold.replace("stores: /lake/stores", "stores: \"flow:silver\""));
        assert!(err.contains("takes a table's location"), "{err}");
    }

    #[test]
    fn flow_references_resolve_and_order_the_flows() {
        let spec = parse_pipeline(MEDALLION, None).unwrap();
        let order: Vec<&str> = spec.dependency_order().iter().map(|&i| spec.flows[i].name.as_str()).collect();
        assert_eq!(order, ["bronze", "silver", "gold"]);
        let SourceSpec::DeltaChanges(changes) = &spec.flows[1].source else { panic!("a change feed source") };
        assert_eq!(changes.table.url.as_str(), "file:///lake/bronze/");
        assert_eq!(changes.table.upstream.as_deref(), Some("bronze"));
        let merge = spec.flows[1].sink.merge.as_ref().unwrap();
        assert_eq!(merge.delete_when.as_deref(), Some(CDF_DELETE_WHEN));
        assert_eq!(merge.scd, 1);
    }

    #[test]
    fn broken_graphs_and_merge_options_are_named() {
        let err = error_of(&MEDALLION.replace("flow:silver", "flow:silverr"));
        assert!(err.contains("flows[0].source.table") && err.contains("`flow:silverr` names no flow"), "{err}");
        let err = error_of(
            &MEDALLION.replace("{ files: { path: /landing, format: json } }", "{ delta: { table: \"flow:gold\" } }"),
        );
        assert!(err.contains("cycle") && err.contains("gold -> silver -> bronze -> gold"), "{err}");
        let err = error_of(&MEDALLION.replace("keys: [InvoiceNumber]", ""));
        assert!(err.contains("flows[1].sink.keys") && err.contains("needs `keys"), "{err}");
        let err = error_of(&MEDALLION.replace("sequence_by: CreatedTime", ""));
        assert!(err.contains("flows[1].sink.sequence_by"), "{err}");
        let err = error_of(&MEDALLION.replace("mode: overwrite", "mode: overwrite, keys: [a]"));
        assert!(err.contains("flows[0].sink.keys") && err.contains("`mode: merge` only"), "{err}");
        let err = error_of(&MEDALLION.replace(
            "{ delta: { table: \"flow:silver\" } }",
            "{ delta: { table: /x }, files: { path: /y, format: csv } }",
        ));
        assert!(err.contains("flows[0].source") && err.contains("only one of"), "{err}");
        let history =
            MEDALLION.replace("except_columns: [_change_type]", "except_columns: [_change_type]\n      scd: 2");
        let spec =
            parse_pipeline(&history.replace("scd: 2", "scd: 2\n      track_history_columns: [Total]"), None).unwrap();
        assert_eq!(
            spec.flows[1].sink.merge.as_ref().map(|m| (m.scd, m.track_history_columns.clone())),
            Some((2, vec!["Total".to_string()]))
        );
        let err = error_of(&history.replace("scd: 2", "scd: 3"));
        assert!(err.contains("flows[1].sink.scd") && err.contains("1 (latest row per key) or 2"), "{err}");
        let err = error_of(&history.replace("scd: 2", "scd: 1\n      track_history_columns: [Total]"));
        assert!(err.contains("flows[1].sink.track_history_columns") && err.contains("`scd: 2` only"), "{err}");
        let err = error_of(&history.replace("scd: 2", "scd: 2\n      track_history_columns: [CreatedTime]"));
        assert!(err.contains("track_history_columns[0]") && err.contains("sequence column"), "{err}");
        let spec = parse_pipeline(&history.replace("scd: 2", "scd: 2\n      ignore_null_updates: true"), None).unwrap();
        assert!(spec.flows[1].sink.merge.as_ref().is_some_and(|m| m.ignore_null_updates && m.scd == 2));
    }

    #[test]
    fn watermark_sources_parse_values_and_refuse_a_lag_on_append() {
        let pipeline = |source: &str, sink: &str| {
            format!(
                "pipeline: p\ncheckpoint: /c\nflows:\n  - name: f\n    source: {{ watermark: {source} }}\n    sink: {sink}\n"
            )
        };
        let merge = "{ table: /t, mode: merge, keys: [id], sequence_by: at }";
        let spec =
            parse_pipeline(&pipeline("{ table: /s, column: at, initial_value: 2026-01-31, lag: 10m }", merge), None)
                .unwrap();
        let SourceSpec::Watermark(w) = &spec.flows[0].source else { panic!("a watermark source") };
        assert_eq!(w.initial_value, Some(WatermarkValue::Micros(1_769_817_600_000_000)));
        assert_eq!(w.lag, Some(WatermarkValue::Micros(600_000_000)));
        let spec =
            parse_pipeline(&pipeline("{ table: /s, column: at, initial_value: 7, lag: \"3\" }", merge), None).unwrap();
        let SourceSpec::Watermark(w) = &spec.flows[0].source else { panic!("a watermark source") };
        assert_eq!((w.initial_value, w.lag), (Some(WatermarkValue::Number(7)), Some(WatermarkValue::Number(3))));
        let err = error_of(&pipeline("{ table: /s, column: at, lag: 10m }", "{ table: /t }"));
        assert!(err.contains("flows[0].source.watermark.lag") && err.contains("mode: merge"), "{err}");
        let err = error_of(&pipeline("{ table: /s, column: at, lag: soon }", merge));
        assert!(err.contains("watermark.lag") && err.contains("a duration"), "{err}");
        // A folder of files instead of a table, with a files source's keys.
        let spec =
            parse_pipeline(&pipeline("{ files: { path: /in, format: csv }, column: at }", "{ table: /t }"), None)
                .unwrap();
        let files = spec.flows[0].source.files().expect("a folder");
        assert_eq!((files.location.as_str(), files.format), ("file:///in/", Format::Csv));
        assert!(spec.flows[0].source.table().is_none());
        for both_or_neither in ["{ files: { path: /in, format: csv }, table: /s, column: at }", "{ column: at }"] {
            let err = error_of(&pipeline(both_or_neither, "{ table: /t }"));
            assert!(err.contains("needs either `table:`") && err.contains("`files:`"), "{err}");
        }
    }

    #[test]
    fn trigger_defaults_to_available_now() {
        let spec = parse_pipeline(&GOOD.replace("trigger: { interval: 30s }", ""), None).unwrap();
        assert_eq!(spec.trigger, Trigger::AvailableNow);
        let err = error_of(&GOOD.replace("{ interval: 30s }", "sometimes"));
        assert!(err.contains("available_now"), "{err}");
    }
}
