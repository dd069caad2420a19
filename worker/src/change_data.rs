//! Change data files for a merge's commit, so that a flow reading the merge
//! target's change data feed sees the rows that changed, and not a rewritten
//! file as deletes of all its rows and inserts of all of them again.
//!
//! A merge that rewrites files knows, for the keys it changes, the rows it
//! took out of the table (`before`) and the rows it put in (`after`). Rows the
//! same on both sides did not change and are left out (an SCD 2 history
//! rewritten around a late change keeps most of its versions). For the rest,
//! per key: rows only before are `delete`s, rows only after `insert`s, and a
//! key on both sides has its rows before as `update_preimage` and after as
//! `update_postimage` (for an SCD 2 history, a "key" is a key's version: the
//! key and `__start_at`). They are written below `_change_data/` with a
//! `_change_type` column and committed as `cdc` actions with the merge's data.
//!
//! A commit with `cdc` actions is read through them alone, so they hold the
//! merge's inserts too. A merge that rewrites no file only adds rows, which a
//! reader takes as inserts: it writes no change data, as Delta's own writers.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, RecordBatch, StringArray};
use arrow::compute::{concat_batches, filter_record_batch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::row::{RowConverter, SortField};
use deltalake::DeltaTable;
use deltalake::kernel::AddCDCFile;
use object_store::ObjectStore;
use object_store::prefix::PrefixStore;

use crate::delta_source::CHANGE_TYPE;
use crate::error::WorkerError;
use crate::merge::{RowOrder, Target, new_writer, transform_error};

/// Where change data files go, below the table's root.
pub const CHANGE_DATA_DIR: &str = "_change_data";

/// Whether `table` records its change data feed.
pub fn enabled(table: &DeltaTable) -> bool {
    table.snapshot().is_ok_and(|snapshot| {
        snapshot
            .metadata()
            .configuration()
            .get("delta.enableChangeDataFeed")
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    })
}

/// Writes the change data of a merge that replaced the rows `before` of the
/// table with the rows `after` (both in `table_schema`), rows being matched by
/// `order`'s keys; returns its `cdc` actions.
pub(crate) async fn write(
    target: &Target,
    table_schema: &SchemaRef,
    order: &RowOrder,
    before: &[RecordBatch],
    after: &[RecordBatch],
) -> Result<Vec<AddCDCFile>, WorkerError> {
    let before = concat_batches(table_schema, before).map_err(transform_error)?;
    let after = concat_batches(table_schema, after).map_err(transform_error)?;
    let (before, after) = without_unchanged(&before, &after)?;
    if before.num_rows() == 0 && after.num_rows() == 0 {
        return Ok(Vec::new());
    }
    let before_keys = order.key_rows(&before)?;
    let after_keys = order.key_rows(&after)?;
    let keys_before: HashSet<&[u8]> = before_keys.iter().map(|row| row.data()).collect();
    let keys_after: HashSet<&[u8]> = after_keys.iter().map(|row| row.data()).collect();
    let types_before: StringArray = before_keys
        .iter()
        .map(|key| Some(if keys_after.contains(key.data()) { "update_preimage" } else { "delete" }))
        .collect();
    let types_after: StringArray = after_keys
        .iter()
        .map(|key| Some(if keys_before.contains(key.data()) { "update_postimage" } else { "insert" }))
        .collect();

    let mut fields: Vec<Field> = table_schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new(CHANGE_TYPE, DataType::Utf8, true));
    let schema = Arc::new(Schema::new(fields));
    let with_type = |batch: &RecordBatch, types: StringArray| -> Result<RecordBatch, WorkerError> {
        let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
        columns.push(Arc::new(types));
        RecordBatch::try_new(schema.clone(), columns).map_err(transform_error)
    };
    let store: Arc<dyn ObjectStore> = Arc::new(PrefixStore::new(target.store.clone(), CHANGE_DATA_DIR));
    let mut writer = new_writer(store, &schema, &target.partition_by);
    for (batch, types) in [(&before, types_before), (&after, types_after)] {
        if batch.num_rows() > 0 {
            writer.write(&with_type(batch, types)?).await?;
        }
    }
    Ok(writer
        .close()
        .await?
        .into_iter()
        .map(|add| AddCDCFile {
            path: format!("{CHANGE_DATA_DIR}/{}", add.path),
            size: add.size,
            partition_values: add.partition_values,
            data_change: false,
            tags: None,
        })
        .collect())
}

/// `before` and `after` without the rows found the same on both sides.
fn without_unchanged(before: &RecordBatch, after: &RecordBatch) -> Result<(RecordBatch, RecordBatch), WorkerError> {
    let fields: Vec<SortField> =
        before.schema().fields().iter().map(|f| SortField::new(f.data_type().clone())).collect();
    if !RowConverter::supports_fields(&fields) {
        // A MAP column cannot be compared as a row: every row counts as changed.
        return Ok((before.clone(), after.clone()));
    }
    let converter = RowConverter::new(fields).map_err(transform_error)?;
    let rows_before = converter.convert_columns(before.columns()).map_err(transform_error)?;
    let rows_after = converter.convert_columns(after.columns()).map_err(transform_error)?;
    let mut unmatched: HashMap<&[u8], Vec<usize>> = HashMap::new();
    for (index, row) in rows_after.iter().enumerate() {
        unmatched.entry(row.data()).or_default().push(index);
    }
    let mut keep_after = vec![true; after.num_rows()];
    let keep_before: BooleanArray = rows_before
        .iter()
        .map(|row| match unmatched.get_mut(row.data()).and_then(Vec::pop) {
            Some(same) => {
                keep_after[same] = false;
                Some(false)
            }
            None => Some(true),
        })
        .collect();
    Ok((
        filter_record_batch(before, &keep_before).map_err(transform_error)?,
        filter_record_batch(after, &BooleanArray::from(keep_after)).map_err(transform_error)?,
    ))
}
