//! Reading a Delta table as a flow's source: its change data feed over a range
//! of versions, or its snapshot at a version.
//!
//! The relation a transform sees has the table's columns, and for a change
//! feed also `_change_type`, `_commit_version` (BIGINT) and `_commit_timestamp`
//! (TIMESTAMP, UTC), in that order.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::error::DataFusionError;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::execute_stream;
use datafusion::prelude::SessionContext;
use deltalake::kernel::LogicalFileView;
use deltalake::{DeltaTable, DeltaTableError};
use futures::TryStreamExt;
use sluice_proto::storage::StorageOptions;
use sluice_proto::task::{DeltaReadKind, WatermarkRead};
use url::Url;

use crate::error::{ReadError, WorkerError};
use crate::storage::table_builder;
use crate::watermark;

pub const CHANGE_TYPE: &str = "_change_type";
pub const COMMIT_VERSION: &str = "_commit_version";
pub const COMMIT_TIMESTAMP: &str = "_commit_timestamp";

/// The relation's schema for a table whose data columns are `table`.
pub fn relation_schema(table: &Schema, kind: DeltaReadKind) -> SchemaRef {
    let mut fields: Vec<Field> = table.fields().iter().map(|f| f.as_ref().clone()).collect();
    if matches!(kind, DeltaReadKind::Changes { .. }) {
        fields.push(Field::new(CHANGE_TYPE, DataType::Utf8, true));
        fields.push(Field::new(COMMIT_VERSION, DataType::Int64, true));
        fields.push(Field::new(COMMIT_TIMESTAMP, DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), true));
    }
    Arc::new(Schema::new(fields))
}

/// A data file of a table's snapshot, with the minimum and maximum its
/// statistics give for one column (`None` where they give none).
pub struct FileBounds {
    pub file: LogicalFileView,
    pub min: Option<serde_json::Value>,
    pub max: Option<serde_json::Value>,
}

/// Every data file of `table`'s snapshot, with its statistics' bounds for `column`.
pub async fn file_bounds(table: &DeltaTable, column: &str) -> Result<Vec<FileBounds>, DeltaTableError> {
    let snapshot = table.snapshot()?;
    let files: Vec<LogicalFileView> = snapshot.snapshot().file_views(&table.log_store(), None).try_collect().await?;
    Ok(files
        .into_iter()
        .map(|file| {
            let stats: Option<serde_json::Value> = file.stats().and_then(|s| serde_json::from_str(&s).ok());
            let bound = |which: &str| stats.as_ref().and_then(|s| s.get(which)).and_then(|m| m.get(column)).cloned();
            FileBounds { min: bound("minValues"), max: bound("maxValues"), file }
        })
        .collect())
}

/// Opens a table at a version (the latest when `None`).
pub async fn open_table(
    url: &Url,
    version: Option<u64>,
    storage: &StorageOptions,
) -> Result<DeltaTable, DeltaTableError> {
    let mut builder = table_builder(url, storage).map_err(|e| DeltaTableError::Generic(e.to_string()))?;
    if let Some(version) = version {
        builder = builder.with_version(version);
    }
    builder.load().await
}

/// Opens the table at `table_url` at `version`; a failure is a read error about the table.
pub async fn open_at(table_url: &str, version: u64, storage: &StorageOptions) -> Result<DeltaTable, WorkerError> {
    let url = crate::storage::parse_url(table_url)?;
    open_table(&url, Some(version), storage).await.map_err(|e| WorkerError::Read(read_error(table_url, e)))
}

fn source_error(table: &Url, error: DeltaTableError) -> WorkerError {
    WorkerError::Read(read_error(table.as_str(), error))
}

/// A read error about a source table. Retryable when storage failed on the
/// way; not when the table itself says no (feed disabled, versions or data
/// files gone), which fails the same way every time.
pub fn read_error(table: &str, error: DeltaTableError) -> ReadError {
    let retryable = match &error {
        DeltaTableError::ObjectStore { source: object_store::Error::NotFound { .. } } => false,
        DeltaTableError::ObjectStore { .. } | DeltaTableError::Io { .. } => true,
        _ => false,
    };
    ReadError { file: table.to_string(), line: None, message: explain(error), retryable }
}

/// A source stream's error, explained where it comes from the table.
pub fn stream_error(table: &str, error: DataFusionError) -> ReadError {
    match error {
        DataFusionError::External(inner) => match inner.downcast::<DeltaTableError>() {
            Ok(delta) => read_error(table, *delta),
            Err(inner) => {
                ReadError { file: table.to_string(), line: None, message: inner.to_string(), retryable: true }
            }
        },
        DataFusionError::ObjectStore(source) => read_error(table, DeltaTableError::ObjectStore { source: *source }),
        other => ReadError { file: table.to_string(), line: None, message: other.to_string(), retryable: true },
    }
}

/// Turns delta-rs' change-feed errors into what a user can act on.
pub fn explain(error: DeltaTableError) -> String {
    match error {
        DeltaTableError::ChangeDataNotEnabled { version } => format!(
            "the change data feed is not enabled on this table at version {version}: set the table property \
             `delta.enableChangeDataFeed = true` (changes from then on can be read), or read the table whole with a `delta:` source"
        ),
        DeltaTableError::ChangeDataNotRecorded { version, .. } => {
            format!("the change data feed was disabled at version {version}; changes after that are not recorded")
        }
        DeltaTableError::InvalidVersion(version) => format!(
            "version {version} is no longer in the table's log (it was cleaned up, or the table was recreated); \
             to recover, load the table whole (a `delta:` source with `mode: overwrite`, or a fresh target) \
             and restart the flow from the current version with `starting_version`"
        ),
        DeltaTableError::ObjectStore { source: object_store::Error::NotFound { path, .. } } => format!(
            "the data file {path} of a version still to be read is gone (the table was vacuumed); \
             to recover, load the table whole and restart the flow from the current version with `starting_version`"
        ),
        other => other.to_string(),
    }
}

/// Starts reading: the stream yields batches in the table's own shape, to be
/// conformed to [`relation_schema`] by the caller. A `watermark` (snapshots
/// only) lets the scan skip files by their statistics; the exact cut is the
/// caller's ([`watermark::Cut`]).
pub async fn read(
    url: &Url,
    kind: DeltaReadKind,
    watermark: Option<&WatermarkRead>,
    storage: &StorageOptions,
) -> Result<SendableRecordBatchStream, WorkerError> {
    let ctx = SessionContext::new();
    match kind {
        DeltaReadKind::Changes { start, end } => {
            let table = open_table(url, Some(end), storage).await.map_err(|e| source_error(url, e))?;
            let plan = table
                .scan_cdf()
                .with_starting_version(start)
                .with_ending_version(end)
                .build(&ctx.state(), None)
                .await
                .map_err(|e| source_error(url, e))?;
            execute_stream(plan, ctx.task_ctx()).map_err(|e| WorkerError::Transform(e.to_string()))
        }
        DeltaReadKind::Snapshot { version } => {
            let table = open_table(url, Some(version), storage).await.map_err(|e| source_error(url, e))?;
            table.update_datafusion_session(&ctx.state()).map_err(|e| source_error(url, e))?;
            let provider = table.table_provider().await.map_err(|e| source_error(url, e.into()))?;
            let mut frame = ctx.read_table(provider).map_err(|e| WorkerError::Transform(e.to_string()))?;
            if let Some(WatermarkRead { column, after: Some(after) }) = watermark {
                let data_type = frame.schema().field_with_unqualified_name(column).map(|f| f.data_type().clone());
                if let Some(expr) = data_type.ok().and_then(|t| watermark::scan_hint(column, &t, *after)) {
                    frame = frame.filter(expr).map_err(|e| WorkerError::Transform(e.to_string()))?;
                }
            }
            frame.execute_stream().await.map_err(|e| WorkerError::Transform(e.to_string()))
        }
    }
}
