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
use deltalake::kernel::{Action, Add, StructType, Transaction};
use deltalake::operations::create::CreateBuilder;
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};
use sluice_worker::storage::ensure_local_dir;
use tracing::{info, warn};
use url::Url;

/// Attempts before a batch's commit is given up (the batch is then retried by the next run).
const MAX_ATTEMPTS: u32 = 12;

pub struct BatchCommit {
    pub table_url: Url,
    pub app_id: String,
    pub batch: u64,
    pub adds: Vec<Add>,
    /// The table's schema, used when this commit creates the table.
    pub schema: StructType,
    pub partition_by: Vec<String>,
    pub properties: BTreeMap<String, String>,
    /// Goes into the commit's `commitInfo`.
    pub info: BTreeMap<String, serde_json::Value>,
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
pub async fn load_table(url: &Url) -> Result<Option<DeltaTable>, DeltaTableError> {
    if url.scheme() == "file" && url.to_file_path().is_ok_and(|p| !p.exists()) {
        return Ok(None);
    }
    let mut table = DeltaTableBuilder::from_url(url.clone())?.build()?;
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
        let result = match load_table(&request.table_url).await {
            Ok(Some(table)) => append(&table, request).await,
            Ok(None) => match ensure_local_dir(&request.table_url) {
                Ok(()) => create_with_batch(request).await,
                Err(e) => Err(DeltaTableError::Generic(e.to_string())),
            },
            Err(e) => Err(e),
        };
        match result {
            Ok(outcome) => return Ok(outcome),
            Err(error) => {
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

async fn append(table: &DeltaTable, request: &BatchCommit) -> Result<CommitOutcome, DeltaTableError> {
    if committed_batch(table, &request.app_id).await?.is_some_and(|b| b >= request.batch) {
        info!(batch = request.batch, "batch is already in the table; not committing it again");
        return Ok(CommitOutcome::AlreadyCommitted);
    }
    let snapshot = table.snapshot()?;
    let operation = DeltaOperation::Write {
        mode: SaveMode::Append,
        partition_by: (!request.partition_by.is_empty()).then(|| request.partition_by.clone()),
        predicate: None,
    };
    let actions = request.adds.iter().cloned().map(Action::Add).collect();
    let finalized = CommitBuilder::from(properties(request))
        .with_actions(actions)
        .build(Some(snapshot), table.log_store(), operation)
        .await?;
    Ok(CommitOutcome::Committed { version: i64::try_from(finalized.version()).unwrap_or(i64::MAX) })
}

async fn create_with_batch(request: &BatchCommit) -> Result<CommitOutcome, DeltaTableError> {
    let mut configuration: BTreeMap<String, String> = request.properties.clone();
    configuration.entry("delta.enableChangeDataFeed".to_string()).or_insert_with(|| "true".to_string());
    let table = CreateBuilder::new()
        .with_location(request.table_url.as_str())
        .with_columns(request.schema.fields().cloned())
        .with_partition_columns(request.partition_by.clone())
        .with_configuration(configuration.into_iter().map(|(k, v)| (k, Some(v))))
        .with_actions(request.adds.iter().cloned().map(Action::Add))
        .with_commit_properties(properties(request))
        .with_save_mode(SaveMode::ErrorIfExists)
        .await?;
    Ok(CommitOutcome::Committed { version: table.version().and_then(|v| i64::try_from(v).ok()).unwrap_or(0) })
}
