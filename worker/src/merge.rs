//! Applies a batch of changes to a Delta table by key (SCD type 1): the data
//! files to write and the files they replace. Nothing is committed here; the
//! coordinator commits the result on the very table version it was computed
//! from.
//!
//! 1. The batch is resolved to one change per key: `update_preimage` rows are
//!    dropped, `delete_when` marks deletes, and the change with the highest
//!    `sequence_by` wins (the later one in the feed on a tie).
//! 2. Only the target files whose statistics say they may hold one of the
//!    batch's keys are read, and only their key and sequence columns. A change
//!    older than the row the table holds is ignored.
//! 3. Files holding a key that changes are rewritten without those rows; the
//!    winning upserts are written, sorted by key, as new files.
//!
//! So the cost follows the changes: files no key falls into are never opened.

// `ParquetObjectReader` is deprecated in parquet 59 (see formats.rs).
#![allow(deprecated)]

use std::collections::{HashMap, HashSet};
use std::num::NonZeroU64;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, RecordBatch, UInt64Array};
use arrow::compute::{cast, concat_batches, filter_record_batch, not};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};
use arrow::row::{RowConverter, Rows, SortField};
use datafusion::datasource::MemTable;
use datafusion::execution::SendableRecordBatchStream;
use delta_kernel::table_properties::DataSkippingNumIndexedCols;
use deltalake::DeltaTable;
use deltalake::datafile::writer::{DeltaWriter, WriterConfig};
use deltalake::kernel::{Add, AddCDCFile, Remove};
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStore;
use object_store::path::Path as StorePath;
use parquet::arrow::ParquetRecordBatchStreamBuilder;
use parquet::arrow::ProjectionMask;
use parquet::arrow::async_reader::ParquetObjectReader;
use sluice_proto::spec::MergeSpec;
use sluice_proto::storage::StorageOptions;
use sluice_proto::task::MergeCounts;
use url::Url;

use crate::change_data;
use crate::conform::conform_batch;
use crate::delta_source::{CHANGE_TYPE, FileBounds, file_bounds, open_table};
use crate::error::WorkerError;
use crate::task_runner::TARGET_FILE_SIZE;
use crate::transform::{session_context, sql_options};

const DELETE: &str = "__sluice_delete";

/// Target files read at a time.
const READ_CONCURRENCY: usize = 4;

/// Candidate files up to this size in all are read whole in one pass (their
/// rows are kept for the rewrite); larger sets are probed by key first.
/// Decoded, Parquet takes about three times its size (the 18 MB of the merge
/// benchmark's 1 M rows, for one), so this keeps a merge's rows in memory to
/// a couple of hundred MB.
const READ_WHOLE_BYTES: u64 = 64 << 20;

pub struct MergeOutput {
    pub adds: Vec<Add>,
    pub removes: Vec<Remove>,
    /// Change data files (see [`crate::change_data`]).
    pub cdc: Vec<AddCDCFile>,
    pub counts: MergeCounts,
    /// Rows written: the batch's upserts plus the rows kept from rewritten files.
    pub rows_written: u64,
}

pub(crate) fn transform_error(error: impl std::fmt::Display) -> WorkerError {
    WorkerError::Transform(error.to_string())
}

pub(crate) fn merge_error(message: impl Into<String>) -> WorkerError {
    WorkerError::Schema(message.into())
}

/// Merges the changes on `changes` into the table at `table_url` as of
/// `target_version` (`None`: no table yet, every upsert is an insert).
/// `partition_by`: the sink's partition columns, for a table that does not
/// exist yet (an existing table's own are used).
pub async fn merge_changes(
    spec: &MergeSpec,
    table_url: &Url,
    target_version: Option<u64>,
    changes: SendableRecordBatchStream,
    table_schema: &SchemaRef,
    partition_by: &[String],
    storage: &StorageOptions,
) -> Result<MergeOutput, WorkerError> {
    let changes = load_changes(spec, changes).await?;
    let target = Target::open(table_url, target_version, partition_by, storage).await?;
    if spec.scd == 2 {
        return crate::history::merge_history(spec, &target, changes, table_schema).await;
    }
    let Resolved { batch: resolved, order, key_rows } = resolve(spec, changes)?;
    let mut counts = MergeCounts::default();
    // Each key's first change: the one that stands for all of the key's rows
    // (there are several only with `replace_rows_per_key`).
    let mut index: HashMap<&[u8], usize> = HashMap::with_capacity(key_rows.len());
    let canonical: Vec<usize> =
        key_rows.iter().enumerate().map(|(i, row)| *index.entry(row.as_ref()).or_insert(i)).collect();
    let deletes =
        resolved.column_by_name(DELETE).map(|c| c.as_boolean().clone()).ok_or_else(|| merge_error("no delete flag"))?;
    let sequence = resolved.column_by_name(&spec.sequence_by).cloned().ok_or_else(|| merge_error("no sequence"))?;
    let sequence_rows = order.sequence_rows(&sequence)?;
    let first_key = resolved.column_by_name(&spec.keys[0]).cloned().ok_or_else(|| merge_error("no key"))?;

    // Which target rows hold a key of the batch, and which changes are stale.
    let mut stale: HashSet<usize> = HashSet::new();
    let mut matched: HashSet<usize> = HashSet::new();
    // Files to rewrite, with their rows when they were read whole already.
    let mut to_rewrite: Vec<(TargetFile, Vec<RecordBatch>)> = Vec::new();
    if let Some(table) = &target.table {
        let candidates = candidate_files(table, &spec.keys[0], &first_key).await?;
        counts.files_scanned = candidates.len() as u64;
        // Small enough: read the candidates whole at once, so that the files to
        // rewrite are not read a second time. Otherwise only keys and sequence.
        let whole = candidates.iter().map(|f| f.size).sum::<u64>() <= READ_WHOLE_BYTES;
        let mut probe_columns: Vec<String> = spec.keys.clone();
        probe_columns.push(spec.sequence_by.clone());
        let probes = target.read_files(candidates, (!whole).then_some(probe_columns), table_schema);
        futures::pin_mut!(probes);
        let mut touched: Vec<(TargetFile, Vec<usize>, Vec<RecordBatch>)> = Vec::new();
        while let Some(probe) = probes.next().await {
            let (file, batches) = probe?;
            let mut hits: Vec<usize> = Vec::new();
            for batch in &batches {
                let rows = order.key_rows(batch)?;
                let mut hit_rows: Vec<u32> = Vec::new();
                let first_hit = hits.len();
                for (row_index, row) in rows.iter().enumerate() {
                    let Some(&change) = index.get(row.as_ref()) else { continue };
                    hits.push(change);
                    hit_rows.push(row_index as u32);
                }
                // Stale changes: older than the target's row. Only the rows hit are compared.
                let Some(column) = batch.column_by_name(&spec.sequence_by) else { continue };
                if hit_rows.is_empty() {
                    continue;
                }
                let column = arrow::compute::take(column, &arrow::array::UInt32Array::from(hit_rows), None)
                    .map_err(transform_error)?;
                let target_rows = order.sequence_rows(&column)?;
                for (at, &change) in hits[first_hit..].iter().enumerate() {
                    // A NULL sequence on either side never makes a change stale.
                    if column.is_valid(at)
                        && sequence.is_valid(change)
                        && target_rows.row(at) > sequence_rows.row(change)
                    {
                        stale.insert(change);
                    }
                }
            }
            if !hits.is_empty() {
                touched.push((file, hits, if whole { batches } else { Vec::new() }));
            }
        }
        for (file, hits, batches) in touched {
            matched.extend(hits.iter().copied());
            if hits.iter().any(|change| !stale.contains(change)) {
                to_rewrite.push((file, batches));
            }
        }
    }

    // Counts by change.
    for (change, &key) in canonical.iter().enumerate() {
        let delete = deletes.value(change);
        match (stale.contains(&key), matched.contains(&key), delete) {
            (true, _, _) | (false, false, true) => counts.ignored += 1,
            (false, true, true) => counts.deleted += 1,
            (false, true, false) => counts.updated += 1,
            (false, false, false) => counts.inserted += 1,
        }
    }
    counts.files_rewritten = to_rewrite.len() as u64;

    // What stays of each rewritten file is written to a file of its own (so
    // the table keeps its layout, and its key ranges), several files encoded
    // at once; the rows the batch replaces are kept aside only when an
    // update's NULLs keep their values or change data is written.
    let replaced: HashSet<&[u8]> =
        index.iter().filter(|(_, change)| !stale.contains(change)).map(|(row, _)| *row).collect();
    let mut rows_written = 0u64;
    let mut replaced_rows: Vec<RecordBatch> = Vec::new();
    let mut removes: Vec<Remove> = Vec::with_capacity(to_rewrite.len());
    let encoders = Arc::new(tokio::sync::Semaphore::new(encode_concurrency()));
    let mut encoding: tokio::task::JoinSet<Result<Vec<Add>, WorkerError>> = tokio::task::JoinSet::new();
    let (read, unread): (Vec<_>, Vec<_>) = to_rewrite.into_iter().partition(|(_, batches)| !batches.is_empty());
    let unread: Vec<TargetFile> = unread.into_iter().map(|(file, _)| file).collect();
    let rewrites = futures::stream::iter(read.into_iter().map(Ok)).chain(target.read_files(unread, None, table_schema));
    futures::pin_mut!(rewrites);
    while let Some(rewrite) = rewrites.next().await {
        let (file, batches) = rewrite?;
        let mut kept_batches = Vec::with_capacity(batches.len());
        for batch in batches {
            let rows = order.key_rows(&batch)?;
            let keep: BooleanArray = rows.iter().map(|row| Some(!replaced.contains(row.as_ref()))).collect();
            let kept = filter_record_batch(&batch, &keep).map_err(transform_error)?;
            if (spec.ignore_null_updates || target.change_data) && kept.num_rows() < batch.num_rows() {
                let gone =
                    filter_record_batch(&batch, &not(&keep).map_err(transform_error)?).map_err(transform_error)?;
                replaced_rows.push(conform_batch(&gone, table_schema).map_err(|e| merge_error(e.to_string()))?);
            }
            if kept.num_rows() > 0 {
                let kept = conform_batch(&kept, table_schema).map_err(|e| merge_error(e.to_string()))?;
                rows_written += kept.num_rows() as u64;
                kept_batches.push(kept);
            }
        }
        removes.push(file.remove);
        if kept_batches.is_empty() {
            continue;
        }
        let permit = encoders.clone().acquire_owned().await.map_err(transform_error)?;
        let mut writer = new_writer(target.store.clone(), table_schema, &target.partition_by);
        encoding.spawn(async move {
            let _permit = permit;
            for batch in &kept_batches {
                writer.write(batch).await?;
            }
            Ok(writer.close().await?)
        });
    }
    let mut writer = new_writer(target.store.clone(), table_schema, &target.partition_by);

    // The upserts: the winning changes that are neither deletes nor stale.
    let keep_upsert: BooleanArray =
        (0..resolved.num_rows()).map(|i| Some(!deletes.value(i) && !stale.contains(&canonical[i]))).collect();
    let upserts = filter_record_batch(&resolved, &keep_upsert).map_err(transform_error)?;
    let mut upserts = conform_batch(&upserts, table_schema).map_err(|e| merge_error(e.to_string()))?;
    if !replaced_rows.is_empty() {
        upserts = keep_values_of_nulls(&order, &spec.keys, upserts, &replaced_rows)?;
    }
    if upserts.num_rows() > 0 {
        rows_written += upserts.num_rows() as u64;
        writer.write(&upserts).await?;
    }
    let mut adds = writer.close().await?;
    while let Some(encoded) = encoding.join_next().await {
        adds.extend(encoded.map_err(|e| merge_error(format!("a rewrite failed: {e}")))??);
    }
    let cdc = if target.change_data && !removes.is_empty() {
        change_data::write(&target, table_schema, &order, &replaced_rows, &[upserts]).await?
    } else {
        Vec::new()
    };
    Ok(MergeOutput { adds, removes, cdc, counts, rows_written })
}

/// `ignore_null_updates`: a NULL in an update keeps the value the table held.
fn keep_values_of_nulls(
    order: &RowOrder,
    keys: &[String],
    upserts: RecordBatch,
    previous: &[RecordBatch],
) -> Result<RecordBatch, WorkerError> {
    let previous = concat_batches(&upserts.schema(), previous).map_err(transform_error)?;
    let previous_keys = order.key_rows(&previous)?;
    let position: HashMap<&[u8], u64> =
        previous_keys.iter().enumerate().map(|(i, row)| (row.data(), i as u64)).collect();
    let upsert_keys = order.key_rows(&upserts)?;
    let aligned: UInt64Array = upsert_keys.iter().map(|row| position.get(row.data()).copied()).collect();
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(upserts.num_columns());
    for (field, column) in upserts.schema().fields().iter().zip(upserts.columns()) {
        if keys.contains(field.name()) || column.null_count() == 0 {
            columns.push(column.clone());
            continue;
        }
        let before = arrow::compute::take(previous.column_by_name(field.name()).unwrap_or(column), &aligned, None)
            .map_err(transform_error)?;
        let nulls = arrow::compute::is_null(column).map_err(transform_error)?;
        columns.push(arrow::compute::kernels::zip::zip(&nulls, &before, column).map_err(transform_error)?);
    }
    RecordBatch::try_new(upserts.schema(), columns).map_err(transform_error)
}

/// The target table as of the version a merge is computed on, and its store.
pub(crate) struct Target {
    pub table: Option<DeltaTable>,
    pub store: Arc<dyn ObjectStore>,
    /// The table records its change data feed: a merge that rewrites files
    /// writes change data files.
    pub change_data: bool,
    /// Its partition columns: not in its data files, but in each file's
    /// partition values; what is written is split by them.
    pub partition_by: Vec<String>,
}

impl Target {
    async fn open(
        table_url: &Url,
        version: Option<u64>,
        partition_by: &[String],
        storage: &StorageOptions,
    ) -> Result<Self, WorkerError> {
        let table = match version {
            Some(version) => Some(open_table(table_url, Some(version), storage).await?),
            None => None,
        };
        let store = match &table {
            Some(table) => table.object_store(),
            None => crate::storage::table_builder(table_url, storage)?.build()?.object_store(),
        };
        let change_data = table.as_ref().is_some_and(change_data::enabled);
        let partition_by = match &table {
            Some(table) => table.snapshot()?.metadata().partition_columns().to_vec(),
            None => partition_by.to_vec(),
        };
        Ok(Self { table, store, change_data, partition_by })
    }

    /// Reads `files`, a few at a time, in order: all columns or only
    /// `columns`, with the partition columns among them filled in from each
    /// file's partition values (typed as in `table_schema`).
    pub(crate) fn read_files(
        &self,
        files: Vec<TargetFile>,
        columns: Option<Vec<String>>,
        table_schema: &SchemaRef,
    ) -> impl futures::Stream<Item = Result<(TargetFile, Vec<RecordBatch>), WorkerError>> + use<> {
        let partitions: Vec<Field> = self
            .partition_by
            .iter()
            .filter(|p| columns.as_ref().is_none_or(|c| c.contains(p)))
            .filter_map(|p| table_schema.field_with_name(p).ok().cloned())
            .collect();
        read_files(&self.store, files, columns).map(move |read| {
            let (file, batches) = read?;
            if partitions.is_empty() {
                return Ok((file, batches));
            }
            let batches = batches
                .iter()
                .map(|batch| with_partition_values(batch, &partitions, &file))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((file, batches))
        })
    }
}

/// `batch`, read from `file`, with the partition columns appended.
fn with_partition_values(batch: &RecordBatch, fields: &[Field], file: &TargetFile) -> Result<RecordBatch, WorkerError> {
    let values = file.remove.partition_values.as_ref();
    let mut schema_fields: Vec<Field> = batch.schema().fields().iter().map(|f| f.as_ref().clone()).collect();
    let mut columns = batch.columns().to_vec();
    for field in fields {
        if batch.schema().field_with_name(field.name()).is_ok() {
            continue;
        }
        let value = values.and_then(|v| v.get(field.name())).cloned().flatten();
        let text: ArrayRef = Arc::new(arrow::array::StringArray::from(vec![value; batch.num_rows()]));
        let column = cast(&text, field.data_type())
            .map_err(|e| merge_error(format!("partition value of `{}` in {}: {e}", field.name(), file.path)))?;
        schema_fields.push(field.clone().with_nullable(true));
        columns.push(column);
    }
    RecordBatch::try_new(Arc::new(Schema::new(schema_fields)), columns).map_err(transform_error)
}

/// Rewritten files encoded at once: one per core.
fn encode_concurrency() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

pub(crate) fn new_writer(
    store: Arc<dyn ObjectStore>,
    table_schema: &SchemaRef,
    partition_by: &[String],
) -> DeltaWriter {
    let config = WriterConfig::new(
        table_schema.clone(),
        partition_by.to_vec(),
        None,
        NonZeroU64::new(TARGET_FILE_SIZE),
        None,
        DataSkippingNumIndexedCols::NumColumns(32),
        None,
    );
    DeltaWriter::new(store, config)
}

/// The batch resolved to one change per key (or, with `replace_rows_per_key`,
/// the rows of each key's newest change).
struct Resolved {
    /// The winning changes, sorted by key, with a `__sluice_delete` column.
    batch: RecordBatch,
    order: RowOrder,
    /// The winners' keys in row format, in the order of `batch`.
    key_rows: Vec<Box<[u8]>>,
}

/// Keys and sequences in Arrow's row format, where byte order is value order;
/// a column of the table is cast to the changes' type first.
pub(crate) struct RowOrder {
    keys: Vec<String>,
    key_types: Vec<DataType>,
    key_converter: RowConverter,
    sequence_type: DataType,
    sequence_converter: RowConverter,
}

impl RowOrder {
    pub(crate) fn new(spec: &MergeSpec, schema: &Schema) -> Result<Self, WorkerError> {
        let type_of = |name: &str| {
            schema.field_with_name(name).map(|f| f.data_type().clone()).map_err(|e| merge_error(e.to_string()))
        };
        let key_types: Vec<DataType> = spec.keys.iter().map(|k| type_of(k)).collect::<Result<_, _>>()?;
        let sequence_type = type_of(&spec.sequence_by)?;
        let converter = |types: &[DataType]| {
            RowConverter::new(types.iter().map(|t| SortField::new(t.clone())).collect()).map_err(transform_error)
        };
        Ok(Self {
            keys: spec.keys.clone(),
            key_converter: converter(&key_types)?,
            key_types,
            sequence_converter: converter(std::slice::from_ref(&sequence_type))?,
            sequence_type,
        })
    }

    fn cast_to(column: &ArrayRef, data_type: &DataType) -> Result<ArrayRef, WorkerError> {
        if column.data_type() == data_type {
            Ok(column.clone())
        } else {
            cast(column, data_type).map_err(transform_error)
        }
    }

    /// The key of every row of `batch` (changes or a data file of the table).
    pub(crate) fn key_rows(&self, batch: &RecordBatch) -> Result<Rows, WorkerError> {
        let columns: Vec<ArrayRef> = self
            .keys
            .iter()
            .zip(&self.key_types)
            .map(|(key, data_type)| {
                let column = batch.column_by_name(key).ok_or_else(|| merge_error(format!("no key column `{key}`")))?;
                Self::cast_to(column, data_type)
            })
            .collect::<Result<_, _>>()?;
        self.key_converter.convert_columns(&columns).map_err(transform_error)
    }

    fn sequence_rows(&self, column: &ArrayRef) -> Result<Rows, WorkerError> {
        let column = Self::cast_to(column, &self.sequence_type)?;
        self.sequence_converter.convert_columns(&[column]).map_err(transform_error)
    }
}

/// Fails, naming the column, when `schema` lacks a column the merge needs.
pub fn check_merge_columns(spec: &MergeSpec, schema: &Schema) -> Result<(), String> {
    let needed = spec.keys.iter().chain([&spec.sequence_by]).chain(&spec.track_history_columns);
    if let Some(column) = needed.into_iter().find(|c| schema.field_with_name(c).is_err()) {
        return Err(format!(
            "the merge needs column `{column}`, which the flow does not produce; it produces: {}",
            schema.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", ")
        ));
    }
    if spec.scd == 2 {
        let reserved = [crate::history::START_AT, crate::history::END_AT];
        if let Some(column) =
            reserved.iter().find(|c| schema.field_with_name(c).is_ok() && !spec.except_columns.iter().any(|e| e == **c))
        {
            return Err(format!(
                "the flow produces column `{column}`, which an SCD type 2 merge adds itself; rename it or list it in `except_columns`"
            ));
        }
    }
    Ok(())
}

/// The batch's changes, all of them, with what a merge needs to place them.
pub(crate) struct Changes {
    pub all: RecordBatch,
    pub order: RowOrder,
    /// `delete_when` for every change.
    pub deletes: BooleanArray,
    /// `update_preimage` rows of a change data feed, which a merge ignores.
    pub preimage: Vec<bool>,
}

/// Reads the batch's changes; fails on a NULL key.
async fn load_changes(spec: &MergeSpec, mut changes: SendableRecordBatchStream) -> Result<Changes, WorkerError> {
    let schema = changes.schema();
    check_merge_columns(spec, &schema).map_err(merge_error)?;
    let order = RowOrder::new(spec, &schema)?;
    let mut batches = Vec::new();
    while let Some(batch) = changes.next().await {
        batches.push(batch.map_err(transform_error)?);
    }
    let all = concat_batches(&schema, &batches).map_err(transform_error)?;
    drop(batches);

    let null_keys = spec.keys.iter().filter_map(|k| all.column_by_name(k)).map(|c| c.null_count()).max().unwrap_or(0);
    if null_keys > 0 {
        return Err(merge_error(format!(
            "{null_keys} change(s) have a NULL key ({}); a merge cannot place them",
            spec.keys.join(", ")
        )));
    }
    let deletes = delete_flags(spec, &all).await?.as_boolean().clone();
    let preimage: Vec<bool> = match all.column_by_name(CHANGE_TYPE) {
        Some(column) => {
            let text = cast(column, &DataType::Utf8).unwrap_or_else(|_| column.clone());
            let text = text.as_string::<i32>();
            (0..all.num_rows()).map(|i| text.is_valid(i) && text.value(i) == "update_preimage").collect()
        }
        None => vec![false; all.num_rows()],
    };
    Ok(Changes { all, order, deletes, preimage })
}

/// One change per key, with a `__sluice_delete` flag, sorted by key.
///
/// Done by hand rather than with a window query: keys and sequences are
/// compared in Arrow's row format, one pass over the batch, which is several
/// times faster than `ROW_NUMBER() OVER (PARTITION BY ..)` for this.
fn resolve(spec: &MergeSpec, changes: Changes) -> Result<Resolved, WorkerError> {
    let Changes { all, order, deletes, preimage } = changes;
    let key_rows = order.key_rows(&all)?;
    let sequence = all.column_by_name(&spec.sequence_by).cloned().ok_or_else(|| merge_error("no sequence column"))?;
    let sequence_rows = order.sequence_rows(&sequence)?;

    // For each key, the change with the highest sequence; the later one on a tie.
    let mut best: HashMap<&[u8], usize> = HashMap::with_capacity(all.num_rows());
    for row in (0..all.num_rows()).filter(|row| !preimage[*row]) {
        best.entry(key_rows.row(row).data())
            .and_modify(|current| {
                if sequence_rows.row(row) >= sequence_rows.row(*current) {
                    *current = row;
                }
            })
            .or_insert(row);
    }
    let mut winners: Vec<(&[u8], usize)> = if spec.replace_rows_per_key {
        // Every row of each key's newest change.
        (0..all.num_rows())
            .filter(|row| !preimage[*row])
            .map(|row| (key_rows.row(row).data(), row))
            .filter(|(key, row)| best.get(key).is_some_and(|b| sequence_rows.row(*b) == sequence_rows.row(*row)))
            .collect()
    } else {
        best.into_iter().collect()
    };
    winners.sort_unstable_by(|a, b| a.0.cmp(b.0).then(a.1.cmp(&b.1)));
    let indices = UInt64Array::from_iter_values(winners.iter().map(|(_, row)| *row as u64));

    let schema = all.schema();
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new(DELETE, DataType::Boolean, false));
    let mut columns: Vec<ArrayRef> = all
        .columns()
        .iter()
        .map(|c| arrow::compute::take(c, &indices, None))
        .collect::<Result<_, _>>()
        .map_err(transform_error)?;
    columns.push(arrow::compute::take(&deletes, &indices, None).map_err(transform_error)?);
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).map_err(transform_error)?;
    let key_rows = winners.into_iter().map(|(key, _)| Box::from(key)).collect();
    Ok(Resolved { batch, order, key_rows })
}

/// `delete_when` evaluated for every change (false where it is NULL).
async fn delete_flags(spec: &MergeSpec, all: &RecordBatch) -> Result<ArrayRef, WorkerError> {
    let Some(predicate) = &spec.delete_when else {
        return Ok(Arc::new(BooleanArray::from(vec![false; all.num_rows()])));
    };
    let ctx = session_context();
    let table = MemTable::try_new(all.schema(), vec![vec![all.clone()]]).map_err(transform_error)?;
    ctx.register_table("changes", Arc::new(table)).map_err(transform_error)?;
    let sql = format!("SELECT COALESCE(({predicate}), false) AS {DELETE} FROM changes");
    let frame = ctx.sql_with_options(&sql, sql_options()).await.map_err(|e| {
        WorkerError::Transform(format!("`delete_when` is not a valid predicate over the flow's output: {e}"))
    })?;
    let batches = frame.collect().await.map_err(transform_error)?;
    let flags = concat_batches(&batches.first().map_or_else(|| Arc::new(Schema::empty()), |b| b.schema()), &batches)
        .map_err(transform_error)?;
    if flags.num_rows() != all.num_rows() || flags.num_columns() != 1 {
        return Err(merge_error("`delete_when` did not give one value per change"));
    }
    cast(flags.column(0), &DataType::Boolean).map_err(transform_error)
}

/// A data file of the target table.
pub(crate) struct TargetFile {
    path: StorePath,
    size: u64,
    pub remove: Remove,
}

/// The files whose statistics for the first key column may hold one of `keys`.
pub(crate) async fn candidate_files(
    table: &DeltaTable,
    key: &str,
    keys: &ArrayRef,
) -> Result<Vec<TargetFile>, WorkerError> {
    let bounds = KeyBounds::of(keys);
    let mut candidates = Vec::new();
    for FileBounds { file, min, max } in file_bounds(table, key).await? {
        let remove = file.remove_action(true);
        // A key that is a partition column has no statistics: its file's partition value bounds it.
        let (min, max) =
            match (min, max) {
                (Some(min), Some(max)) => (Some(min), Some(max)),
                _ => {
                    let value =
                        remove.partition_values.as_ref().and_then(|v| v.get(key)).cloned().flatten().map(|v| {
                            v.parse::<i64>().map(serde_json::Value::from).unwrap_or(serde_json::Value::String(v))
                        });
                    (value.clone(), value)
                }
            };
        if let (Some(bounds), Some(min), Some(max)) = (&bounds, &min, &max)
            && !bounds.any_within(min, max)
        {
            continue;
        }
        candidates.push(TargetFile { path: file.object_store_path(), size: file.size() as u64, remove });
    }
    Ok(candidates)
}

/// The batch's values of the first key, sorted, for range checks against file statistics.
enum KeyBounds {
    Int(Vec<i64>),
    Text(Vec<String>),
}

impl KeyBounds {
    fn of(keys: &ArrayRef) -> Option<Self> {
        match keys.data_type() {
            DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => {
                let keys = cast(keys, &DataType::Int64).ok()?;
                let mut values: Vec<i64> = keys.as_primitive::<Int64Type>().iter().flatten().collect();
                values.sort_unstable();
                Some(KeyBounds::Int(values))
            }
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
                let keys = cast(keys, &DataType::Utf8).ok()?;
                let mut values: Vec<String> = keys.as_string::<i32>().iter().flatten().map(str::to_string).collect();
                values.sort_unstable();
                Some(KeyBounds::Text(values))
            }
            _ => None,
        }
    }

    /// False only when no value lies within `[min, max]` for sure. Delta may
    /// truncate string statistics, so a string max is extended to cover that.
    fn any_within(&self, min: &serde_json::Value, max: &serde_json::Value) -> bool {
        match self {
            KeyBounds::Int(values) => {
                let (Some(min), Some(max)) = (min.as_i64(), max.as_i64()) else { return true };
                let first = values.partition_point(|v| *v < min);
                values.get(first).is_some_and(|v| *v <= max)
            }
            KeyBounds::Text(values) => {
                let (Some(min), Some(max)) = (min.as_str(), max.as_str()) else { return true };
                let first = values.partition_point(|v| v.as_str() < min);
                values.get(first).is_some_and(|v| v.as_str() <= max || v.starts_with(max))
            }
        }
    }
}

/// Reads `files`, a few at a time, in order: all columns or only `columns`.
pub(crate) fn read_files(
    store: &Arc<dyn ObjectStore>,
    files: Vec<TargetFile>,
    columns: Option<Vec<String>>,
) -> impl futures::Stream<Item = Result<(TargetFile, Vec<RecordBatch>), WorkerError>> + use<> {
    let store = store.clone();
    futures::stream::iter(files.into_iter().map(move |file| {
        let store = store.clone();
        let columns = columns.clone();
        async move {
            let batches = read_file(&store, &file, columns.as_deref()).await?;
            Ok((file, batches))
        }
    }))
    .buffered(READ_CONCURRENCY)
}

/// Reads a data file, all columns or only `columns`.
async fn read_file(
    store: &Arc<dyn ObjectStore>,
    file: &TargetFile,
    columns: Option<&[String]>,
) -> Result<Vec<RecordBatch>, WorkerError> {
    let reader = ParquetObjectReader::new(store.clone(), file.path.clone()).with_file_size(file.size);
    let mut builder = ParquetRecordBatchStreamBuilder::new(reader).await.map_err(read_failed(file))?;
    if let Some(columns) = columns {
        let schema = builder.schema().clone();
        let indices: Vec<usize> = columns.iter().filter_map(|c| schema.index_of(c).ok()).collect();
        let mask = ProjectionMask::roots(builder.parquet_schema(), indices);
        builder = builder.with_projection(mask);
    }
    let stream = builder.with_batch_size(64 * 1024).build().map_err(read_failed(file))?;
    stream.try_collect().await.map_err(read_failed(file))
}

fn read_failed(file: &TargetFile) -> impl Fn(parquet::errors::ParquetError) -> WorkerError + '_ {
    move |e| {
        WorkerError::Read(crate::error::ReadError {
            file: file.path.to_string(),
            line: None,
            message: format!("cannot read a data file of the target table: {e}"),
            retryable: true,
        })
    }
}
