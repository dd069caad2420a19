//! The exactly-once commit of one micro-batch.
//!
//! A batch's `Add` actions go into one Delta commit together with a `txn`
//! action (app id = the flow's, version = the batch id). Before each attempt the
//! table is reloaded and the txn version read from the very snapshot the commit
//! is built on; the commit is made with no automatic rebase (`max_retries = 0`),
//! so it lands only directly on that snapshot. If another writer got in first,
//! the loop reloads and checks the txn again. So a batch already in the table is
//! never committed twice, even when two runs race. A commit that returned an
//! error may still have landed (a failed post-commit hook, a lost response):
//! the next attempt finds its txn and reports the batch as already committed.
//!
//! The first batch creates the table in the same commit (version 0), so the
//! table never exists without its first batch's txn.

use std::collections::BTreeMap;
use std::time::Duration;

use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, Add, AddCDCFile, MetadataExt, Remove, StructType, Transaction};
use deltalake::operations::create::CreateBuilder;
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::{DeltaTable, DeltaTableError};
use sluice_proto::storage::StorageOptions;
use sluice_worker::storage::ensure_local_dir;
use sluice_worker::storage::{delta_options, table_builder};
use tracing::{info, warn};
use url::Url;

/// Attempts before a batch's commit is given up (the batch is then retried by the next run).
const MAX_ATTEMPTS: u32 = 12;

pub struct BatchCommit {
    pub table_url: Url,
    /// The object-store options of the pipeline's locations.
    pub storage: StorageOptions,
    pub app_id: String,
    pub batch: u64,
    pub adds: Vec<Add>,
    /// Files the batch replaces (a merge's rewritten files).
    pub removes: Vec<Remove>,
    /// Change data files of a merge that rewrote files.
    pub cdc: Vec<AddCDCFile>,
    pub kind: CommitKind,
    /// The batch was computed from this table version (`None`: from no table):
    /// it may be committed only directly on it.
    pub computed_on: Option<Option<u64>>,
    /// The batch follows this one (`None`: the flow's first); a table whose
    /// txn shows another is not committed to.
    pub follows: Option<Option<u64>>,
    /// The table's schema: used when this commit creates the table, and
    /// written with it when it has columns the table lacks (schema evolution).
    pub schema: StructType,
    pub partition_by: Vec<String>,
    pub properties: BTreeMap<String, String>,
    /// Goes into the commit's `commitInfo`.
    pub info: BTreeMap<String, serde_json::Value>,
}

/// How a batch changes the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitKind {
    Append,
    /// Adds and removes from a merge by key.
    Merge,
    /// Replaces every file of the table.
    Overwrite,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    Committed {
        version: i64,
    },
    /// The table's txn shows this batch was committed before (by an earlier attempt or run).
    AlreadyCommitted,
}

/// Loads the table, or `None` if there is no Delta table at the URL yet.
pub async fn load_table(url: &Url, storage: &StorageOptions) -> Result<Option<DeltaTable>, DeltaTableError> {
    if url.scheme() == "file" && url.to_file_path().is_ok_and(|p| !p.exists()) {
        return Ok(None);
    }
    let mut table = table_builder(url, storage).map_err(|e| DeltaTableError::Generic(e.to_string()))?.build()?;
    if !table.verify_deltatable_existence().await? {
        return Ok(None);
    }
    table.load().await?;
    Ok(Some(table))
}

/// The highest batch id committed to `table` under `app_id`.
pub async fn committed_batch(table: &DeltaTable, app_id: &str) -> Result<Option<u64>, DeltaTableError> {
    let version = table.snapshot()?.transaction_version(table.log_store().as_ref(), app_id).await?;
    Ok(version.and_then(|v| u64::try_from(v).ok()))
}

pub async fn commit_batch(request: &BatchCommit) -> Result<CommitOutcome, DeltaTableError> {
    let mut last_error: Option<DeltaTableError> = None;
    for attempt in 1..=MAX_ATTEMPTS {
        if attempt > 1 {
            tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
        }
        let result = match load_table(&request.table_url, &request.storage).await {
            Ok(Some(table)) => append(&table, request).await,
            Ok(None) if matches!(request.computed_on, Some(Some(_))) => Err(AttemptError::Moved(
                "the table the batch was computed from is gone; the batch must be computed again".to_string(),
            )),
            Ok(None) => match ensure_local_dir(&request.table_url) {
                Ok(()) => create_with_batch(request).await.map_err(AttemptError::Delta),
                Err(e) => Err(AttemptError::Delta(DeltaTableError::Generic(e.to_string()))),
            },
            Err(e) => Err(AttemptError::Delta(e)),
        };
        match result {
            Ok(outcome) => return Ok(outcome),
            Err(AttemptError::Moved(message)) => return Err(DeltaTableError::Generic(message)),
            Err(AttemptError::Delta(error)) => {
                warn!(batch = request.batch, attempt, %error, "commit attempt failed; checking the table again");
                last_error = Some(error);
            }
        }
    }
    Err(last_error.unwrap_or_else(|| DeltaTableError::Generic("commit failed".to_string())))
}

fn properties(request: &BatchCommit) -> CommitProperties {
    let txn = Transaction::new(request.app_id.clone(), i64::try_from(request.batch).unwrap_or(i64::MAX));
    CommitProperties::default()
        .with_application_transaction(txn)
        .with_metadata(request.info.clone())
        .with_max_retries(0)
}

/// Why one commit attempt did not land.
enum AttemptError {
    /// The table is no longer what the batch was planned or computed against:
    /// committing again cannot help, the batch must be planned again.
    Moved(String),
    /// Anything else; the next attempt reloads the table and checks the txn.
    Delta(DeltaTableError),
}

impl From<DeltaTableError> for AttemptError {
    fn from(error: DeltaTableError) -> Self {
        AttemptError::Delta(error)
    }
}

async fn append(table: &DeltaTable, request: &BatchCommit) -> Result<CommitOutcome, AttemptError> {
    let committed = committed_batch(table, &request.app_id).await?;
    if committed.is_some_and(|b| b >= request.batch) {
        info!(batch = request.batch, "batch is already in the table; not committing it again");
        return Ok(CommitOutcome::AlreadyCommitted);
    }
    if let Some(follows) = request.follows
        && committed != follows
    {
        return Err(AttemptError::Moved(format!(
            "the table moved on: the batch follows batch {follows:?} of this flow, the table holds {committed:?}; it will be planned again"
        )));
    }
    let version = table.version();
    if let Some(base) = request.computed_on
        && version != base
    {
        return Err(AttemptError::Moved(format!(
            "the table moved on: the batch was computed on version {base:?}, the table is at {version:?} (another writer?); it will be computed again"
        )));
    }
    let snapshot = table.snapshot()?;
    let partition_by = (!request.partition_by.is_empty()).then(|| request.partition_by.clone());
    let mut actions: Vec<Action> = Vec::new();
    let operation = match request.kind {
        CommitKind::Append => DeltaOperation::Write { mode: SaveMode::Append, partition_by, predicate: None },
        CommitKind::Overwrite => {
            let files: Vec<_> =
                futures::TryStreamExt::try_collect(snapshot.snapshot().file_views(&table.log_store(), None)).await?;
            actions.extend(files.iter().map(|f| Action::Remove(f.remove_action(true))));
            DeltaOperation::Write { mode: SaveMode::Overwrite, partition_by, predicate: None }
        }
        CommitKind::Merge => DeltaOperation::Merge {
            predicate: None,
            merge_predicate: None,
            matched_predicates: Vec::new(),
            not_matched_predicates: Vec::new(),
            not_matched_by_source_predicates: Vec::new(),
        },
    };
    // Schema evolution: the table gains the batch's new columns in this very commit.
    let current = snapshot.schema();
    if request.schema.fields().any(|f| current.field(f.name()).is_none()) {
        let metadata = snapshot.metadata().clone().with_schema(&request.schema).map_err(DeltaTableError::from)?;
        info!(batch = request.batch, "the commit adds columns to the table's schema");
        actions.push(Action::Metadata(metadata));
    }
    actions.extend(request.removes.iter().cloned().map(Action::Remove));
    actions.extend(request.adds.iter().cloned().map(Action::Add));
    actions.extend(request.cdc.iter().cloned().map(Action::Cdc));
    let finalized = CommitBuilder::from(properties(request))
        .with_actions(actions)
        .build(Some(snapshot), table.log_store(), operation)
        .await?;
    Ok(CommitOutcome::Committed { version: i64::try_from(finalized.version()).unwrap_or(i64::MAX) })
}

async fn create_with_batch(request: &BatchCommit) -> Result<CommitOutcome, DeltaTableError> {
    let mut configuration: BTreeMap<String, String> = request.properties.clone();
    configuration.entry("delta.enableChangeDataFeed".to_string()).or_insert_with(|| "true".to_string());
    let options =
        delta_options(&request.table_url, &request.storage).map_err(|e| DeltaTableError::Generic(e.to_string()))?;
    let table = CreateBuilder::new()
        .with_location(request.table_url.as_str())
        .with_storage_options(options)
        .with_columns(request.schema.fields().cloned())
        .with_partition_columns(request.partition_by.clone())
        .with_configuration(configuration.into_iter().map(|(k, v)| (k, Some(v))))
        .with_actions(request.adds.iter().cloned().map(Action::Add))
        .with_commit_properties(properties(request))
        .with_save_mode(SaveMode::ErrorIfExists)
        .await?;
    Ok(CommitOutcome::Committed { version: table.version().and_then(|v| i64::try_from(v).ok()).unwrap_or(0) })
}
