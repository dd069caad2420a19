//! The `_metadata` column: where each row came from, as in Auto Loader.
//!
//! A struct with `file_path`, `file_name`, `file_size`, `file_modification_time`
//! and `ingest_time` (when the batch was planned; the same for every row of a
//! batch, also on a retry). It is a column of the relation `source` like any
//! other, so `SELECT *` includes it.

use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray, StructArray, TimestampMicrosecondArray};
use arrow::buffer::{Buffer, OffsetBuffer};
use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use arrow::error::ArrowError;
use sluice_proto::task::SourceFile;

pub const METADATA_COLUMN: &str = "_metadata";

fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

pub fn metadata_fields() -> Fields {
    Fields::from(vec![
        Field::new("file_path", DataType::Utf8, true),
        Field::new("file_name", DataType::Utf8, true),
        Field::new("file_size", DataType::Int64, true),
        Field::new("file_modification_time", timestamp_type(), true),
        Field::new("ingest_time", timestamp_type(), true),
    ])
}

/// The relation `source`: the file schema plus `_metadata`.
pub fn with_metadata_field(file_schema: &Schema) -> Result<SchemaRef, ArrowError> {
    if file_schema.field_with_name(METADATA_COLUMN).is_ok() {
        return Err(ArrowError::SchemaError(format!(
            "the source data has a column named `{METADATA_COLUMN}`, which Sluice reserves for file metadata"
        )));
    }
    let mut fields: Vec<_> = file_schema.fields().iter().cloned().collect();
    fields.push(Arc::new(Field::new(METADATA_COLUMN, DataType::Struct(metadata_fields()), true)));
    Ok(Arc::new(Schema::new(fields)))
}

/// Appends the `_metadata` column for `file` to a batch decoded from it.
pub fn append_metadata(
    batch: RecordBatch,
    schema: &SchemaRef,
    file: &SourceFile,
    ingest_time_us: i64,
) -> Result<RecordBatch, ArrowError> {
    let rows = batch.num_rows();
    let name = file.url.rsplit('/').next().unwrap_or(&file.url);
    let size = i64::try_from(file.size).unwrap_or(i64::MAX);
    let columns: Vec<ArrayRef> = vec![
        Arc::new(repeated(&file.url, rows)?),
        Arc::new(repeated(name, rows)?),
        Arc::new(Int64Array::from_value(size, rows)),
        Arc::new(TimestampMicrosecondArray::from_value(file.modified_ms * 1000, rows).with_timezone("UTC")),
        Arc::new(TimestampMicrosecondArray::from_value(ingest_time_us, rows).with_timezone("UTC")),
    ];
    let metadata = StructArray::try_new(metadata_fields(), columns, None)?;
    let mut all = batch.columns().to_vec();
    all.push(Arc::new(metadata));
    RecordBatch::try_new(schema.clone(), all)
}

/// `value` `rows` times, its bytes laid out at once (growing the buffer value
/// by value cost about 1 % of an ingest).
fn repeated(value: &str, rows: usize) -> Result<StringArray, ArrowError> {
    if value.len().checked_mul(rows).is_none_or(|total| total > i32::MAX as usize) {
        return Err(ArrowError::ComputeError(format!(
            "{rows} copies of a {}-byte file path overflow a column",
            value.len()
        )));
    }
    let offsets = OffsetBuffer::<i32>::from_repeated_length(value.len(), rows);
    StringArray::try_new(offsets, Buffer::from_vec(value.as_bytes().repeat(rows)), None)
}
