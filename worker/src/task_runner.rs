//! Runs one task: read its files, transform, write Parquet data files below the
//! table, and return the `Add` actions. Nothing is committed here.
//!
//! Reading runs in its own tokio task and feeds the transform through a small
//! channel, so decoding and Parquet encoding overlap on two cores.

use std::num::NonZeroU64;
use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::error::DataFusionError;
use delta_kernel::table_properties::DataSkippingNumIndexedCols;
use deltalake::datafile::writer::{DeltaWriter, WriterConfig};
use futures::StreamExt;
use sluice_proto::spec::{OnMalformed, SchemaEvolution, SchemaSample};
use sluice_proto::storage::StorageOptions;
use sluice_proto::task::{DeltaRead, MergeCounts, NewColumns, Quality, TaskResult, TaskSpec, WatermarkRead};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::conform::conform_batch;
use crate::delta_source;
use crate::error::{ReadError, WorkerError};
use crate::expectations::{Expectations, Outcome};
use crate::failpoint;
use crate::formats::{FileDecoder, FileError, infer_schema};
use crate::merge::merge_changes;
use crate::metadata::{append_metadata, with_metadata_field};
use crate::quarantine::{self, Collector, Entry, Origin, collect};
use crate::storage::{ensure_local_dir, parse_url, table_builder};
use crate::transform;
use crate::watermark::Cut;

/// Data files are rolled over at about this size.
pub const TARGET_FILE_SIZE: u64 = 128 << 20;

/// How the reading side of a task ended.
enum ReadEnd {
    Done {
        bytes: u64,
        files: u64,
        /// For a watermark read: the highest value read.
        watermark: Option<i64>,
    },
    Failed(ReadError),
    /// A file has columns the schema lacks, which the flow adds.
    NewColumns(NewColumns),
    /// The consumer stopped first (it failed or the task was cancelled).
    Stopped,
}

pub async fn run_task(task: &TaskSpec, worker: &str, cancel: &CancellationToken) -> Result<TaskResult, WorkerError> {
    #[cfg(feature = "cluster")]
    if let Some(run) = &task.ballista {
        return run_on_ballista(task, run, worker, cancel).await;
    }
    let file_schema: SchemaRef = Arc::new(task.source_schema.clone());
    let table_schema: SchemaRef = Arc::new(task.table_schema.clone());

    let quarantined: Collector = Arc::default();
    let (sender, receiver) = mpsc::channel(4);
    let (reader, relation_schema) = match &task.delta_read {
        Some(read) => {
            let relation_schema = file_schema.clone();
            let reader = tokio::spawn(read_delta(
                read.clone(),
                task.watermark.clone(),
                task.storage.clone(),
                relation_schema.clone(),
                sender,
                cancel.clone(),
            ));
            (reader, relation_schema)
        }
        None => {
            let relation_schema = with_metadata_field(&file_schema).map_err(|e| WorkerError::Schema(e.to_string()))?;
            let reader = tokio::spawn(read_files(
                task.clone(),
                file_schema,
                relation_schema.clone(),
                sender,
                quarantined.clone(),
                cancel.clone(),
            ));
            (reader, relation_schema)
        }
    };
    let expected = Arc::new(Mutex::new(Outcome::default()));
    let written = write_output(task, relation_schema, receiver, &table_schema, &quarantined, &expected).await;
    let read_end = reader.await.unwrap_or_else(|e| {
        ReadEnd::Failed(ReadError {
            file: String::new(),
            line: None,
            message: format!("reader panicked: {e}"),
            retryable: true,
        })
    });
    if cancel.is_cancelled() {
        return Err(WorkerError::Cancelled);
    }
    let counts = expectation_counts(&expected)?;
    match (read_end, written) {
        (ReadEnd::Failed(error), _) => Err(WorkerError::Read(error)),
        (ReadEnd::NewColumns(found), _) => Err(WorkerError::NewColumns(Box::new(found))),
        (_, Err(error)) => Err(error),
        (ReadEnd::Stopped, Ok(_)) => Err(WorkerError::Cancelled),
        (ReadEnd::Done { bytes, files, watermark }, Ok(written)) => {
            let read = ReadTotals { bytes, files, watermark };
            finish(task, worker, written, read, &quarantined, counts).await
        }
    }
}

/// The expectations' counts, or the error of one set to `fail` that failed.
fn expectation_counts(
    expected: &Mutex<Outcome>,
) -> Result<std::collections::BTreeMap<String, sluice_proto::task::ExpectationCount>, WorkerError> {
    let expected = std::mem::take(&mut *expected.lock().unwrap_or_else(|e| e.into_inner()));
    match expected.failed {
        Some(message) => Err(WorkerError::Expectation(message)),
        None => Ok(expected.counts),
    }
}

/// What the reading side of a task read.
struct ReadTotals {
    bytes: u64,
    files: u64,
    watermark: Option<i64>,
}

/// Writes the task's quarantined rows and builds its result.
async fn finish(
    task: &TaskSpec,
    worker: &str,
    written: Written,
    read: ReadTotals,
    quarantined: &Collector,
    expectations: std::collections::BTreeMap<String, sluice_proto::task::ExpectationCount>,
) -> Result<TaskResult, WorkerError> {
    let entries = std::mem::take(&mut *quarantined.lock().unwrap_or_else(|e| e.into_inner()));
    let origin = Origin { flow: &task.id.flow, batch: task.id.batch, at_us: task.ingest_time_us };
    let quarantine_adds = quarantine::write(&task.quarantine_url, &entries, &origin, &task.storage).await?;
    let quality = Quality {
        malformed_rows: quarantine::count(&entries, quarantine::KIND_RECORD),
        unreadable_files: quarantine::count(&entries, quarantine::KIND_FILE),
        quarantined_rows: entries.len() as u64,
        expectations,
    };
    Ok(TaskResult {
        adds: to_values(&written.adds)?,
        removes: to_values(&written.removes)?,
        cdc: to_values(&written.cdc)?,
        rows: written.rows,
        files: read.files,
        bytes_read: read.bytes,
        worker: worker.to_string(),
        merge: written.merge,
        watermark: read.watermark,
        quarantine_adds: to_values(&quarantine_adds)?,
        quality,
    })
}

/// Runs the task's transform on Ballista and writes its output here.
#[cfg(feature = "cluster")]
async fn run_on_ballista(
    task: &TaskSpec,
    run: &sluice_proto::task::BallistaRun,
    worker: &str,
    cancel: &CancellationToken,
) -> Result<TaskResult, WorkerError> {
    let table_schema: SchemaRef = Arc::new(task.table_schema.clone());
    let quarantined: Collector = Arc::default();
    let expected = Arc::new(Mutex::new(Outcome::default()));
    let stream = crate::ballista::query::execute(task, run).await?;
    let written = tokio::select! {
        written = write_stream(task, stream, &table_schema, &quarantined, &expected) => written?,
        _ = cancel.cancelled() => return Err(WorkerError::Cancelled),
    };
    let counts = expectation_counts(&expected)?;
    let read = ReadTotals { bytes: 0, files: 0, watermark: None };
    finish(task, worker, written, read, &quarantined, counts).await
}

/// Delta actions as JSON values, as they travel back to the coordinator.
fn to_values<T: serde::Serialize>(actions: &[T]) -> Result<Vec<serde_json::Value>, WorkerError> {
    actions
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<_, _>>()
        .map_err(|e| WorkerError::Schema(format!("cannot encode an action: {e}")))
}

/// Tells the transform the input failed, and ends reading with `error`.
async fn fail_read(sender: &mpsc::Sender<Result<RecordBatch, DataFusionError>>, error: ReadError) -> ReadEnd {
    let _ = sender.send(Err(DataFusionError::Execution(error.to_string()))).await;
    ReadEnd::Failed(error)
}

/// Streams a Delta table's change feed or snapshot, shaped as the relation.
async fn read_delta(
    read: DeltaRead,
    watermark: Option<WatermarkRead>,
    storage: StorageOptions,
    relation_schema: SchemaRef,
    sender: mpsc::Sender<Result<RecordBatch, DataFusionError>>,
    cancel: CancellationToken,
) -> ReadEnd {
    let fail = |error: ReadError| fail_read(&sender, error);
    let as_read_error = |error: WorkerError| match error {
        WorkerError::Read(error) => error,
        other => ReadError {
            file: read.table_url.clone(),
            line: None,
            message: other.to_string(),
            retryable: other.is_retryable(),
        },
    };
    let url = match parse_url(&read.table_url) {
        Ok(url) => url,
        Err(e) => return fail(as_read_error(e)).await,
    };
    let mut stream = match delta_source::read(&url, read.kind, watermark.as_ref(), &storage).await {
        Ok(stream) => stream,
        Err(e) => return fail(as_read_error(e)).await,
    };
    let mut cut = watermark.map(Cut::new);
    let mut first_batch = true;
    while let Some(batch) = stream.next().await {
        if cancel.is_cancelled() {
            return ReadEnd::Stopped;
        }
        let batch = match batch {
            Ok(batch) => batch,
            Err(e) => return fail(delta_source::stream_error(&read.table_url, e)).await,
        };
        let batch = match cut.as_mut().map(|c| c.apply(&batch)) {
            None => batch,
            Some(Ok(batch)) => batch,
            Some(Err(message)) => {
                return fail(ReadError { file: read.table_url.clone(), line: None, message, retryable: false }).await;
            }
        };
        let batch = match conform_batch(&batch, &relation_schema) {
            Ok(batch) => batch,
            Err(e) => {
                let message = format!("a row of the source does not fit the flow's relation: {e}");
                return fail(ReadError { file: read.table_url.clone(), line: None, message, retryable: false }).await;
            }
        };
        if sender.send(Ok(batch)).await.is_err() {
            return ReadEnd::Stopped;
        }
        if first_batch {
            first_batch = false;
            failpoint::hit(failpoint::DURING_READ).await;
        }
    }
    ReadEnd::Done { bytes: 0, files: 0, watermark: cut.and_then(|c| c.max) }
}

async fn read_files(
    task: TaskSpec,
    file_schema: SchemaRef,
    relation_schema: SchemaRef,
    sender: mpsc::Sender<Result<RecordBatch, DataFusionError>>,
    quarantined: Collector,
    cancel: CancellationToken,
) -> ReadEnd {
    let fail = |error: ReadError| fail_read(&sender, error);
    let keep_going = task.on_malformed == OnMalformed::Quarantine;
    let mut bytes = 0;
    let mut first_batch = true;
    // A watermark over files: only the rows beyond it, and the highest value read.
    let mut cut = task.watermark.clone().map(Cut::new);
    for (index, file) in task.files.iter().enumerate() {
        let opened =
            FileDecoder::open(file, task.format, &task.csv, file_schema.clone(), task.schema_evolution, &task.storage)
                .await;
        let mut decoder = match opened {
            Ok(decoder) => decoder,
            Err(FileError::Read(e)) if keep_going && !e.retryable => {
                collect(&quarantined, [Entry::file(&file.url, e.message)]);
                bytes += file.size;
                continue;
            }
            Err(FileError::Read(e)) => return fail(e).await,
            Err(FileError::NewColumns { columns, line }) => {
                return new_columns(&task, index, columns, line, &sender).await;
            }
        };
        loop {
            if cancel.is_cancelled() {
                return ReadEnd::Stopped;
            }
            let next = decoder.next_batch().await;
            let bad = decoder.take_bad();
            if let Some(first) = bad.first()
                && !keep_going
            {
                let error = ReadError {
                    file: file.url.clone(),
                    line: Some(first.line),
                    message: first.error.clone(),
                    retryable: false,
                };
                return fail(error).await;
            }
            collect(&quarantined, bad.into_iter().map(|b| Entry::record(&file.url, b)));
            let batch = match next {
                Ok(Some(batch)) => batch,
                Ok(None) => break,
                Err(FileError::Read(e)) if keep_going && !e.retryable => {
                    // The rest of the file cannot be read; what was read stays.
                    collect(&quarantined, [Entry::file(&file.url, e.message)]);
                    break;
                }
                Err(FileError::Read(e)) => return fail(e).await,
                Err(FileError::NewColumns { columns, line }) => {
                    return new_columns(&task, index, columns, line, &sender).await;
                }
            };
            let batch = match cut.as_mut().map(|c| c.apply(&batch)) {
                None => batch,
                Some(Ok(batch)) => batch,
                Some(Err(message)) => {
                    return fail(ReadError { file: file.url.clone(), line: None, message, retryable: false }).await;
                }
            };
            let batch = match append_metadata(batch, &relation_schema, file, task.ingest_time_us) {
                Ok(batch) => batch,
                Err(e) => {
                    return fail(ReadError {
                        file: file.url.clone(),
                        line: None,
                        message: e.to_string(),
                        retryable: false,
                    })
                    .await;
                }
            };
            if sender.send(Ok(batch)).await.is_err() {
                return ReadEnd::Stopped;
            }
            if first_batch {
                first_batch = false;
                failpoint::hit(failpoint::DURING_READ).await;
            }
        }
        bytes += file.size;
    }
    ReadEnd::Done { bytes, files: task.files.len() as u64, watermark: cut.and_then(|c| c.max) }
}

/// Ends reading at columns the schema lacks, found in `task.files[index]`:
/// an error naming them (`fail_on_new_columns`), or what the coordinator needs
/// to add them (`add_new_columns`): their types, inferred from this file on.
async fn new_columns(
    task: &TaskSpec,
    index: usize,
    columns: Vec<String>,
    line: Option<u64>,
    sender: &mpsc::Sender<Result<RecordBatch, DataFusionError>>,
) -> ReadEnd {
    let file = &task.files[index];
    if task.schema_evolution != SchemaEvolution::AddNewColumns {
        let names = columns.iter().map(|c| format!("`{c}`")).collect::<Vec<_>>().join(", ");
        let message = format!(
            "new column {names}, which the schema does not have (schema_evolution: {}); \
             nothing was committed. Add the column to the schema, or choose add_new_columns, rescue or none",
            task.schema_evolution.as_str()
        );
        return fail_read(sender, ReadError { file: file.url.clone(), line, message, retryable: false }).await;
    }
    // The new columns' types, from at most 100 of the task's files from this one on.
    let sample = SchemaSample { max_files: 100, ..SchemaSample::default() };
    let observed = match infer_schema(&task.files[index..], task.format, &task.csv, sample, &task.storage).await {
        Ok(observed) => observed,
        Err(error) => return fail_read(sender, error).await,
    };
    let _ = sender.send(Err(DataFusionError::Execution("the schema evolves".to_string()))).await;
    ReadEnd::NewColumns(NewColumns { file: file.url.clone(), line, columns, observed })
}

/// What a task wrote.
struct Written {
    adds: Vec<deltalake::kernel::Add>,
    removes: Vec<deltalake::kernel::Remove>,
    cdc: Vec<deltalake::kernel::AddCDCFile>,
    rows: u64,
    merge: Option<MergeCounts>,
}

async fn write_output(
    task: &TaskSpec,
    relation_schema: SchemaRef,
    receiver: mpsc::Receiver<Result<RecordBatch, DataFusionError>>,
    table_schema: &SchemaRef,
    quarantined: &Collector,
    expected: &Arc<Mutex<Outcome>>,
) -> Result<Written, WorkerError> {
    let stream =
        transform::execute(relation_schema, receiver, task.transform.as_deref(), &task.tables, &task.storage).await?;
    write_stream(task, stream, table_schema, quarantined, expected).await
}

/// Writes the transform's output: data files below the table, or a merge.
async fn write_stream(
    task: &TaskSpec,
    mut stream: datafusion::execution::SendableRecordBatchStream,
    table_schema: &SchemaRef,
    quarantined: &Collector,
    expected: &Arc<Mutex<Outcome>>,
) -> Result<Written, WorkerError> {
    if !task.expectations.is_empty() {
        let checks = Expectations::compile(&task.expectations, &stream.schema()).map_err(WorkerError::Expectation)?;
        stream = checks.apply(stream, quarantined.clone(), expected.clone());
    }
    let table_url = parse_url(&task.table_url)?;
    ensure_local_dir(&table_url)?;
    if let Some(merge) = &task.merge {
        let output = merge_changes(
            &merge.spec,
            &table_url,
            merge.target_version,
            stream,
            table_schema,
            &task.partition_by,
            &task.storage,
        )
        .await?;
        return Ok(Written {
            adds: output.adds,
            removes: output.removes,
            cdc: output.cdc,
            rows: output.rows_written,
            merge: Some(output.counts),
        });
    }
    let table = table_builder(&table_url, &task.storage)?.build()?;
    let config = WriterConfig::new(
        table_schema.clone(),
        task.partition_by.clone(),
        None,
        NonZeroU64::new(TARGET_FILE_SIZE),
        None,
        DataSkippingNumIndexedCols::NumColumns(32),
        None,
    );
    let mut writer = DeltaWriter::new(table.object_store(), config);
    match drain(&mut stream, &mut writer, table_schema).await {
        Ok(rows) => {
            Ok(Written { adds: writer.close().await?, removes: Vec::new(), cdc: Vec::new(), rows, merge: None })
        }
        Err(error) => {
            // Files already closed stay behind unreferenced; the table never sees them.
            let _ = writer.abort().await;
            Err(error)
        }
    }
}

/// A transform's failure while its output streams; a query on Ballista that
/// failed on the way keeps its own (retryable) error.
fn stream_failure(error: DataFusionError) -> WorkerError {
    match error {
        DataFusionError::External(inner) => match inner.downcast::<WorkerError>() {
            Ok(error) => *error,
            Err(inner) => WorkerError::Transform(inner.to_string()),
        },
        DataFusionError::Context(_, inner) => stream_failure(*inner),
        other => WorkerError::Transform(other.to_string()),
    }
}

/// Writes every batch of the transform's output; returns the number of rows.
async fn drain(
    stream: &mut datafusion::execution::SendableRecordBatchStream,
    writer: &mut DeltaWriter,
    table_schema: &SchemaRef,
) -> Result<u64, WorkerError> {
    let mut rows = 0u64;
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(stream_failure)?;
        let batch = conform_batch(&batch, table_schema).map_err(|e| WorkerError::Schema(e.to_string()))?;
        rows += batch.num_rows() as u64;
        writer.write(&batch).await?;
    }
    Ok(rows)
}
