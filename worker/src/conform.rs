//! Shapes a batch to a target schema: columns by name, cast where the types
//! differ only in representation, NULL for a column the batch lacks.

use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, RecordBatchOptions, new_null_array};
use arrow::compute::{CastOptions, cast_with_options};
use arrow::datatypes::Schema;
use arrow::datatypes::SchemaRef;
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
