//! The pipeline's event log: a Delta table at `<checkpoint>/_event_log`, one
//! row per committed batch and one per flow failure, which users query like
//! any table (Delta Live Tables' event log, for Sluice).
//!
//! Rows are appended after each flow's run in a round (one commit per flow
//! and round, not per batch). The log is for people: a failure to write it is
//! logged and never fails the pipeline, and a batch that was already
//! committed when a run resumed it is not logged twice.

use std::sync::Arc;

use arrow::array::{Float64Builder, Int64Builder, RecordBatch, StringBuilder, TimestampMicrosecondBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use deltalake::protocol::SaveMode;
use sluice_proto::storage::StorageOptions;
use tracing::warn;
use url::Url;

use crate::commit::load_table;
use crate::progress::BatchReport;
use sluice_worker::storage::table_builder;

/// The integer columns, `batch` to `quarantined_rows`, in schema order.
const INT_COLUMNS: usize = 9;

/// One row of the event log.
#[derive(Debug, Clone)]
pub struct Event {
    pub flow: String,
    /// `batch` (a committed batch) or `error` (the flow's run failed).
    pub kind: &'static str,
    pub report: Option<BatchReport>,
    pub error: Option<String>,
}

pub struct EventLog {
    url: Url,
    storage: StorageOptions,
    pipeline: String,
}

/// The log's schema.
pub fn schema() -> SchemaRef {
    let utc = Some(Arc::from("UTC"));
    Arc::new(Schema::new(vec![
        Field::new("at", DataType::Timestamp(TimeUnit::Microsecond, utc), false),
        Field::new("pipeline", DataType::Utf8, false),
        Field::new("flow", DataType::Utf8, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("batch", DataType::Int64, true),
        Field::new("delta_version", DataType::Int64, true),
        Field::new("files", DataType::Int64, true),
        Field::new("rows", DataType::Int64, true),
        Field::new("bytes", DataType::Int64, true),
        Field::new("first_source_version", DataType::Int64, true),
        Field::new("last_source_version", DataType::Int64, true),
        Field::new("malformed_rows", DataType::Int64, true),
        Field::new("quarantined_rows", DataType::Int64, true),
        // Failed rows per expectation, as a JSON object.
        Field::new("expectations", DataType::Utf8, true),
        // What a merge did, as a JSON object.
        Field::new("merge", DataType::Utf8, true),
        Field::new("seconds", DataType::Float64, true),
        Field::new("error", DataType::Utf8, true),
    ]))
}

impl EventLog {
    pub fn new(checkpoint: &Url, storage: &StorageOptions, pipeline: &str) -> Self {
        let mut url = checkpoint.clone();
        let path = checkpoint.path().trim_end_matches('/');
        url.set_path(&format!("{path}/_event_log/"));
        Self { url, storage: storage.clone(), pipeline: pipeline.to_string() }
    }

    /// Appends `events` in one commit; a failure is logged, not returned.
    pub async fn append(&self, events: &[Event]) {
        if events.is_empty() {
            return;
        }
        if let Err(message) = self.try_append(events).await {
            let message = sluice_worker::storage::redacted(&message, &self.storage);
            warn!(log = %self.url, %message, "cannot append to the event log; the pipeline goes on");
        }
    }

    async fn try_append(&self, events: &[Event]) -> Result<(), String> {
        let batch = self.batch(events).map_err(|e| e.to_string())?;
        sluice_worker::storage::ensure_local_dir(&self.url).map_err(|e| e.to_string())?;
        // Not `try_from_url`: loading a table that does not exist yet makes the
        // Delta kernel log an error, on the first run of every pipeline.
        let table = match load_table(&self.url, &self.storage).await.map_err(|e| e.to_string())? {
            Some(table) => table,
            None => table_builder(&self.url, &self.storage)
                .map_err(|e| e.to_string())?
                .build()
                .map_err(|e| e.to_string())?,
        };
        table.write(vec![batch]).with_save_mode(SaveMode::Append).await.map(|_| ()).map_err(|e| e.to_string())
    }

    fn batch(&self, events: &[Event]) -> Result<RecordBatch, arrow::error::ArrowError> {
        let now = chrono::Utc::now().timestamp_micros();
        let mut at = TimestampMicrosecondBuilder::new().with_timezone("UTC");
        let (mut pipeline, mut flow, mut kind) = (StringBuilder::new(), StringBuilder::new(), StringBuilder::new());
        let mut ints: Vec<Int64Builder> = (0..INT_COLUMNS).map(|_| Int64Builder::new()).collect();
        let (mut expectations, mut merge, mut error) =
            (StringBuilder::new(), StringBuilder::new(), StringBuilder::new());
        let mut seconds = Float64Builder::new();
        for event in events {
            at.append_value(now);
            pipeline.append_value(&self.pipeline);
            flow.append_value(&event.flow);
            kind.append_value(event.kind);
            let report = event.report.as_ref();
            let quality = report.and_then(|r| r.quality.as_ref());
            let values = [
                report.map(|r| r.batch as i64),
                report.and_then(|r| r.version),
                report.map(|r| r.files as i64),
                report.map(|r| r.rows as i64),
                report.map(|r| r.bytes as i64),
                report.and_then(|r| r.source_versions).map(|(first, _)| first as i64),
                report.and_then(|r| r.source_versions).map(|(_, last)| last as i64),
                report.map(|_| quality.map_or(0, |q| q.malformed_rows as i64)),
                report.map(|_| quality.map_or(0, |q| q.quarantined_rows as i64)),
            ];
            for (builder, value) in ints.iter_mut().zip(values) {
                builder.append_option(value);
            }
            expectations.append_option(
                quality
                    .filter(|q| !q.expectations.is_empty())
                    .and_then(|q| serde_json::to_string(&q.expectations).ok()),
            );
            merge.append_option(report.and_then(|r| r.merge).and_then(|m| serde_json::to_string(&m).ok()));
            seconds.append_option(report.map(|r| r.seconds));
            error.append_option(event.error.as_deref());
        }
        let mut columns: Vec<arrow::array::ArrayRef> =
            vec![Arc::new(at.finish()), Arc::new(pipeline.finish()), Arc::new(flow.finish()), Arc::new(kind.finish())];
        columns.extend(ints.iter_mut().map(|b| Arc::new(b.finish()) as arrow::array::ArrayRef));
        columns.extend([
            Arc::new(expectations.finish()) as arrow::array::ArrayRef,
            Arc::new(merge.finish()),
            Arc::new(seconds.finish()),
            Arc::new(error.finish()),
        ]);
        RecordBatch::try_new(schema(), columns)
    }
}
