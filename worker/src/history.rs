//! Applies a batch of changes to a Delta table that keeps every version of a
//! row (SCD type 2): a version's `__start_at` is the sequence of the change that
//! opened it, its `__end_at` the sequence of the change that closed it (NULL for
//! the current version).
//!
//! For each key of the batch, the table's history of that key is read back as
//! the changes that made it (a version opened at `__start_at`, a delete at an
//! `__end_at` no version starts at), the batch's changes are added, and the
//! key's history is rebuilt in sequence order. So a change that arrives late
//! lands in the middle of the history instead of being dropped, and a batch
//! applied twice leaves the same history: a change replaces the one the table
//! already holds for the same key and sequence.
//!
//! As in the SCD 1 merge, only the target files whose statistics may hold one of
//! the batch's keys are read, and only those holding one are rewritten.

use std::collections::HashSet;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, RecordBatch, UInt64Array};
use arrow::compute::{cast, concat, concat_batches, filter_record_batch, not};
use arrow::datatypes::{DataType, Schema, SchemaRef};
use arrow::row::{RowConverter, Rows, SortField};
use deltalake::kernel::Remove;
use futures::StreamExt;
use sluice_proto::spec::MergeSpec;
use sluice_proto::task::MergeCounts;

use crate::change_data;
use crate::conform::conform_batch;
use crate::error::WorkerError;
use crate::merge::{Changes, MergeOutput, RowOrder, Target, candidate_files, merge_error, new_writer, transform_error};

/// The sequence that opened a version, and the one that closed it.
pub const START_AT: &str = "__start_at";
pub const END_AT: &str = "__end_at";

/// The columns a change must alter to open a new version: `track_history_columns`,
/// or every column but the keys and the sequence.
fn tracked_columns(spec: &MergeSpec, data: &Schema) -> Vec<String> {
    if !spec.track_history_columns.is_empty() {
        return spec.track_history_columns.clone();
    }
    data.fields()
        .iter()
        .map(|f| f.name().clone())
        .filter(|name| !spec.keys.contains(name) && *name != spec.sequence_by)
        .collect()
}

pub(crate) async fn merge_history(
    spec: &MergeSpec,
    target: &Target,
    changes: Changes,
    table_schema: &SchemaRef,
) -> Result<MergeOutput, WorkerError> {
    let Changes { all, order, deletes, preimage } = changes;
    let wanted: BooleanArray = preimage.iter().map(|p| Some(!p)).collect();
    let all = filter_record_batch(&all, &wanted).map_err(transform_error)?;
    let deletes = arrow::compute::filter(&deletes, &wanted).map_err(transform_error)?.as_boolean().clone();

    let batch_keys = order.key_rows(&all)?;
    let keys: HashSet<&[u8]> = batch_keys.iter().map(|row| row.data()).collect();
    let first_key = all.column_by_name(&spec.keys[0]).cloned().ok_or_else(|| merge_error("no key"))?;

    // Files holding a key of the batch are rewritten without that key's
    // versions, which are kept aside to be rebuilt.
    let mut counts = MergeCounts::default();
    let mut writer = new_writer(target.store.clone(), table_schema, &target.partition_by);
    let mut rows_written = 0u64;
    let mut history: Vec<RecordBatch> = Vec::new();
    let mut removes: Vec<Remove> = Vec::new();
    if let Some(table) = &target.table {
        let candidates = candidate_files(table, &spec.keys[0], &first_key).await?;
        counts.files_scanned = candidates.len() as u64;
        let mut touched = Vec::new();
        let probes = target.read_files(candidates, Some(spec.keys.clone()), table_schema);
        futures::pin_mut!(probes);
        while let Some(probe) = probes.next().await {
            let (file, batches) = probe?;
            let mut hit = false;
            for batch in &batches {
                hit = hit || order.key_rows(batch)?.iter().any(|row| keys.contains(row.data()));
            }
            if hit {
                touched.push(file);
            }
        }
        counts.files_rewritten = touched.len() as u64;
        let rewrites = target.read_files(touched, None, table_schema);
        futures::pin_mut!(rewrites);
        while let Some(rewrite) = rewrites.next().await {
            let (file, batches) = rewrite?;
            for batch in batches {
                let batch = conform_batch(&batch, table_schema).map_err(|e| merge_error(e.to_string()))?;
                let ours: BooleanArray =
                    order.key_rows(&batch)?.iter().map(|row| Some(keys.contains(row.data()))).collect();
                let kept =
                    filter_record_batch(&batch, &not(&ours).map_err(transform_error)?).map_err(transform_error)?;
                if kept.num_rows() > 0 {
                    rows_written += kept.num_rows() as u64;
                    writer.write(&kept).await?;
                }
                history.push(filter_record_batch(&batch, &ours).map_err(transform_error)?);
            }
            removes.push(file.remove);
        }
    }

    let events = Events::gather(&all, &deletes, &history, spec, &order, table_schema)?;
    let versions = events.versions(spec, &order, &tracked_columns(spec, &data_schema(table_schema)), &mut counts)?;
    if versions.num_rows() > 0 {
        rows_written += versions.num_rows() as u64;
        writer.write(&versions).await?;
    }
    let adds = writer.close().await?;
    let cdc = if target.change_data && !removes.is_empty() {
        // A version is a key's row opened at a `__start_at`.
        let mut identity = spec.clone();
        identity.keys.push(START_AT.to_string());
        let identity = RowOrder::new(&identity, table_schema)?;
        change_data::write(target, table_schema, &identity, &history, &[versions]).await?
    } else {
        Vec::new()
    };
    Ok(MergeOutput { adds, removes, cdc, counts, rows_written })
}

/// The changes of the batch's keys, the table's and the batch's, one row each.
struct Events {
    /// The row's values, in the table's columns without `__start_at`/`__end_at`.
    data: RecordBatch,
    sequence: ArrayRef,
    delete: Vec<bool>,
    /// True for the batch's changes (the others come from the table's history).
    from_batch: Vec<bool>,
    table_schema: SchemaRef,
}

impl Events {
    fn gather(
        changes: &RecordBatch,
        deletes: &BooleanArray,
        history: &[RecordBatch],
        spec: &MergeSpec,
        order: &RowOrder,
        table_schema: &SchemaRef,
    ) -> Result<Self, WorkerError> {
        let data_schema = &data_schema(table_schema);
        let sequence_type = table_schema.field_with_name(START_AT).map_err(|e| merge_error(e.to_string()))?.data_type();
        let shape = |batch: &RecordBatch| conform_batch(batch, data_schema).map_err(|e| merge_error(e.to_string()));
        let history = concat_batches(table_schema, history).map_err(transform_error)?;
        let column = |batch: &RecordBatch, name: &str| -> Result<ArrayRef, WorkerError> {
            let column = batch.column_by_name(name).ok_or_else(|| merge_error(format!("no column `{name}`")))?;
            cast(column, sequence_type).map_err(transform_error)
        };
        let starts = column(&history, START_AT)?;
        let ends = column(&history, END_AT)?;

        // A closed version that no other version follows was closed by a delete.
        let history_keys = order.key_rows(&history)?;
        let sequence_converter = sequence_converter(sequence_type)?;
        let start_rows = sequence_converter.convert_columns(std::slice::from_ref(&starts)).map_err(transform_error)?;
        let end_rows = sequence_converter.convert_columns(std::slice::from_ref(&ends)).map_err(transform_error)?;
        let opened: HashSet<(&[u8], &[u8])> =
            (0..history.num_rows()).map(|i| (history_keys.row(i).data(), start_rows.row(i).data())).collect();
        let closed_by_delete: BooleanArray = (0..history.num_rows())
            .map(|i| Some(ends.is_valid(i) && !opened.contains(&(history_keys.row(i).data(), end_rows.row(i).data()))))
            .collect();
        let deleted = filter_record_batch(&history, &closed_by_delete).map_err(transform_error)?;
        let delete_sequences = arrow::compute::filter(&ends, &closed_by_delete).map_err(transform_error)?;

        let parts = [shape(&history)?, shape(&deleted)?, shape(changes)?];
        let data = concat_batches(data_schema, &parts).map_err(transform_error)?;
        let change_sequences = column(changes, &spec.sequence_by)?;
        let sequence = concat(&[starts.as_ref(), delete_sequences.as_ref(), change_sequences.as_ref()])
            .map_err(transform_error)?;
        let mut delete = vec![false; history.num_rows()];
        delete.extend(std::iter::repeat_n(true, deleted.num_rows()));
        delete.extend(deletes.iter().map(|d| d.unwrap_or(false)));
        let mut from_batch = vec![false; history.num_rows() + deleted.num_rows()];
        from_batch.extend(std::iter::repeat_n(true, changes.num_rows()));
        Ok(Self { data, sequence, delete, from_batch, table_schema: table_schema.clone() })
    }

    /// Every version of every key, sorted by key and `__start_at`.
    fn versions(
        &self,
        spec: &MergeSpec,
        order: &RowOrder,
        tracked: &[String],
        counts: &mut MergeCounts,
    ) -> Result<RecordBatch, WorkerError> {
        let keys = order.key_rows(&self.data)?;
        let sequences = sequence_converter(self.sequence.data_type())?
            .convert_columns(std::slice::from_ref(&self.sequence))
            .map_err(transform_error)?;
        let mut events: Vec<usize> = (0..self.data.num_rows()).collect();
        // By key, then sequence; on a tie the table's change first, then the batch's in feed order.
        events.sort_by(|&a, &b| {
            keys.row(a).cmp(&keys.row(b)).then_with(|| sequences.row(a).cmp(&sequences.row(b))).then(a.cmp(&b))
        });
        let replaced = |position: usize| {
            let event = events[position];
            events
                .get(position + 1)
                .is_some_and(|&next| keys.row(next) == keys.row(event) && sequences.row(next) == sequences.row(event))
        };
        let data = if spec.ignore_null_updates {
            let mut kept = spec.keys.clone();
            kept.push(spec.sequence_by.clone());
            self.fill_nulls(&events, &keys, &replaced, &kept)?
        } else {
            self.data.clone()
        };
        let tracked = tracked_rows(&data, tracked)?;

        // Versions as indices of events: the one holding its values, the one
        // that opened it, the one that closed it.
        let mut versions: Vec<(usize, usize, Option<usize>)> = Vec::new();
        // The current version of the key being walked: its values and its start.
        let mut current: Option<(usize, usize)> = None;
        for (position, &event) in events.iter().enumerate() {
            let first_of_key = position == 0 || keys.row(events[position - 1]) != keys.row(event);
            if first_of_key && let Some((value, start)) = current.take() {
                versions.push((value, start, None));
            }
            // A later change of the same key and sequence replaces this one.
            let from_batch = self.from_batch[event];
            if replaced(position) {
                counts.ignored += u64::from(from_batch);
                continue;
            }
            let outcome = if self.delete[event] {
                match current.take() {
                    Some((value, start)) => {
                        versions.push((value, start, Some(event)));
                        &mut counts.deleted
                    }
                    None => &mut counts.ignored,
                }
            } else {
                match current {
                    // Only untracked columns change: the version is updated in place.
                    Some((value, start)) if tracked.as_ref().is_none_or(|t| t.row(value) == t.row(event)) => {
                        current = Some((event, start));
                        &mut counts.updated
                    }
                    Some((value, start)) => {
                        versions.push((value, start, Some(event)));
                        current = Some((event, event));
                        &mut counts.updated
                    }
                    None => {
                        current = Some((event, event));
                        &mut counts.inserted
                    }
                }
            };
            *outcome += u64::from(from_batch);
        }
        if let Some((value, start)) = current {
            versions.push((value, start, None));
        }

        let take = |column: &ArrayRef, indices: &UInt64Array| {
            arrow::compute::take(column, indices, None).map_err(transform_error)
        };
        let values: UInt64Array = versions.iter().map(|v| Some(v.0 as u64)).collect();
        let starts: UInt64Array = versions.iter().map(|v| Some(v.1 as u64)).collect();
        let ends: UInt64Array = versions.iter().map(|v| v.2.map(|e| e as u64)).collect();
        let columns: Vec<ArrayRef> = self
            .table_schema
            .fields()
            .iter()
            .map(|field| match field.name().as_str() {
                START_AT => take(&self.sequence, &starts),
                END_AT => take(&self.sequence, &ends),
                name => take(data.column_by_name(name).ok_or_else(|| merge_error("no column"))?, &values),
            })
            .collect::<Result<_, _>>()?;
        let batch = RecordBatch::try_new(self.table_schema.clone(), columns).map_err(transform_error)?;
        conform_batch(&batch, &self.table_schema).map_err(|e| merge_error(e.to_string()))
    }

    /// `ignore_null_updates`: a NULL in one of the batch's changes keeps the
    /// value the key held before it, in sequence order (none after a delete).
    /// `events` are sorted by key and sequence; `kept` columns are left as they are.
    fn fill_nulls(
        &self,
        events: &[usize],
        keys: &Rows,
        replaced: &dyn Fn(usize) -> bool,
        kept: &[String],
    ) -> Result<RecordBatch, WorkerError> {
        let mut columns = Vec::with_capacity(self.data.num_columns());
        for (field, column) in self.data.schema().fields().iter().zip(self.data.columns()) {
            if kept.contains(field.name()) || column.null_count() == 0 {
                columns.push(column.clone());
                continue;
            }
            let mut source: Vec<u64> = (0..column.len() as u64).collect();
            // The event holding the key's value of this column.
            let mut holder: Option<usize> = None;
            for (position, &event) in events.iter().enumerate() {
                if position == 0 || keys.row(events[position - 1]) != keys.row(event) {
                    holder = None;
                }
                if replaced(position) {
                    continue;
                }
                if self.delete[event] {
                    holder = None;
                } else if let Some(held) = holder.filter(|_| self.from_batch[event] && column.is_null(event)) {
                    source[event] = held as u64;
                } else {
                    holder = Some(event);
                }
            }
            columns.push(arrow::compute::take(column, &UInt64Array::from(source), None).map_err(transform_error)?);
        }
        RecordBatch::try_new(self.data.schema(), columns).map_err(transform_error)
    }
}

/// The table's columns without `__start_at` and `__end_at`.
fn data_schema(table_schema: &SchemaRef) -> SchemaRef {
    Arc::new(Schema::new(
        table_schema
            .fields()
            .iter()
            .filter(|f| f.name() != START_AT && f.name() != END_AT)
            .cloned()
            .collect::<Vec<_>>(),
    ))
}

fn sequence_converter(sequence_type: &DataType) -> Result<RowConverter, WorkerError> {
    RowConverter::new(vec![SortField::new(sequence_type.clone())]).map_err(transform_error)
}

/// The tracked columns of every row in row format (`None`: no column is tracked).
fn tracked_rows(data: &RecordBatch, tracked: &[String]) -> Result<Option<Rows>, WorkerError> {
    if tracked.is_empty() {
        return Ok(None);
    }
    let columns: Vec<ArrayRef> = tracked
        .iter()
        .map(|name| data.column_by_name(name).cloned().ok_or_else(|| merge_error(format!("no column `{name}`"))))
        .collect::<Result<_, _>>()?;
    let converter = RowConverter::new(columns.iter().map(|c| SortField::new(c.data_type().clone())).collect())
        .map_err(transform_error)?;
    converter.convert_columns(&columns).map(Some).map_err(transform_error)
}
