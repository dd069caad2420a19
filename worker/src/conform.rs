//! Shapes a batch to a target schema: columns by name, cast where the types
//! differ only in representation, NULL for a column the batch lacks; and
//! finds the values of a file's columns that do not fit the target's types.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, RecordBatch, RecordBatchOptions, new_null_array};
use arrow::compute::kernels::cmp::distinct;
use arrow::compute::{CastOptions, and, cast, cast_with_options, is_not_null, is_null, nullif, or};
use arrow::datatypes::SchemaRef;
use arrow::datatypes::{DataType, Field, Schema};
use arrow::error::ArrowError;
use deltalake::kernel::StructType;
use deltalake::kernel::engine::arrow_conversion::{TryFromArrow, TryIntoArrow};

/// The Delta schema for an Arrow schema, and the Arrow schema Delta reads back
/// for it: rows are cast to the latter before writing, so data files match the
/// table exactly (list element names, timestamp units).
pub fn to_delta(schema: &Schema) -> Result<(StructType, Schema), String> {
    let delta =
        StructType::try_from_arrow(schema).map_err(|e| format!("the flow's output cannot be stored in Delta: {e}"))?;
    let arrow: Schema =
        (&delta).try_into_arrow().map_err(|e| format!("cannot map the Delta schema back to Arrow: {e}"))?;
    Ok((delta, arrow))
}

pub fn conform_batch(batch: &RecordBatch, target: &SchemaRef) -> Result<RecordBatch, ArrowError> {
    if batch.schema().as_ref() == target.as_ref() {
        return Ok(batch.clone());
    }
    // Safe casts only: a value that does not fit is an error, never a silent NULL.
    let options = CastOptions { safe: false, ..Default::default() };
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(target.fields().len());
    for field in target.fields() {
        let column = match batch.column_by_name(field.name()) {
            Some(column) if column.data_type() == field.data_type() => column.clone(),
            Some(column) => cast_with_options(column, field.data_type(), &options).map_err(|e| {
                ArrowError::CastError(format!(
                    "column `{}` of type {} cannot be written as {}: {e}",
                    field.name(),
                    column.data_type(),
                    field.data_type()
                ))
            })?,
            None => new_null_array(field.data_type(), batch.num_rows()),
        };
        columns.push(column);
    }
    let options = RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
    RecordBatch::try_new_with_options(Arc::clone(target), columns, &options)
}

/// Values of a batch that do not fit their column's type in the target.
pub struct Misfits {
    /// The batch with those columns cast to the target's types: NULL where a
    /// value did not fit.
    pub batch: RecordBatch,
    /// Per column with a misfit: its name and the batch's own values, NULL
    /// where they fit.
    pub columns: Vec<(String, ArrayRef)>,
    /// The rows holding a misfit.
    pub rows: BooleanArray,
}

/// Casts the columns of `batch` whose type differs from their column in
/// `target`, keeping values that do not fit apart instead of failing: a
/// string that is not a number, a number out of the type's range, a fraction
/// into an integer or decimal column that cannot hold it (arrow's cast would
/// truncate it). `None` when every value fits. Columns inside structs and
/// lists are left to [`conform_batch`].
pub fn misfits(batch: &RecordBatch, target: &Schema) -> Result<Option<Misfits>, ArrowError> {
    let schema = batch.schema();
    let mut columns = batch.columns().to_vec();
    let mut found = Vec::new();
    let mut rows: Option<BooleanArray> = None;
    for (index, field) in schema.fields().iter().enumerate() {
        let Ok(wanted) = target.field_with_name(field.name()) else { continue };
        let (from, to) = (field.data_type(), wanted.data_type());
        if from == to || from.is_nested() || to.is_nested() || !arrow::compute::can_cast_types(from, to) {
            continue;
        }
        let original = batch.column(index);
        let converted = cast_with_options(original, to, &CastOptions { safe: true, ..Default::default() })?;
        // Lost in the cast: a value that became NULL, or one that does not
        // come back (a fraction truncated).
        let mut lost = and(&is_null(&converted)?, &is_not_null(original)?)?;
        let narrowing = (from.is_floating() || matches!(from, DataType::Decimal128(..) | DataType::Decimal256(..)))
            && (to.is_integer() || matches!(to, DataType::Decimal128(..) | DataType::Decimal256(..)));
        if narrowing {
            let back = cast(&converted, from)?;
            let changed = distinct(&back, original)?;
            lost = or(&lost, &and(&changed, &is_not_null(&converted)?)?)?;
        }
        if lost.true_count() == 0 {
            columns[index] = converted;
            continue;
        }
        let kept = nullif(&converted, &lost)?;
        let not_lost = arrow::compute::not(&lost)?;
        found.push((field.name().clone(), nullif(original, &not_lost)?));
        rows = Some(match rows {
            Some(rows) => or(&rows, &lost)?,
            None => lost,
        });
        columns[index] = kept;
    }
    let Some(rows) = rows else { return Ok(None) };
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .zip(&columns)
        .map(|(f, c)| f.as_ref().clone().with_data_type(c.data_type().clone()).with_nullable(true))
        .collect();
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?;
    Ok(Some(Misfits { batch, columns: found, rows }))
}
