//! Runs one flow: recover, discover, plan, execute through workers, commit.
//!
//! The order of durable steps is what makes a batch exactly-once (see
//! `docs/DESIGN.md`): the plan is written to the checkpoint before any task
//! runs; the Delta commit carries the flow's txn; the ledger entry is written
//! after the commit. On start, a plan without a ledger entry is checked against
//! the table's txn: committed plans get their ledger entry, and the one
//! uncommitted plan is run again with the same files.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use arrow::datatypes::{Field, Schema, SchemaRef};
use deltalake::DeltaTable;
use deltalake::kernel::{Add, AddCDCFile, Remove, StructType};
use futures::{StreamExt, TryStreamExt};
use sluice_proto::keys::Keys;
use sluice_proto::kv::KvStore;
use sluice_proto::queue::{QueueError, TaskQueue};
use sluice_proto::schema_ddl::to_ddl;
use sluice_proto::spec::{Engine, FilesSource, FlowSpec, Listing, SchemaEvolution, SchemaSpec, SinkMode, SourceSpec};
use sluice_proto::storage::StorageOptions;
use sluice_proto::task::{
    BallistaRun, MergeCounts, MergeTask, NamedTable, NewColumns, Quality, SourceFile, TaskFailure, TaskId, TaskOutcome,
    TaskResult, TaskSpec,
};
use sluice_proto::timing::LeaseTimings;
use sluice_worker::expectations::Expectations;
use sluice_worker::failpoint;
use sluice_worker::formats::{infer_schema, with_hints, with_new_fields};
use sluice_worker::history;
use sluice_worker::merge::check_merge_columns;
use sluice_worker::metadata::with_metadata_field;
use sluice_worker::quarantine;
use sluice_worker::rescue::with_rescued_column;
use sluice_worker::transform;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::checkpoint::{BatchPlan, Checkpoint, CommitRecord, ListingRecord, SchemaRecord};
use crate::commit::{BatchCommit, CommitKind, CommitOutcome, commit_batch, committed_batch, load_table};
use crate::discovery::{Ledger, head_file, list_source, sort_oldest_first};
use crate::error::CoordinatorError;
use crate::planner::{next_batch, split_into_tasks};
use crate::progress::{BatchReport, FlowSummary, ProgressEvent, ProgressSink};
use crate::table_schema::{check_appendable, to_delta};

/// A check that this process still holds the right to commit (a cluster
/// coordinator's leadership). Embedded runs have none.
#[async_trait::async_trait]
pub trait CommitFence: Send + Sync {
    /// `Err` with the reason when this process must not commit (now).
    async fn check(&self) -> Result<(), FenceError>;
}

#[derive(Debug, Clone)]
pub struct FenceError {
    pub message: String,
    /// True when the right to commit could not be confirmed (the store did not
    /// answer), rather than being known to be lost.
    pub retryable: bool,
}

/// How long a commit waits for the fence to confirm before the batch fails (and is retried).
const FENCE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// A task that failed with a retryable error is handed out this many times in all.
pub const MAX_TASK_ATTEMPTS: u32 = 3;

/// What a flow runner needs from its surroundings.
#[derive(Clone)]
pub struct FlowContext {
    pub pipeline: String,
    pub flow: FlowSpec,
    /// The object-store options of the pipeline's locations.
    pub storage: StorageOptions,
    pub checkpoint: Arc<Checkpoint>,
    pub kv: Arc<dyn KvStore>,
    pub keys: Keys,
    /// Worker slots available, for splitting batches into tasks (live: a cluster's
    /// coordinator updates it as workers come and go).
    pub parallelism: Arc<AtomicUsize>,
    /// Asked right before each commit whether this process may still commit.
    pub fence: Option<Arc<dyn CommitFence>>,
    pub timings: LeaseTimings,
    pub progress: ProgressSink,
    /// The cluster's Ballista scheduler, for transforms that need a shuffle
    /// (`None` in the embedded runtime, which runs every transform locally).
    pub query: Option<Arc<QueryCluster>>,
}

/// One of a flow's `tables:` at the version a batch reads, and its schema.
pub(crate) struct PinnedTable {
    pub named: NamedTable,
    pub schema: SchemaRef,
}

/// Each pinned table's name and schema, as a transform is planned over them.
fn schemas_of(tables: &[PinnedTable]) -> Vec<(String, SchemaRef)> {
    tables.iter().map(|t| (t.named.name.clone(), t.schema.clone())).collect()
}

/// What a cluster's leader knows of its query engine, for flows deciding
/// where a transform runs.
#[derive(Debug)]
pub struct QueryCluster {
    /// The Ballista scheduler's address, `host:port`.
    pub scheduler: String,
    /// Workers registered now that run a Ballista executor.
    pub workers: AtomicUsize,
}

impl QueryCluster {
    pub fn new(scheduler: String) -> Self {
        Self { scheduler, workers: AtomicUsize::new(0) }
    }

    pub fn live_workers(&self) -> usize {
        self.workers.load(Ordering::Relaxed)
    }
}

/// How many full listings in a row must find their new files above the
/// greatest key ingested before `listing: auto` lists incrementally.
pub const ORDERED_LISTINGS_FOR_AUTO: u32 = 3;

/// A listing of the source, and whether it started after the greatest key ingested.
struct Listed {
    files: Vec<SourceFile>,
    incremental: bool,
}

/// The flow's progress as recovered from the checkpoint and the table.
struct FlowState {
    ledger: Ledger,
    next_batch: u64,
    /// A planned batch that is not committed yet: it runs next, with the same files.
    pending: Option<BatchPlan>,
    schema: Option<SchemaRecord>,
}

pub struct FlowRunner {
    ctx: FlowContext,
    source: FilesSource,
    state: Option<FlowState>,
    warned_rewrites: HashSet<SourceFile>,
    /// When the source was last listed in full, and what that showed (read
    /// from the checkpoint once, then kept up to date).
    listing_record: Option<Option<ListingRecord>>,
}

impl FlowRunner {
    /// A runner for a flow with a `files:` source.
    pub fn new(ctx: FlowContext, source: FilesSource) -> Self {
        Self { ctx, source, state: None, warned_rewrites: HashSet::new(), listing_record: None }
    }

    fn flow(&self) -> &str {
        self.ctx.flow_name()
    }

    /// Runs batches until every file listed at the start is committed, or `cancel`
    /// is set (checked between batches).
    pub async fn run_until_caught_up(
        &mut self,
        cancel: &CancellationToken,
        summary: &mut FlowSummary,
    ) -> Result<(), CoordinatorError> {
        let mut state = match self.state.take() {
            Some(state) => state,
            None => {
                let state = self.load_state().await?;
                if let Some(record) = &state.schema {
                    self.schema_event(record);
                }
                state
            }
        };
        let source = self.source.clone();
        let listed = self.list(&state).await?;
        if let Some(plan) = state.pending.take()
            && let Some(plan) = self.refresh_pending_plan(plan, &listed).await?
        {
            self.run_and_record(&plan, &mut state, summary, true).await?;
        }
        let discovered = state.ledger.compare(listed.files);
        let mut new = discovered.new;
        for file in discovered.rewritten {
            if source.allow_overwrites {
                new.push(file);
            } else if self.warned_rewrites.insert(file.clone()) {
                info!(flow = self.flow(), file = %file.url, "file changed after it was ingested; skipping it (set allow_overwrites: true to ingest it again)");
                self.ctx
                    .progress
                    .send(ProgressEvent::RewrittenFileSkipped { flow: self.flow().to_string(), file: file.url });
            }
        }
        sort_oldest_first(&mut new);
        self.ctx.progress.send(ProgressEvent::Discovered {
            flow: self.flow().to_string(),
            files: new.len() as u64,
            bytes: new.iter().map(|f| f.size).sum(),
        });
        while !new.is_empty() && !cancel.is_cancelled() {
            let files = next_batch(&new, source.max_files_per_batch, source.max_bytes_per_batch);
            let planned = BatchPlan { batch: state.next_batch, files, planned_at_us: now_us() };
            let plan = self.ctx.checkpoint.create_plan(self.flow(), &planned).await?;
            let foreign = plan != planned;
            if foreign {
                warn!(flow = self.flow(), batch = plan.batch, "another run planned this batch first; running its plan");
            }
            self.run_and_record(&plan, &mut state, summary, foreign).await?;
            // Drop what this batch ingested (its files may differ from ours if another run planned it).
            new.retain(|file| !state.ledger.contains(file));
        }
        self.state = Some(state);
        self.ctx.progress.send(ProgressEvent::FlowCaughtUp { flow: self.flow().to_string() });
        Ok(())
    }

    /// Lists the source: incrementally (after the greatest key ingested) when
    /// [`Self::listing_offset`] says so, in full otherwise. A full listing is
    /// recorded in the checkpoint with what it showed of the keys' order.
    async fn list(&mut self, state: &FlowState) -> Result<Listed, CoordinatorError> {
        let record = match &self.listing_record {
            Some(record) => record.clone(),
            None => self.listing_record.insert(self.ctx.checkpoint.last_full_listing(self.flow()).await?).clone(),
        };
        let offset = self.listing_offset(state, record.as_ref());
        let started = Instant::now();
        let files = list_source(self.flow(), &self.source, &self.ctx.storage, offset.as_ref()).await?;
        let seconds = started.elapsed().as_secs_f64();
        let kind = if offset.is_some() { "incremental" } else { "full" };
        let (pipeline, flow) = (self.ctx.pipeline.clone(), self.flow().to_string());
        metrics::histogram!(sluice_worker::telemetry::LISTING_SECONDS, "pipeline" => pipeline, "flow" => flow, "listing" => kind)
            .record(seconds);
        debug!(flow = self.flow(), listing = kind, files = files.len(), seconds, "source listed");
        // Recorded only where it can lead to incremental listings: no write a
        // round for a source that is listed in full for good.
        if offset.is_none() && self.may_list_incrementally(&state.ledger) {
            let mut ordered_listings = record.as_ref().map_or(0, |r| r.ordered_listings);
            match state.ledger.new_keys_in_order(&files) {
                Some(true) => ordered_listings += 1,
                Some(false) => ordered_listings = 0,
                None => {}
            }
            let record = ListingRecord { full_listing_at_ms: now_ms(), ordered_listings };
            self.ctx.checkpoint.record_full_listing(self.flow(), &record).await?;
            self.listing_record = Some(Some(record));
        }
        Ok(Listed { files, incremental: offset.is_some() })
    }

    /// Where the next listing starts: after the greatest key ingested when keys
    /// are known to arrive in lexical order, unless a backfill (a full listing)
    /// is due; `None` for a full listing. `listing: incremental` takes the
    /// order on trust; `auto` wants the evidence: a ledger whose every batch
    /// came after the ones before, and [`ORDERED_LISTINGS_FOR_AUTO`] full
    /// listings in a row whose new files all lay above the greatest key
    /// ingested, and no `allow_overwrites` (only full listings see rewrites).
    fn listing_offset(&self, state: &FlowState, record: Option<&ListingRecord>) -> Option<object_store::path::Path> {
        let last_key = state.ledger.last_key()?;
        let evidence = || record.is_some_and(|r| r.ordered_listings >= ORDERED_LISTINGS_FOR_AUTO);
        let incremental =
            self.may_list_incrementally(&state.ledger) && (self.source.listing == Listing::Incremental || evidence());
        if !incremental {
            return None;
        }
        if let Some(interval) = self.source.backfill_interval {
            let due =
                record.is_none_or(|r| now_ms().saturating_sub(r.full_listing_at_ms) >= interval.as_millis() as i64);
            if due {
                info!(flow = self.flow(), "backfill: listing the whole source (backfill_interval)");
                return None;
            }
        }
        Some(last_key.clone())
    }

    /// Whether this source can be listed incrementally at all: `incremental`,
    /// or `auto` without `allow_overwrites` and with an ordered ledger.
    fn may_list_incrementally(&self, ledger: &Ledger) -> bool {
        match self.source.listing {
            Listing::Full => false,
            Listing::Incremental => true,
            Listing::Auto => !self.source.allow_overwrites && ledger.ordered(),
        }
    }

    async fn run_and_record(
        &mut self,
        plan: &BatchPlan,
        state: &mut FlowState,
        summary: &mut FlowSummary,
        resumed: bool,
    ) -> Result<(), CoordinatorError> {
        let before = state.schema.as_ref().map(|r| r.version);
        let report = self.run_batch(plan, state, resumed).await?;
        if let Some(record) = &state.schema {
            summary.schema_version = Some(record.version);
            if before.is_some_and(|v| v < record.version) {
                summary.schema_added.extend(record.added.iter().cloned());
            }
        }
        state.ledger.record(&plan.files);
        state.next_batch = plan.batch + 1;
        summary.add(&report);
        self.ctx.progress.send(ProgressEvent::BatchCommitted(report));
        Ok(())
    }

    /// Rebuilds the flow's state from the checkpoint and the table's txn, repairing
    /// ledger entries that a crash after the commit left out.
    async fn load_state(&self) -> Result<FlowState, CoordinatorError> {
        let checkpoint = &self.ctx.checkpoint;
        let plans = checkpoint.plans(self.flow()).await?;
        let commits = checkpoint.commits(self.flow()).await?;
        let txn = self.ctx.committed(self.ctx.target().await?.as_ref()).await?;
        let mut ledger = Ledger::default();
        let mut pending: Option<BatchPlan> = None;
        for plan in &plans {
            let committed = commits.contains_key(&plan.batch) || txn.is_some_and(|t| t >= plan.batch);
            if !committed {
                if let Some(earlier) = &pending {
                    return Err(CoordinatorError::Checkpoint {
                        location: self.ctx.flow.sink.table.to_string(),
                        message: format!(
                            "batches {} and {} of flow `{}` are both planned and uncommitted; the checkpoint does not belong to this table",
                            earlier.batch,
                            plan.batch,
                            self.flow()
                        ),
                    });
                }
                pending = Some(plan.clone());
                continue;
            }
            if !commits.contains_key(&plan.batch) {
                info!(
                    flow = self.flow(),
                    batch = plan.batch,
                    "batch is in the table but not in the ledger; recording it"
                );
                let record = CommitRecord {
                    batch: plan.batch,
                    delta_version: None,
                    files: plan.files.len() as u64,
                    rows: None,
                    bytes: plan.bytes(),
                };
                checkpoint.record_commit(self.flow(), &record).await?;
            }
            ledger.record(&plan.files);
        }
        let after_plans = plans.last().map_or(1, |p| p.batch + 1);
        let after_txn = txn.map_or(1, |t| t + 1);
        let schema = checkpoint.latest_schema(self.flow()).await?;
        info!(
            flow = self.flow(),
            ingested_files = ledger.len(),
            pending = pending.as_ref().map(|p| p.batch),
            "flow state recovered"
        );
        Ok(FlowState { ledger, next_batch: after_plans.max(after_txn), pending, schema })
    }

    /// Brings an uncommitted plan up to date with the source before it runs again.
    /// A file deleted meanwhile is left out (it cannot be read; with no file left
    /// the plan is withdrawn). A file changed meanwhile, typically fixed after its
    /// batch failed, keeps its place under its new identity: that is what will be
    /// read, and what the ledger must remember.
    async fn refresh_pending_plan(
        &self,
        plan: BatchPlan,
        listed: &Listed,
    ) -> Result<Option<BatchPlan>, CoordinatorError> {
        let mut current: HashMap<String, SourceFile> =
            listed.files.iter().map(|f| (f.url.clone(), f.clone())).collect();
        if listed.incremental {
            // An incremental listing may not reach the plan's files: look them up one by one.
            let lookups: Vec<_> = plan
                .files
                .iter()
                .filter(|f| !current.contains_key(&f.url))
                .map(|file| {
                    let (url, storage) = (file.url.clone(), self.ctx.storage.clone());
                    async move { head_file(&url, &storage).await }
                })
                .collect();
            let found: Vec<Option<SourceFile>> =
                futures::stream::iter(lookups).buffer_unordered(16).try_collect().await.map_err(|message| {
                    CoordinatorError::SourceListing {
                        flow: self.flow().to_string(),
                        path: self.source.location.to_string(),
                        message,
                    }
                })?;
            current.extend(found.into_iter().flatten().map(|f| (f.url.clone(), f)));
        }
        let mut refreshed = BatchPlan { files: Vec::with_capacity(plan.files.len()), ..plan.clone() };
        for file in &plan.files {
            match current.get(file.url.as_str()) {
                Some(now) => refreshed.files.push(now.clone()),
                None => {
                    info!(flow = self.flow(), batch = plan.batch, file = %file.url, "file of an uncommitted batch was deleted; it is left out");
                    let event = ProgressEvent::PlannedFileVanished {
                        flow: self.flow().to_string(),
                        batch: plan.batch,
                        file: file.url.clone(),
                    };
                    self.ctx.progress.send(event);
                }
            }
        }
        if refreshed == plan {
            return Ok(Some(plan));
        }
        if refreshed.files.is_empty() {
            self.ctx.checkpoint.delete_plan(self.flow(), plan.batch).await?;
            return Ok(None);
        }
        self.ctx.checkpoint.replace_plan(self.flow(), &refreshed).await?;
        Ok(Some(refreshed))
    }

    /// The schema version files are decoded into: the one in the checkpoint, or
    /// for the first batch the declared schema or one inferred from the batch's
    /// files (with the hints applied). A declaration changed in the pipeline
    /// file starts a new version. `None` while there is nothing to infer from.
    async fn settle_schema(
        &self,
        state: &mut FlowState,
        plan: &BatchPlan,
    ) -> Result<Option<SchemaRecord>, CoordinatorError> {
        let source = &self.source;
        let declared = match &source.schema {
            SchemaSpec::Declared(schema) => Some(schema.as_ref().clone()),
            SchemaSpec::Infer => None,
        };
        if let Some(record) = &state.schema
            && (declared.is_none() || record.declared == declared)
        {
            return Ok(Some(record.clone()));
        }
        let (schema, origin) = match &declared {
            Some(schema) => (schema.clone(), "declared"),
            None => {
                let inferred =
                    infer_schema(&plan.files, source.format, &source.csv, source.schema_sample, &self.ctx.storage)
                        .await
                        .map_err(|e| CoordinatorError::Worker { flow: self.flow().to_string(), source: e.into() })?;
                if inferred.fields().is_empty() {
                    return Ok(None);
                }
                let hinted = match &source.schema_hints {
                    Some(hints) => with_hints(&inferred, hints),
                    None => inferred,
                };
                info!(flow = self.flow(), columns = hinted.fields().len(), "schema inferred from the first batch");
                (hinted, "inferred")
            }
        };
        let record = SchemaRecord {
            version: state.schema.as_ref().map_or(1, |r| r.version + 1),
            schema,
            origin: origin.to_string(),
            declared,
            added: Vec::new(),
            file: None,
            batch: Some(plan.batch),
        };
        let record = self.ctx.checkpoint.record_schema(self.flow(), &record).await?;
        self.schema_event(&record);
        state.schema = Some(record.clone());
        Ok(Some(record))
    }

    fn schema_event(&self, record: &SchemaRecord) {
        self.ctx.progress.send(ProgressEvent::SchemaVersion {
            flow: self.flow().to_string(),
            version: record.version,
            origin: record.origin.clone(),
            added: record.added.clone(),
            file: record.file.clone(),
            schema: to_ddl(&record.schema),
        });
    }

    /// The schema files are decoded into for a schema version: with
    /// `_rescued_data` in `rescue` mode.
    fn decode_schema(&self, record: &SchemaRecord) -> SchemaRef {
        match self.source.schema_evolution {
            SchemaEvolution::Rescue => Arc::new(with_rescued_column(&record.schema)),
            _ => Arc::new(record.schema.clone()),
        }
    }

    async fn run_batch(
        &self,
        plan: &BatchPlan,
        state: &mut FlowState,
        resumed: bool,
    ) -> Result<BatchReport, CoordinatorError> {
        let started = Instant::now();
        let flow = self.flow().to_string();
        let record = self.settle_schema(state, plan).await?;
        let Some(record) = record else {
            // Only empty files so far, and no schema to infer from: nothing to write.
            let record = CommitRecord {
                batch: plan.batch,
                delta_version: None,
                files: plan.files.len() as u64,
                rows: Some(0),
                bytes: plan.bytes(),
            };
            self.ctx.checkpoint.record_commit(&flow, &record).await?;
            return Ok(BatchReport {
                flow,
                batch: plan.batch,
                files: record.files,
                rows: 0,
                bytes: record.bytes,
                seconds: 0.0,
                version: None,
                source_versions: None,
                merge: None,
                quality: None,
            });
        };
        let source_schema = self.decode_schema(&record);
        let target = self.ctx.target().await?;
        let (table_schema, delta_schema) = self.sink_schema(&source_schema, target.as_ref()).await?;
        let tasks = self.tasks_for(plan, &source_schema, &table_schema, target.as_ref());
        self.ctx.progress.send(ProgressEvent::BatchStarted {
            flow: flow.clone(),
            batch: plan.batch,
            files: plan.files.len() as u64,
            bytes: plan.bytes(),
            tasks: tasks.len(),
            resumed,
            source_versions: None,
        });
        info!(flow, batch = plan.batch, files = plan.files.len(), tasks = tasks.len(), resumed, "batch started");
        let work = BatchWork {
            batch: plan.batch,
            tasks,
            delta_schema,
            follows: None,
            info: commit_info(&self.ctx.pipeline, &flow, plan.batch, plan.files.len() as u64, plan.bytes()),
        };
        let mut evolver = Evolver { runner: self, state, batch: plan.batch };
        let Committed { version, rows, merge, quality, .. } =
            self.ctx.execute_and_commit(work, Some(&mut evolver)).await?;
        let record = CommitRecord {
            batch: plan.batch,
            delta_version: version,
            files: plan.files.len() as u64,
            rows: Some(rows),
            bytes: plan.bytes(),
        };
        self.ctx.checkpoint.record_commit(&flow, &record).await?;
        let seconds = started.elapsed().as_secs_f64();
        info!(flow, batch = plan.batch, rows, version, seconds, "batch committed");
        Ok(BatchReport {
            flow,
            batch: plan.batch,
            files: record.files,
            rows,
            bytes: record.bytes,
            seconds,
            version,
            source_versions: None,
            merge,
            quality: (!quality.is_empty()).then_some(quality),
        })
    }

    /// The sink's schema (Arrow, Delta) for rows decoded into `source_schema`.
    async fn sink_schema(
        &self,
        source_schema: &SchemaRef,
        target: Option<&DeltaTable>,
    ) -> Result<(Schema, StructType), CoordinatorError> {
        let relation = with_metadata_field(source_schema)
            .map_err(|e| CoordinatorError::Schema { flow: self.flow().to_string(), message: e.to_string() })?;
        self.ctx.table_schema(&relation, &[], target).await
    }

    fn tasks_for(
        &self,
        plan: &BatchPlan,
        source_schema: &SchemaRef,
        table_schema: &Schema,
        target: Option<&DeltaTable>,
    ) -> Vec<TaskSpec> {
        let merge = self.ctx.merge_task(target);
        self.ctx.file_tasks(
            plan.batch,
            &plan.files,
            &self.source,
            source_schema,
            table_schema,
            merge,
            plan.planned_at_us,
        )
    }
}

/// Adds the columns workers found to a batch's schema, as a new schema version.
struct Evolver<'a> {
    runner: &'a FlowRunner,
    state: &'a mut FlowState,
    batch: u64,
}

/// The schemas a batch's tasks run again with after new columns were added.
pub(crate) struct Evolved {
    pub source_schema: Schema,
    pub table_schema: Schema,
    pub delta_schema: StructType,
}

#[async_trait::async_trait]
pub(crate) trait EvolveSchema: Send {
    async fn evolve(&mut self, found: &[NewColumns]) -> Result<Evolved, CoordinatorError>;
}

#[async_trait::async_trait]
impl EvolveSchema for Evolver<'_> {
    async fn evolve(&mut self, found: &[NewColumns]) -> Result<Evolved, CoordinatorError> {
        let runner = self.runner;
        let flow = runner.flow().to_string();
        let Some(current) = self.state.schema.clone() else {
            return Err(CoordinatorError::Schema { flow, message: "new columns before any schema".to_string() });
        };
        let mut schema = current.schema.clone();
        let mut added = Vec::new();
        for columns in found {
            let (evolved, names) = with_new_fields(&schema, &columns.observed);
            schema = evolved;
            added.extend(names);
        }
        if added.is_empty() {
            let first = &found[0];
            return Err(CoordinatorError::Schema {
                flow,
                message: format!(
                    "{} has column(s) {} that the schema lacks, but their type could not be inferred from the file; \
                     declare them in `schema_hints` or `schema`",
                    first.file,
                    first.columns.join(", ")
                ),
            });
        }
        let record = SchemaRecord {
            version: current.version + 1,
            schema,
            origin: "evolved".to_string(),
            declared: current.declared.clone(),
            added,
            file: found.first().map(|f| f.file.clone()),
            batch: Some(self.batch),
        };
        let record = runner.ctx.checkpoint.record_schema(runner.flow(), &record).await?;
        info!(flow, version = record.version, added = ?record.added, file = ?record.file, "schema evolved: new columns");
        runner.schema_event(&record);
        self.state.schema = Some(record.clone());
        let source_schema = runner.decode_schema(&record);
        let target = runner.ctx.target().await?;
        let (table_schema, delta_schema) = runner.sink_schema(&source_schema, target.as_ref()).await?;
        Ok(Evolved { source_schema: source_schema.as_ref().clone(), table_schema, delta_schema })
    }
}

/// What a batch's commit did.
pub(crate) struct Committed {
    /// The batch (txn version) committed; `None` when a watermark batch found
    /// nothing beyond the watermark and committed nothing.
    pub batch: Option<u64>,
    /// `None` when the batch was already in the table.
    pub version: Option<i64>,
    pub rows: u64,
    pub merge: Option<MergeCounts>,
    /// Bad input found and expectation counts, summed over the tasks.
    pub quality: Quality,
}

/// One batch's tasks and what its commit needs.
pub(crate) struct BatchWork {
    pub batch: u64,
    pub tasks: Vec<TaskSpec>,
    pub delta_schema: StructType,
    pub follows: Option<Option<u64>>,
    pub info: BTreeMap<String, serde_json::Value>,
}

impl FlowContext {
    pub(crate) fn flow_name(&self) -> &str {
        &self.flow.name
    }

    /// Task `index` of `batch` with what every task of this flow carries; the
    /// caller sets what it reads (files, a Delta read, a watermark).
    pub(crate) fn task(
        &self,
        batch: u64,
        index: usize,
        source_schema: &Schema,
        table_schema: &Schema,
        merge: &Option<MergeTask>,
    ) -> TaskSpec {
        TaskSpec {
            id: TaskId { pipeline: self.pipeline.clone(), flow: self.flow.name.clone(), batch, index: index as u32 },
            attempt: 0,
            files: Vec::new(),
            format: sluice_proto::spec::Format::Parquet,
            csv: Default::default(),
            source_schema: source_schema.clone(),
            transform: self.flow.transform.clone(),
            table_url: self.flow.sink.table.to_string(),
            table_schema: table_schema.clone(),
            partition_by: self.flow.sink.partition_by.clone(),
            ingest_time_us: chrono::Utc::now().timestamp_micros(),
            delta_read: None,
            merge: merge.clone(),
            watermark: None,
            on_malformed: Default::default(),
            schema_evolution: Default::default(),
            expectations: self.flow.expectations.clone(),
            quarantine_url: self.flow.quarantine.to_string(),
            storage: self.storage.clone(),
            tables: Vec::new(),
            ballista: None,
        }
    }

    /// The tasks that read `files` of a files source, split over the worker
    /// slots; one task for a merge, which must see all of a key's rows.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn file_tasks(
        &self,
        batch: u64,
        files: &[SourceFile],
        source: &FilesSource,
        source_schema: &Schema,
        table_schema: &Schema,
        merge: Option<MergeTask>,
        ingest_time_us: i64,
    ) -> Vec<TaskSpec> {
        let parallelism = if merge.is_some() { 1 } else { self.parallelism.load(Ordering::Relaxed) };
        split_into_tasks(files, parallelism)
            .into_iter()
            .enumerate()
            .map(|(index, files)| TaskSpec {
                files,
                format: source.format,
                csv: source.csv.clone(),
                ingest_time_us,
                on_malformed: source.on_malformed,
                schema_evolution: source.schema_evolution,
                ..self.task(batch, index, source_schema, table_schema, &merge)
            })
            .collect()
    }

    pub(crate) fn delta_error(&self, source: deltalake::DeltaTableError) -> CoordinatorError {
        CoordinatorError::Delta {
            flow: self.flow.name.clone(),
            table: self.flow.sink.table.to_string(),
            source: Box::new(source),
        }
    }

    /// The sink table as it is now, if it exists.
    pub(crate) async fn target(&self) -> Result<Option<DeltaTable>, CoordinatorError> {
        load_table(&self.flow.sink.table, &self.storage).await.map_err(|e| self.delta_error(e))
    }

    /// The highest batch (txn version) of this flow in `target`.
    pub(crate) async fn committed(&self, target: Option<&DeltaTable>) -> Result<Option<u64>, CoordinatorError> {
        match target {
            Some(table) => {
                committed_batch(table, &self.flow.app_id(&self.pipeline)).await.map_err(|e| self.delta_error(e))
            }
            None => Ok(None),
        }
    }

    /// The merge a task does for a merge sink, against the table as it is now.
    pub(crate) fn merge_task(&self, target: Option<&DeltaTable>) -> Option<MergeTask> {
        let spec = self.flow.sink.merge.clone()?;
        Some(MergeTask { spec, target_version: target.and_then(|t| t.version()) })
    }

    /// Where the transform of a batch over a whole table runs: on the
    /// cluster's Ballista executors (`Some`), or in the worker (`None`).
    /// `engine: auto` goes to Ballista only for a transform that needs a
    /// shuffle, and only with more than one worker live.
    pub(crate) async fn query_engine(
        &self,
        relation: &SchemaRef,
        tables: &[PinnedTable],
    ) -> Result<Option<BallistaRun>, CoordinatorError> {
        if !matches!(self.flow.source, SourceSpec::Delta(_)) {
            return Ok(None);
        }
        let Some(query) = &self.query else {
            if self.flow.engine == Engine::Ballista {
                debug!(flow = self.flow_name(), "engine: ballista runs locally in the embedded runtime");
            }
            return Ok(None);
        };
        let workers = query.live_workers();
        let ballista = match self.flow.engine {
            Engine::Local => false,
            Engine::Ballista if workers == 0 => {
                warn!(
                    flow = self.flow_name(),
                    "engine: ballista, but no live worker runs a Ballista executor; running locally"
                );
                false
            }
            Engine::Ballista => true,
            Engine::Auto if workers < 2 => false,
            Engine::Auto => {
                transform::needs_shuffle(relation.clone(), &schemas_of(tables), self.flow.transform.as_deref())
                    .await
                    .map_err(|source| CoordinatorError::Worker { flow: self.flow.name.clone(), source })?
            }
        };
        let partitions = self.parallelism.load(Ordering::Relaxed).max(1) * 2;
        Ok(ballista.then(|| BallistaRun { scheduler: query.scheduler.clone(), partitions }))
    }

    /// The flow's `tables:`, each at its latest version now.
    pub(crate) async fn pin_tables(&self) -> Result<Vec<PinnedTable>, CoordinatorError> {
        let mut pinned = Vec::with_capacity(self.flow.tables.len());
        for (name, url) in &self.flow.tables {
            let error = |message: String| CoordinatorError::Source {
                flow: self.flow.name.clone(),
                table: url.to_string(),
                message: format!("`tables.{name}`: {message}"),
            };
            let table = load_table(url, &self.storage)
                .await
                .map_err(|e| error(e.to_string()))?
                .ok_or_else(|| error("there is no Delta table here".to_string()))?;
            let snapshot = table.snapshot().map_err(|e| error(e.to_string()))?;
            pinned.push(PinnedTable {
                named: NamedTable {
                    name: name.clone(),
                    table_url: url.to_string(),
                    version: table.version().unwrap_or(0),
                },
                schema: snapshot.snapshot().arrow_schema(),
            });
        }
        Ok(pinned)
    }

    /// The schema rows are written with, and the Delta schema for creating the
    /// table, for a transform over `relation` (and `tables`, by name).
    pub(crate) async fn table_schema(
        &self,
        relation: &SchemaRef,
        tables: &[PinnedTable],
        target: Option<&DeltaTable>,
    ) -> Result<(Schema, deltalake::kernel::StructType), CoordinatorError> {
        let flow = self.flow_name().to_string();
        let schema_error = |message: String| CoordinatorError::Schema { flow: flow.clone(), message };
        let produced = transform::output_schema(relation.clone(), &schemas_of(tables), self.flow.transform.as_deref())
            .await
            .map_err(|source| CoordinatorError::Worker { flow: flow.clone(), source })?;
        Expectations::compile(&self.flow.expectations, &Arc::new(produced.clone())).map_err(&schema_error)?;
        let produced = match &self.flow.sink.merge {
            Some(merge) => {
                check_merge_columns(merge, &produced).map_err(&schema_error)?;
                let mut kept: Vec<_> =
                    produced.fields().iter().filter(|f| !merge.except_columns.contains(f.name())).cloned().collect();
                if merge.scd == 2 {
                    // The versions' bounds, of the sequence's type.
                    let sequence =
                        produced.field_with_name(&merge.sequence_by).map_err(|e| schema_error(e.to_string()))?;
                    for name in [history::START_AT, history::END_AT] {
                        kept.push(Arc::new(Field::new(name, sequence.data_type().clone(), true)));
                    }
                }
                Schema::new(kept)
            }
            None => produced,
        };
        let (delta, arrow) = to_delta(&produced).map_err(&schema_error)?;
        for column in &self.flow.sink.partition_by {
            if arrow.field_with_name(column).is_err() {
                return Err(schema_error(format!(
                    "sink.partition_by names `{column}`, which the flow does not produce"
                )));
            }
        }
        let Some(table) = target else {
            return Ok((arrow, delta));
        };
        let snapshot = table.snapshot().map_err(|e| self.delta_error(e))?;
        let existing = snapshot.snapshot().arrow_schema();
        let adds_columns = matches!(&self.flow.source, SourceSpec::Files(files)
            if files.schema_evolution == SchemaEvolution::AddNewColumns);
        let new: Vec<_> =
            arrow.fields().iter().filter(|f| existing.field_with_name(f.name()).is_err()).cloned().collect();
        if adds_columns && !new.is_empty() {
            // The table gains the new columns, in the commit of the batch that brought them.
            let common = Schema::new(arrow.fields().iter().filter(|f| !new.contains(f)).cloned().collect::<Vec<_>>());
            check_appendable(&existing, &common)
                .map_err(|m| schema_error(format!("table {}: {m}", self.flow.sink.table)))?;
            let evolved = Schema::new(existing.fields().iter().chain(new.iter()).cloned().collect::<Vec<_>>());
            let (delta, arrow) = to_delta(&evolved).map_err(&schema_error)?;
            return Ok((arrow, delta));
        }
        check_appendable(&existing, &arrow)
            .map_err(|m| schema_error(format!("table {}: {m}", self.flow.sink.table)))?;
        Ok((existing.as_ref().clone(), snapshot.schema().as_ref().clone()))
    }

    /// Publishes the batch's tasks, waits for them, and commits their output
    /// with the flow's txn.
    /// With `evolver`, a task that stopped at new columns runs again once they
    /// are added to the schema; the other tasks' output stands (their files had
    /// no such columns, which read as NULL in them).
    pub(crate) async fn execute_and_commit(
        &self,
        mut work: BatchWork,
        evolver: Option<&mut dyn EvolveSchema>,
    ) -> Result<Committed, CoordinatorError> {
        let flow = self.flow_name().to_string();
        let batch = work.batch;
        // A merge's output replaces files of the version its task read: it may land only on that version.
        let computed_on = work.tasks.iter().find_map(|t| t.merge.as_ref().map(|m| m.target_version));
        // A watermark batch's txn version is the highest value its tasks read.
        let watermark = work.tasks.iter().any(|t| t.watermark.is_some());
        let queue = TaskQueue { kv: self.kv.as_ref(), keys: &self.keys };
        queue.clear_batch(&self.pipeline, &flow, batch).await?;
        queue.publish(&work.tasks).await?;
        let results = self.await_evolving(&queue, &mut work, batch, evolver).await;
        queue.clear_batch(&self.pipeline, &flow, batch).await?;
        let results = results?;

        let batch = match self.watermark_batch(batch, watermark, work.follows, &results)? {
            Some(batch) => batch,
            None => {
                return Ok(Committed { batch: None, version: None, rows: 0, merge: None, quality: Quality::default() });
            }
        };
        let rows: u64 = results.iter().map(|r| r.rows).sum();
        let malformed = |e: serde_json::Error| CoordinatorError::BatchFailed {
            flow: flow.clone(),
            batch,
            message: format!("a worker returned a malformed action: {e}"),
            retryable: false,
        };
        let adds: Vec<Add> = decode_actions(results.iter().flat_map(|r| &r.adds)).map_err(malformed)?;
        let removes: Vec<Remove> = decode_actions(results.iter().flat_map(|r| &r.removes)).map_err(malformed)?;
        let cdc: Vec<AddCDCFile> = decode_actions(results.iter().flat_map(|r| &r.cdc)).map_err(malformed)?;
        let quarantined: Vec<Add> =
            decode_actions(results.iter().flat_map(|r| &r.quarantine_adds)).map_err(malformed)?;
        let quality = results.iter().fold(Quality::default(), |sum, r| sum.plus(&r.quality));
        let mut info = work.info;
        info.insert("sluice.rows".to_string(), rows.into());
        let merge = results.iter().filter_map(|r| r.merge).reduce(MergeCounts::plus);
        for (name, value) in merge.iter().flat_map(MergeCounts::named) {
            info.insert(format!("sluice.merge.{name}"), value.into());
        }
        quality_info(&quality, &mut info);
        // The quarantine first, under the same txn: a retry finds it there and adds nothing twice.
        if !quarantined.is_empty() {
            self.commit_quarantine(batch, quarantined, &info).await?;
        }
        failpoint::hit(failpoint::BEFORE_COMMIT).await;
        let kind = match self.flow.sink.mode {
            SinkMode::Append => CommitKind::Append,
            SinkMode::Merge => CommitKind::Merge,
            SinkMode::Overwrite => CommitKind::Overwrite,
        };
        let request = BatchCommit {
            table_url: self.flow.sink.table.clone(),
            storage: self.storage.clone(),
            app_id: self.flow.app_id(&self.pipeline),
            batch,
            adds,
            removes,
            cdc,
            kind,
            computed_on,
            follows: work.follows,
            schema: work.delta_schema,
            partition_by: self.flow.sink.partition_by.clone(),
            properties: self.flow.sink.properties.clone(),
            info,
        };
        let outcome = self.fenced_commit(&request).await?;
        failpoint::hit(failpoint::AFTER_COMMIT).await;
        let version = match outcome {
            CommitOutcome::Committed { version } => Some(version),
            CommitOutcome::AlreadyCommitted => None,
        };
        Ok(Committed { batch: Some(batch), version, rows, merge, quality })
    }

    /// Commits a batch's quarantine files to the flow's quarantine table.
    async fn commit_quarantine(
        &self,
        batch: u64,
        adds: Vec<Add>,
        info: &BTreeMap<String, serde_json::Value>,
    ) -> Result<(), CoordinatorError> {
        let flow = self.flow_name().to_string();
        let request = BatchCommit {
            table_url: self.flow.quarantine.clone(),
            storage: self.storage.clone(),
            app_id: self.flow.app_id(&self.pipeline),
            batch,
            adds,
            removes: Vec::new(),
            cdc: Vec::new(),
            kind: CommitKind::Append,
            computed_on: None,
            follows: None,
            schema: quarantine::schema().0.clone(),
            partition_by: Vec::new(),
            properties: BTreeMap::new(),
            info: info.clone(),
        };
        let outcome = self.fenced_commit(&request).await?;
        info!(flow, batch, table = %request.table_url, ?outcome, "quarantine committed");
        Ok(())
    }

    /// Commits `request` if this process still holds the right to commit.
    async fn fenced_commit(&self, request: &BatchCommit) -> Result<CommitOutcome, CoordinatorError> {
        self.wait_for_fence(request.batch).await?;
        let started = Instant::now();
        let outcome = commit_batch(request).await.map_err(|e| CoordinatorError::CommitFailed {
            flow: self.flow_name().to_string(),
            batch: request.batch,
            table: request.table_url.to_string(),
            message: sluice_worker::storage::redacted(&e.to_string(), &self.storage),
        });
        let labels = [("pipeline", self.pipeline.clone()), ("flow", self.flow_name().to_string())];
        metrics::histogram!(sluice_worker::telemetry::COMMIT_SECONDS, &labels).record(started.elapsed().as_secs_f64());
        outcome
    }

    /// The txn version a batch commits with: its own number, or for a watermark
    /// batch the highest value read, `None` when that does not pass the watermark.
    fn watermark_batch(
        &self,
        batch: u64,
        watermark: bool,
        follows: Option<Option<u64>>,
        results: &[TaskResult],
    ) -> Result<Option<u64>, CoordinatorError> {
        if !watermark {
            return Ok(Some(batch));
        }
        let Some(highest) = results.iter().filter_map(|r| r.watermark).max() else { return Ok(None) };
        let highest = u64::try_from(highest).map_err(|_| CoordinatorError::BatchFailed {
            flow: self.flow_name().to_string(),
            batch,
            message: format!(
                "the watermark column's highest value is {highest}: a watermark must not be negative (nor a time before 1970)"
            ),
            retryable: false,
        })?;
        let committed = follows.flatten();
        Ok((committed.is_none_or(|c| highest > c)).then_some(highest))
    }

    /// Returns when this process may commit; fails when it may not.
    async fn wait_for_fence(&self, batch: u64) -> Result<(), CoordinatorError> {
        let Some(fence) = &self.fence else { return Ok(()) };
        let flow = self.flow_name();
        let deadline = Instant::now() + FENCE_PATIENCE;
        loop {
            match fence.check().await {
                Ok(()) => return Ok(()),
                Err(error) if error.retryable && Instant::now() < deadline => {
                    warn!(flow, batch, error = %error.message, "cannot confirm the right to commit yet; retrying");
                    tokio::time::sleep(self.timings.poll_interval()).await;
                }
                Err(error) => {
                    let FenceError { message, retryable } = error;
                    return Err(CoordinatorError::Fenced { flow: flow.to_string(), message, retryable });
                }
            }
        }
    }

    /// Waits for every task's result, running again with an evolved schema the
    /// tasks that found new columns.
    async fn await_evolving(
        &self,
        queue: &TaskQueue<'_>,
        work: &mut BatchWork,
        batch: u64,
        mut evolver: Option<&mut dyn EvolveSchema>,
    ) -> Result<Vec<TaskResult>, CoordinatorError> {
        let mut done: BTreeMap<u32, TaskResult> = BTreeMap::new();
        loop {
            let evolving = self.await_tasks(queue, &mut work.tasks, batch, &mut done).await?;
            if evolving.is_empty() {
                return Ok(done.into_values().collect());
            }
            let found: Vec<NewColumns> = evolving.iter().map(|(_, found)| found.clone()).collect();
            let Some(evolver) = evolver.as_deref_mut() else {
                return Err(CoordinatorError::BatchFailed {
                    flow: self.flow_name().to_string(),
                    batch,
                    message: format!("{}: new columns {}", found[0].file, found[0].columns.join(", ")),
                    retryable: false,
                });
            };
            let evolved = evolver.evolve(&found).await?;
            work.delta_schema = evolved.delta_schema;
            for (index, _) in evolving {
                let task = &mut work.tasks[index as usize];
                task.source_schema = evolved.source_schema.clone();
                task.table_schema = evolved.table_schema.clone();
                queue.retry(task).await?;
                task.attempt += 1;
            }
        }
    }

    /// Waits until every task not in `done` has a result (added to `done`) or
    /// stopped at new columns (returned); retries retryable failures up to
    /// [`MAX_TASK_ATTEMPTS`]; fails on the first failure that is not retryable.
    async fn await_tasks(
        &self,
        queue: &TaskQueue<'_>,
        tasks: &mut [TaskSpec],
        batch: u64,
        done: &mut BTreeMap<u32, TaskResult>,
    ) -> Result<Vec<(u32, NewColumns)>, CoordinatorError> {
        let flow = self.flow_name().to_string();
        let mut evolving: BTreeMap<u32, NewColumns> = BTreeMap::new();
        while done.len() + evolving.len() < tasks.len() {
            let (revision, outcomes) = match queue.outcomes(&self.pipeline, &flow, batch).await {
                Ok(listing) => listing,
                Err(QueueError::Kv(error)) if error.is_retryable() => {
                    // The store is unreachable for a while: the workers keep working and
                    // their results wait in the store, so wait for it rather than fail the batch.
                    warn!(flow, batch, %error, "cannot read task outcomes; retrying");
                    tokio::time::sleep(self.timings.poll_interval()).await;
                    continue;
                }
                Err(error) => return Err(error.into()),
            };
            for (index, outcome) in outcomes {
                let Some(task) = tasks.get_mut(index as usize) else { continue };
                if done.contains_key(&index) || evolving.contains_key(&index) {
                    continue;
                }
                match outcome {
                    TaskOutcome::Failed(TaskFailure { new_columns: Some(found), .. }) => {
                        info!(flow, batch, task = index, file = %found.file, columns = ?found.columns, "task found new columns");
                        evolving.insert(index, found);
                    }
                    TaskOutcome::Done(result) => {
                        self.progress.send(ProgressEvent::TaskFinished {
                            flow: flow.clone(),
                            batch,
                            rows: result.rows,
                            files: result.files,
                            bytes: result.bytes_read,
                        });
                        done.insert(index, result);
                    }
                    TaskOutcome::Failed(failure) if failure.retryable && task.attempt + 1 < MAX_TASK_ATTEMPTS => {
                        info!(flow, batch, task = index, error = %failure.message, "task failed; handing it out again");
                        self.progress.send(ProgressEvent::TaskRetried {
                            flow: flow.clone(),
                            batch,
                            message: failure.message,
                        });
                        queue.retry(task).await?;
                        task.attempt += 1;
                    }
                    TaskOutcome::Failed(failure) => {
                        let (message, retryable) = (failure.message, failure.retryable);
                        return Err(CoordinatorError::BatchFailed { flow, batch, message, retryable });
                    }
                }
            }
            if done.len() + evolving.len() < tasks.len() {
                let waited =
                    queue.wait_for_outcomes(&self.pipeline, &flow, batch, revision, self.timings.poll_interval()).await;
                if waited.is_err() {
                    tokio::time::sleep(self.timings.poll_interval()).await;
                }
            }
        }
        Ok(evolving.into_iter().collect())
    }
}

/// A batch's bad-input counts, as commitInfo keys.
fn quality_info(quality: &Quality, info: &mut BTreeMap<String, serde_json::Value>) {
    if quality.is_empty() {
        return;
    }
    info.insert("sluice.quarantined_rows".to_string(), quality.quarantined_rows.into());
    info.insert("sluice.malformed_rows".to_string(), quality.malformed_rows.into());
    info.insert("sluice.unreadable_files".to_string(), quality.unreadable_files.into());
    if !quality.expectations.is_empty() {
        let expectations = serde_json::to_value(&quality.expectations).unwrap_or_default();
        info.insert("sluice.expectations".to_string(), expectations);
    }
}

/// Delta actions as workers hand them back (JSON values).
fn decode_actions<'a, T: serde::de::DeserializeOwned>(
    values: impl Iterator<Item = &'a serde_json::Value>,
) -> Result<Vec<T>, serde_json::Error> {
    values.map(|value| T::deserialize(value)).collect()
}

pub(crate) fn commit_info(
    pipeline: &str,
    flow: &str,
    batch: u64,
    files: u64,
    bytes: u64,
) -> BTreeMap<String, serde_json::Value> {
    BTreeMap::from([
        ("sluice.pipeline".to_string(), pipeline.into()),
        ("sluice.flow".to_string(), flow.into()),
        ("sluice.batch".to_string(), batch.into()),
        ("sluice.files".to_string(), files.into()),
        ("sluice.bytes".to_string(), bytes.into()),
    ])
}

fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
