//! `schema_evolution: rescue`: what does not fit the schema goes into the
//! `_rescued_data` column instead of being lost or failing the row.
//!
//! `_rescued_data` is a JSON object: the fields the schema lacks, the values
//! that do not fit their column's type (their column is then NULL), and
//! `_file_path`, the file the row came from. It is NULL for a row that fit.
//!
//! Rows are rescued one at a time, and only rows that failed to decode in bulk
//! get here (see [`crate::text`]); extra columns of CSV and Parquet files are
//! rescued column-wise, batch by batch.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch, StringArray, new_null_array};
use arrow::compute::{CastOptions, cast_with_options};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::error::ArrowError;
use bytes::Bytes;
use serde_json::{Map, Value};
use sluice_proto::spec::{Format, RESCUED_DATA};

use crate::quarantine::rows_as_json;
use crate::text::{TextFormat, decode_group};

/// The key of `_rescued_data` that names the source file.
pub const FILE_PATH_KEY: &str = "_file_path";

/// `schema` with `_rescued_data` (STRING) at its end, unless it has it already.
pub fn with_rescued_column(schema: &Schema) -> Schema {
    if schema.field_with_name(RESCUED_DATA).is_ok() {
        return schema.clone();
    }
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new(RESCUED_DATA, DataType::Utf8, true));
    Schema::new(fields)
}

/// One line that failed to decode, as a row with what did not fit rescued;
/// `None` when the line cannot be rescued (it is not a record at all).
pub fn line(format: &TextFormat, raw: &Bytes) -> Result<Option<RecordBatch>, ArrowError> {
    match format.format {
        Format::Json => json_line(format, raw),
        Format::Csv => csv_line(format, raw),
        Format::Parquet => Ok(None),
    }
}

fn json_line(format: &TextFormat, raw: &Bytes) -> Result<Option<RecordBatch>, ArrowError> {
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(raw) else { return Ok(None) };
    let schema = &format.schema;
    let (mut kept, mut rescued): (Map<String, Value>, Map<String, Value>) =
        fields.into_iter().partition(|(name, _)| name != RESCUED_DATA && schema.field_with_name(name).is_ok());
    if decode_object(format, &kept)?.is_none() {
        // Find the values that do not fit, one field at a time.
        for field in std::mem::take(&mut kept) {
            let alone = Map::from_iter([field]);
            if decode_object(format, &alone)?.is_some() {
                kept.extend(alone);
            } else {
                rescued.extend(alone);
            }
        }
    }
    if !rescued.is_empty() {
        rescued.insert(FILE_PATH_KEY.to_string(), Value::String(format.file.clone()));
        kept.insert(RESCUED_DATA.to_string(), Value::String(Value::Object(rescued).to_string()));
    }
    decode_object(format, &kept)
}

/// Decodes one JSON object as a row; `None` if it does not fit.
fn decode_object(format: &TextFormat, object: &Map<String, Value>) -> Result<Option<RecordBatch>, ArrowError> {
    let line = Bytes::from(serde_json::to_vec(object).map_err(|e| ArrowError::JsonError(e.to_string()))?);
    Ok(decode_group(format, &[(0, line)])?.ok().flatten())
}

fn csv_line(format: &TextFormat, raw: &Bytes) -> Result<Option<RecordBatch>, ArrowError> {
    // The row as text first; a row with the wrong number of fields is not rescued.
    let texts: Vec<Field> = format.schema.fields().iter().map(|f| Field::new(f.name(), DataType::Utf8, true)).collect();
    let as_text = TextFormat::new(
        format.format,
        Arc::new(Schema::new(texts)),
        format.csv.clone(),
        format.evolution,
        format.file.clone(),
    );
    let Ok(Some(row)) = decode_group(&as_text, &[(0, raw.clone())])? else { return Ok(None) };
    let strict = CastOptions { safe: false, ..Default::default() };
    let mut rescued = Map::new();
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(row.num_columns() + 1);
    for (field, text) in format.schema.fields().iter().zip(row.columns()) {
        let value = text.as_any().downcast_ref::<StringArray>().filter(|a| a.is_valid(0)).map(|a| a.value(0));
        let column = match value {
            None | Some("") => new_null_array(field.data_type(), 1),
            Some(value) => match cast_with_options(text, field.data_type(), &strict) {
                Ok(column) => column,
                Err(_) => {
                    rescued.insert(field.name().clone(), Value::String(value.to_string()));
                    new_null_array(field.data_type(), 1)
                }
            },
        };
        columns.push(column);
    }
    if rescued.is_empty() {
        return Ok(None);
    }
    rescued.insert(FILE_PATH_KEY.to_string(), Value::String(format.file.clone()));
    columns.push(Arc::new(StringArray::from(vec![Value::Object(rescued).to_string()])));
    let schema = with_rescued_column(&format.schema);
    RecordBatch::try_new(Arc::new(schema), columns).map(Some)
}

/// Moves the `extra` columns of `batch` (columns of the file that the schema
/// lacks) into `_rescued_data`, merged with what the row had rescued already.
pub fn extra_columns(batch: &RecordBatch, extra: &[String], file: &str) -> Result<RecordBatch, ArrowError> {
    let schema = batch.schema();
    let extra_indices: Vec<usize> = extra.iter().filter_map(|name| schema.index_of(name).ok()).collect();
    let moved: Vec<(String, ArrayRef)> =
        extra_indices.iter().map(|i| (schema.field(*i).name().clone(), batch.column(*i).clone())).collect();
    let rescued = rescued_column(batch, &moved, file)?;
    let mut fields = Vec::new();
    let mut columns: Vec<ArrayRef> = Vec::new();
    for (index, field) in schema.fields().iter().enumerate() {
        if extra_indices.contains(&index) || field.name() == RESCUED_DATA {
            continue;
        }
        fields.push(field.as_ref().clone());
        columns.push(batch.column(index).clone());
    }
    fields.push(Field::new(RESCUED_DATA, DataType::Utf8, true));
    columns.push(Arc::new(rescued));
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
}

/// Adds values that did not fit their column to `_rescued_data`: `misfits`
/// holds, per column, the file's values (NULL where they fit); `batch` holds
/// the columns as cast, NULL where they did not fit.
pub fn misfit_values(
    batch: &RecordBatch,
    misfits: &[(String, ArrayRef)],
    file: &str,
) -> Result<RecordBatch, ArrowError> {
    let rescued: ArrayRef = Arc::new(rescued_column(batch, misfits, file)?);
    let schema = batch.schema();
    let mut columns = batch.columns().to_vec();
    match schema.index_of(RESCUED_DATA) {
        Ok(index) => columns[index] = rescued,
        Err(_) => {
            let schema = with_rescued_column(&schema);
            columns.push(rescued);
            return RecordBatch::try_new(Arc::new(schema), columns);
        }
    }
    RecordBatch::try_new(schema, columns)
}

/// `_rescued_data` for the rows of `batch`: what they rescued already, with
/// the non-NULL values of the `moved` columns added.
fn rescued_column(batch: &RecordBatch, moved: &[(String, ArrayRef)], file: &str) -> Result<StringArray, ArrowError> {
    let existing = batch.column_by_name(RESCUED_DATA).and_then(|c| c.as_any().downcast_ref::<StringArray>().cloned());
    let lines: Vec<Map<String, Value>> = if moved.is_empty() {
        vec![Map::new(); batch.num_rows()]
    } else {
        let projected = RecordBatch::try_from_iter(moved.iter().cloned())?;
        rows_as_json(&projected)?
            .into_iter()
            .map(|line| match serde_json::from_slice::<Value>(&line) {
                Ok(Value::Object(object)) => Ok(object),
                _ => Err(ArrowError::JsonError("cannot encode rescued columns".to_string())),
            })
            .collect::<Result<_, _>>()?
    };
    Ok(lines
        .into_iter()
        .enumerate()
        .map(|(row, mut object)| {
            if let Some(existing) = existing.as_ref().filter(|a| a.is_valid(row))
                && let Ok(Value::Object(earlier)) = serde_json::from_str::<Value>(existing.value(row))
            {
                object.extend(earlier);
            }
            if object.is_empty() {
                return None;
            }
            object.entry(FILE_PATH_KEY).or_insert_with(|| Value::String(file.to_string()));
            Some(Value::Object(object).to_string())
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_proto::spec::{CsvOptions, SchemaEvolution};

    fn format(format: Format) -> TextFormat {
        let mut fields = vec![Field::new("id", DataType::Int64, true), Field::new("name", DataType::Utf8, true)];
        if format == Format::Json {
            fields.push(Field::new(RESCUED_DATA, DataType::Utf8, true));
        }
        TextFormat::new(
            format,
            Arc::new(Schema::new(fields)),
            CsvOptions::default(),
            SchemaEvolution::Rescue,
            "file:///in/a.json".to_string(),
        )
    }

    fn rescued(batch: &RecordBatch) -> Value {
        let column = batch.column_by_name(RESCUED_DATA).unwrap().as_any().downcast_ref::<StringArray>().unwrap();
        serde_json::from_str(column.value(0)).unwrap()
    }

    #[test]
    fn json_unknown_fields_and_misfits_are_rescued_and_the_rest_kept() {
        let row = line(&format(Format::Json), &Bytes::from_static(br#"{"id": "seven", "name": "x", "extra": [1]}"#))
            .unwrap()
            .unwrap();
        assert!(row.column(0).is_null(0));
        assert_eq!(row.column(1).as_any().downcast_ref::<StringArray>().unwrap().value(0), "x");
        assert_eq!(rescued(&row), serde_json::json!({"id": "seven", "extra": [1], "_file_path": "file:///in/a.json"}));
        assert!(line(&format(Format::Json), &Bytes::from_static(b"not json")).unwrap().is_none());
    }

    #[test]
    fn json_fractions_in_integer_columns_are_rescued_not_truncated() {
        let row = line(&format(Format::Json), &Bytes::from_static(br#"{"id": 7.5, "name": "x"}"#)).unwrap().unwrap();
        assert!(row.column(0).is_null(0));
        assert_eq!(rescued(&row), serde_json::json!({"id": 7.5, "_file_path": "file:///in/a.json"}));
    }

    #[test]
    fn csv_misfits_are_rescued() {
        let row = line(&format(Format::Csv), &Bytes::from_static(b"x1,b")).unwrap().unwrap();
        assert!(row.column(0).is_null(0));
        assert_eq!(rescued(&row)["id"], "x1");
        assert!(line(&format(Format::Csv), &Bytes::from_static(b"1,b,c")).unwrap().is_none());
    }

    #[test]
    fn extra_columns_join_what_was_rescued() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("new", DataType::Utf8, true),
            Field::new(RESCUED_DATA, DataType::Utf8, true),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(arrow::array::Int64Array::from(vec![1, 2, 3])),
                Arc::new(StringArray::from(vec![Some("a"), None, None])),
                Arc::new(StringArray::from(vec![None, Some(r#"{"id":"x","_file_path":"f"}"#), None])),
            ],
        )
        .unwrap();
        let out = extra_columns(&batch, &["new".to_string()], "f").unwrap();
        assert_eq!(out.schema().fields().len(), 2);
        let column = out.column(1).as_any().downcast_ref::<StringArray>().unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(column.value(0)).unwrap(),
            serde_json::json!({"new": "a", "_file_path": "f"})
        );
        assert_eq!(serde_json::from_str::<Value>(column.value(1)).unwrap()["id"], "x");
        assert!(column.is_null(2));
    }
}
