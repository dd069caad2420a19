//! Decoding source files into Arrow batches, and inferring their schema.
//!
//! JSON and CSV are streamed from the object store chunk by chunk through
//! arrow's push decoders, so memory stays bounded whatever the file size; bad
//! records are set aside with their line (see [`crate::text`]). Parquet is read
//! through the async reader, footer first.

// `ParquetObjectReader` is deprecated in parquet 59 in favour of a hand-written
// `AsyncFileReader`; it still works, and replacing it is tracked for the
// object-storage work.
#![allow(deprecated)]

use std::collections::HashMap;
use std::io::{BufRead, Cursor};
use std::sync::Arc;

use arrow::array::{Array, RecordBatch};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef};
use arrow::error::ArrowError;
use arrow::util::display::array_value_to_string;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::ParquetRecordBatchStreamBuilder;
use parquet::arrow::async_reader::{ParquetObjectReader, ParquetRecordBatchStream};
use sluice_proto::spec::{CsvOptions, Format, RESCUED_DATA, SchemaEvolution, SchemaSample};
use sluice_proto::task::SourceFile;

use crate::chunks::read_ahead;
use crate::conform;
use crate::conform::conform_batch;
use crate::error::ReadError;
use crate::quarantine::rows_as_json;
use crate::rescue;
use crate::storage::{parse_url, store_for};
use crate::text::{BadRecord, TextError, TextFormat, TextReader};
use sluice_proto::storage::StorageOptions;
use url::Url;

/// Rows per decoded batch.
pub const BATCH_ROWS: usize = 8192;

/// Reads one file batch by batch.
pub struct FileDecoder {
    file: SourceFile,
    /// The schema batches come out in.
    schema: SchemaRef,
    kind: DecoderKind,
    /// Rows handed out so far (for the message of a file that fails part way).
    rows: u64,
    /// Columns of the file that the schema lacks, rescued into `_rescued_data`.
    rescued: Vec<String>,
    evolution: SchemaEvolution,
    /// Rows decoded from a Parquet file so far, set aside or not.
    parquet_rows: u64,
    /// Parquet rows with a value that does not fit, set aside.
    parquet_bad: Vec<BadRecord>,
}

/// Why a file's rows cannot be read into the schema.
#[derive(Debug)]
pub enum FileError {
    Read(ReadError),
    /// The file has columns the schema lacks, in a mode that stops for them.
    NewColumns {
        columns: Vec<String>,
        line: Option<u64>,
    },
}

impl From<ReadError> for FileError {
    fn from(error: ReadError) -> Self {
        FileError::Read(error)
    }
}

// One value per file being read: boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
enum DecoderKind {
    Text(TextReader),
    Parquet(ParquetRecordBatchStream<ParquetObjectReader>),
}

/// The object store holding `file`, the file's path in it, and its URL.
fn locate(file: &SourceFile, storage: &StorageOptions) -> Result<(Arc<dyn ObjectStore>, Path, Url), ReadError> {
    let url = parse_url(&file.url).map_err(|e| read_error(file, None, e.to_string(), false))?;
    let (store, path) = store_for(&url, storage).map_err(|e| read_error(file, None, e.to_string(), false))?;
    Ok((store, path, url))
}

fn read_error(file: &SourceFile, line: Option<u64>, message: impl Into<String>, retryable: bool) -> ReadError {
    ReadError { file: file.url.clone(), line, message: message.into(), retryable }
}

fn storage_error(file: &SourceFile, error: object_store::Error) -> ReadError {
    match error {
        object_store::Error::NotFound { .. } => {
            read_error(file, None, "the file disappeared after it was discovered", false)
        }
        other => read_error(file, None, format!("cannot read: {other}"), true),
    }
}

impl FileDecoder {
    /// Opens `file` for decoding into `schema` (the source schema, without
    /// `_metadata`; in `rescue` mode with `_rescued_data`). CSV columns are
    /// matched to the schema by the header's names.
    pub async fn open(
        file: &SourceFile,
        format: Format,
        csv: &CsvOptions,
        schema: SchemaRef,
        evolution: SchemaEvolution,
        storage: &StorageOptions,
    ) -> Result<Self, FileError> {
        let (store, path, url) = locate(file, storage)?;
        // The file's columns that the schema lacks, and where they were found.
        let (kind, extra, line) = match format {
            Format::Json | Format::Csv => {
                // JSON finds new fields while decoding, CSV in its header.
                let (file_schema, extra) = if format == Format::Csv {
                    let header = if csv.header { csv_header(&store, &path, file, csv).await? } else { Vec::new() };
                    let (layout, extra) = csv_layout(&header, &schema);
                    (Arc::new(layout), extra)
                } else {
                    (schema.clone(), Vec::new())
                };
                let bytes = read_ahead(store.clone(), path, &url, file.size);
                let text = TextFormat::new(format, file_schema, csv.clone(), evolution, file.url.clone());
                let reader = TextReader::new(text, bytes).map_err(|e| read_error(file, None, e.to_string(), false))?;
                (DecoderKind::Text(reader), extra, Some(1))
            }
            Format::Parquet => {
                let reader = ParquetObjectReader::new(store.clone(), path).with_file_size(file.size);
                let builder = ParquetRecordBatchStreamBuilder::new(reader).await.map_err(|e| parquet_error(file, e))?;
                let extra: Vec<String> = builder
                    .schema()
                    .fields()
                    .iter()
                    .filter(|f| f.name() == RESCUED_DATA || schema.field_with_name(f.name()).is_err())
                    .map(|f| f.name().clone())
                    .collect();
                let stream = builder.with_batch_size(BATCH_ROWS).build().map_err(|e| parquet_error(file, e))?;
                (DecoderKind::Parquet(stream), extra, None)
            }
        };
        let rescued = match evolution {
            _ if extra.is_empty() => Vec::new(),
            SchemaEvolution::None => Vec::new(),
            SchemaEvolution::Rescue => extra,
            SchemaEvolution::AddNewColumns | SchemaEvolution::FailOnNewColumns => {
                return Err(FileError::NewColumns { columns: extra, line });
            }
        };
        Ok(Self {
            file: file.clone(),
            schema,
            kind,
            rows: 0,
            rescued,
            evolution,
            parquet_rows: 0,
            parquet_bad: Vec::new(),
        })
    }

    /// A batch of the file's columns in the decoder's schema.
    fn shape(&self, batch: RecordBatch) -> Result<RecordBatch, ArrowError> {
        let batch =
            if self.rescued.is_empty() { batch } else { rescue::extra_columns(&batch, &self.rescued, &self.file.url)? };
        conform_batch(&batch, &self.schema)
    }

    /// The next batch of the file's good rows, or `None` at its end. Records
    /// that cannot be decoded wait in [`Self::take_bad`]. An error means the
    /// rest of the file cannot be read.
    pub async fn next_batch(&mut self) -> Result<Option<RecordBatch>, FileError> {
        let batch = match &mut self.kind {
            DecoderKind::Parquet(stream) => match stream.try_next().await {
                Ok(batch) => batch
                    .map(|batch| self.set_aside_misfits(batch))
                    .transpose()
                    .map_err(|e| read_error(&self.file, None, self.after_rows(e.to_string()), false))?,
                Err(e) => {
                    let message = self.after_rows(format!("not a readable Parquet file: {e}"));
                    return Err(read_error(&self.file, None, message, false).into());
                }
            },
            DecoderKind::Text(reader) => match reader.next_batch().await {
                Ok(batch) => batch,
                Err(TextError::Storage(e)) => {
                    let mut error = storage_error(&self.file, e);
                    error.message = self.after_rows(error.message);
                    return Err(error.into());
                }
                Err(TextError::Setup(e)) => return Err(read_error(&self.file, None, e.to_string(), false).into()),
                Err(TextError::NewColumn { line, column }) => {
                    return Err(FileError::NewColumns { columns: vec![column], line: Some(line) });
                }
            },
        };
        let batch = batch.map(|batch| self.shape(batch)).transpose().map_err(|e| {
            read_error(&self.file, None, self.after_rows(format!("values do not fit the schema: {e}")), false)
        })?;
        self.rows += batch.as_ref().map_or(0, |b| b.num_rows() as u64);
        Ok(batch)
    }

    /// Records found so far that could not be decoded.
    pub fn take_bad(&mut self) -> Vec<BadRecord> {
        match &mut self.kind {
            DecoderKind::Text(reader) => reader.take_bad(),
            DecoderKind::Parquet(_) => std::mem::take(&mut self.parquet_bad),
        }
    }

    /// Parquet values that do not fit their column: rescued in `rescue` mode;
    /// otherwise their rows are bad records, numbered by row in the file and
    /// kept as JSON.
    fn set_aside_misfits(&mut self, batch: RecordBatch) -> Result<RecordBatch, ArrowError> {
        let first_row = self.parquet_rows;
        self.parquet_rows += batch.num_rows() as u64;
        let Some(misfits) = conform::misfits(&batch, &self.schema)? else { return Ok(batch) };
        if self.evolution == SchemaEvolution::Rescue {
            return rescue::misfit_values(&misfits.batch, &misfits.columns, &self.file.url);
        }
        let raw = rows_as_json(&filter_record_batch(&batch, &misfits.rows)?)?;
        for (row, raw) in misfits.rows.values().set_indices().zip(raw) {
            let line = first_row + row as u64 + 1;
            let error = misfits
                .columns
                .iter()
                .filter(|(_, values)| values.is_valid(row))
                .map(|(name, values)| {
                    let value = array_value_to_string(values, row).unwrap_or_default();
                    let wanted =
                        self.schema.field_with_name(name).map(|f| f.data_type().to_string()).unwrap_or_default();
                    format!("column `{name}`: {value} does not fit {wanted} (row {line} of the file)")
                })
                .collect::<Vec<_>>()
                .join("; ");
            self.parquet_bad.push(BadRecord { line, raw: Bytes::from(raw), error });
        }
        filter_record_batch(&misfits.batch, &arrow::compute::not(&misfits.rows)?)
    }

    /// `message`, saying how many rows were read before it when any were.
    fn after_rows(&self, message: String) -> String {
        match self.rows {
            0 => message,
            rows => format!("{message} (after its first {rows} rows, which were read)"),
        }
    }
}

/// The column names of a CSV file's header line.
async fn csv_header(
    store: &Arc<dyn ObjectStore>,
    path: &Path,
    file: &SourceFile,
    csv: &CsvOptions,
) -> Result<Vec<String>, ReadError> {
    const MAX_HEADER: u64 = 1 << 20;
    if file.size == 0 {
        return Ok(Vec::new());
    }
    let bytes = store.get_range(path, 0..file.size.min(MAX_HEADER)).await.map_err(|e| storage_error(file, e))?;
    let end = memchr::memchr(b'\n', &bytes).map_or(bytes.len(), |at| at + 1);
    let schema = infer_csv(Cursor::new(bytes.slice(..end)), csv, Some(0))
        .map_err(|e| read_error(file, Some(1), format!("cannot read the CSV header: {e}"), false))?;
    Ok(schema.fields().iter().map(|f| f.name().clone()).collect())
}

/// The schema a CSV file with `header` is decoded into: the schema's field for
/// each named column, STRING for the others (returned too). A header that names
/// none of the schema's columns but has as many is taken by position.
fn csv_layout(header: &[String], schema: &Schema) -> (Schema, Vec<String>) {
    let columns: Vec<&Field> =
        schema.fields().iter().filter(|f| f.name() != RESCUED_DATA).map(|f| f.as_ref()).collect();
    let find = |name: &str| {
        columns
            .iter()
            .find(|f| f.name() == name)
            .or_else(|| columns.iter().find(|f| f.name().eq_ignore_ascii_case(name)))
            .copied()
    };
    let by_position = header.is_empty() || (header.len() == columns.len() && header.iter().all(|h| find(h).is_none()));
    if by_position {
        return (Schema::new(columns.into_iter().cloned().collect::<Vec<_>>()), Vec::new());
    }
    let mut extra = Vec::new();
    let fields: Vec<Field> = header
        .iter()
        .map(|name| match find(name) {
            Some(field) => field.clone(),
            None => {
                extra.push(name.clone());
                Field::new(name, DataType::Utf8, true)
            }
        })
        .collect();
    (Schema::new(fields), extra)
}

fn parquet_error(file: &SourceFile, error: parquet::errors::ParquetError) -> ReadError {
    read_error(file, None, format!("not a readable Parquet file: {error}"), false)
}

// ---------------------------------------------------------------------------
// Schema inference.
// ---------------------------------------------------------------------------

/// Infers one schema for `files` from a bounded sample of them.
pub async fn infer_schema(
    files: &[SourceFile],
    format: Format,
    csv: &CsvOptions,
    sample: SchemaSample,
    storage: &StorageOptions,
) -> Result<Schema, ReadError> {
    let mut merged: Option<Schema> = None;
    let mut budget = sample.max_bytes;
    for file in files.iter().take(usize::try_from(sample.max_files).unwrap_or(usize::MAX)) {
        if budget == 0 {
            break;
        }
        let schema = infer_file(file, format, csv, budget, storage).await?;
        budget = budget.saturating_sub(file.size);
        merged = Some(match merged {
            None => schema,
            Some(previous) => merge_schemas(&previous, &schema),
        });
    }
    let schema = merged.unwrap_or_else(Schema::empty);
    Ok(Schema::new(schema.fields().iter().map(|f| without_null_type(f)).collect::<Vec<_>>()))
}

async fn infer_file(
    file: &SourceFile,
    format: Format,
    csv: &CsvOptions,
    budget: u64,
    storage: &StorageOptions,
) -> Result<Schema, ReadError> {
    let (store, path, _) = locate(file, storage)?;
    let decode_error = |e: ArrowError| read_error(file, None, format!("cannot infer a schema: {e}"), false);
    match format {
        Format::Parquet => {
            let reader = ParquetObjectReader::new(store.clone(), path).with_file_size(file.size);
            let builder = ParquetRecordBatchStreamBuilder::new(reader)
                .await
                .map_err(|e| read_error(file, None, format!("not a readable Parquet file: {e}"), false))?;
            Ok(builder.schema().as_ref().clone())
        }
        Format::Json | Format::Csv => {
            let take = budget.min(file.size);
            let bytes = store.get_range(&path, 0..take).await.map_err(|e| storage_error(file, e))?;
            // Cut at the last whole line unless the whole file was read.
            let end = if take < file.size { bytes.iter().rposition(|b| *b == b'\n').unwrap_or(0) } else { bytes.len() };
            let sample = Cursor::new(bytes.slice(..end));
            if format == Format::Json {
                infer_json(sample).map_err(decode_error)
            } else {
                infer_csv(sample, csv, None).map_err(decode_error)
            }
        }
    }
}

/// Infers a schema from JSON lines. Lines that are not JSON objects are left
/// out (they will be quarantined); columns come in the order they first appear.
fn infer_json(sample: impl BufRead) -> Result<Schema, ArrowError> {
    let mut order = KeyOrder::default();
    let objects = sample.split(b'\n').map_while(Result::ok).filter_map(|line| order.read(&line).ok().map(Ok));
    let inferred = arrow::json::reader::infer_json_schema_from_iterator(objects)?;
    let mut fields: Vec<Field> = inferred.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.sort_by_key(|f| order.first_seen.get(f.name()).copied().unwrap_or(usize::MAX));
    Ok(Schema::new(fields))
}

/// Reads JSON objects while noting the order their top-level keys first
/// appear in (serde_json's own map sorts them).
#[derive(Default)]
struct KeyOrder {
    first_seen: HashMap<String, usize>,
}

impl KeyOrder {
    /// The line as a JSON object, in one parse; an error if it is anything else.
    fn read(&mut self, line: &[u8]) -> Result<serde_json::Value, serde_json::Error> {
        use serde::de::Deserializer;
        let mut deserializer = serde_json::Deserializer::from_slice(line);
        let object = (&mut deserializer).deserialize_map(KeyVisitor(self))?;
        deserializer.end()?;
        Ok(object)
    }
}

struct KeyVisitor<'a>(&'a mut KeyOrder);

impl<'de> serde::de::Visitor<'de> for KeyVisitor<'_> {
    type Value = serde_json::Value;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some((key, value)) = map.next_entry::<String, serde_json::Value>()? {
            let next = self.0.first_seen.len();
            self.0.first_seen.entry(key.clone()).or_insert(next);
            object.insert(key, value);
        }
        Ok(serde_json::Value::Object(object))
    }
}

fn infer_csv(sample: impl BufRead, csv: &CsvOptions, max_records: Option<usize>) -> Result<Schema, ArrowError> {
    let mut format = arrow::csv::reader::Format::default()
        .with_header(csv.header)
        .with_delimiter(csv.delimiter as u8)
        .with_quote(csv.quote as u8);
    if let Some(escape) = csv.escape {
        format = format.with_escape(escape as u8);
    }
    Ok(format.infer_schema(sample, max_records)?.0)
}

/// Merges two inferred schemas: fields of both, in order of first appearance; a
/// field whose types disagree becomes DOUBLE if both are numbers, STRING otherwise.
pub fn merge_schemas(a: &Schema, b: &Schema) -> Schema {
    let mut fields: Vec<Field> = a.fields().iter().map(|f| f.as_ref().clone()).collect();
    for field in b.fields() {
        match fields.iter_mut().find(|f| f.name() == field.name()) {
            Some(existing) if existing.data_type() != field.data_type() => {
                let both_numeric = existing.data_type().is_numeric() && field.data_type().is_numeric();
                let merged = match (existing.data_type(), field.data_type()) {
                    (DataType::Null, other) | (other, DataType::Null) => other.clone(),
                    _ if both_numeric => DataType::Float64,
                    _ => DataType::Utf8,
                };
                *existing = Field::new(existing.name(), merged, true);
            }
            Some(_) => {}
            None => fields.push(field.as_ref().clone()),
        }
    }
    Schema::new(fields)
}

/// `current` with the fields of `observed` it lacks (inside structs too), and
/// their names (`parent.child` inside a struct). Existing fields keep their
/// types: a value that does not fit its column's type is bad data, not a new
/// column.
pub fn with_new_fields(current: &Schema, observed: &Schema) -> (Schema, Vec<String>) {
    let mut added = Vec::new();
    let fields = add_fields(current.fields(), observed.fields(), "", &mut added);
    (Schema::new_with_metadata(fields, current.metadata().clone()), added)
}

fn add_fields(current: &Fields, observed: &Fields, prefix: &str, added: &mut Vec<String>) -> Vec<Field> {
    let mut fields: Vec<Field> = current
        .iter()
        .map(|field| match (field.data_type(), observed.find(field.name()).map(|(_, f)| f.data_type())) {
            (DataType::Struct(children), Some(DataType::Struct(seen))) => {
                let path = format!("{prefix}{}.", field.name());
                let children = add_fields(children, seen, &path, added);
                field.as_ref().clone().with_data_type(DataType::Struct(Fields::from(children)))
            }
            _ => field.as_ref().clone(),
        })
        .collect();
    for field in observed.iter().filter(|f| current.find(f.name()).is_none()) {
        added.push(format!("{prefix}{}", field.name()));
        fields.push(without_null_type(field));
    }
    fields
}

/// `schema` with the types of `hints`: a hinted column replaces the inferred
/// one's type, a hinted column not inferred is added.
pub fn with_hints(schema: &Schema, hints: &Schema) -> Schema {
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    for hint in hints.fields() {
        match fields.iter_mut().find(|f| f.name().eq_ignore_ascii_case(hint.name())) {
            Some(field) => *field = hint.as_ref().clone().with_name(field.name()),
            None => fields.push(hint.as_ref().clone()),
        }
    }
    Schema::new(fields)
}

/// Replaces the NULL type (a field only ever seen as null) by STRING, which Delta can store.
fn without_null_type(field: &Field) -> Field {
    let data_type = match field.data_type() {
        DataType::Null => DataType::Utf8,
        DataType::List(element) => DataType::List(Arc::new(without_null_type(element))),
        DataType::Struct(fields) => {
            DataType::Struct(Fields::from(fields.iter().map(|f| without_null_type(f)).collect::<Vec<_>>()))
        }
        other => other.clone(),
    };
    Field::new(field.name(), data_type, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_fields_are_added_inside_structs_and_types_kept() {
        let point = |fields: Vec<Field>| DataType::Struct(Fields::from(fields));
        let current = Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("p", point(vec![Field::new("x", DataType::Int64, true)]), true),
        ]);
        let observed = Schema::new(vec![
            Field::new("id", DataType::Utf8, true),
            Field::new(
                "p",
                point(vec![Field::new("x", DataType::Int64, true), Field::new("y", DataType::Null, true)]),
                true,
            ),
            Field::new("z", DataType::Boolean, true),
        ]);
        let (evolved, added) = with_new_fields(&current, &observed);
        assert_eq!(added, vec!["p.y".to_string(), "z".to_string()]);
        assert_eq!(evolved.field(0).data_type(), &DataType::Int64);
        let DataType::Struct(p) = evolved.field(1).data_type() else { panic!() };
        assert_eq!(p[1].data_type(), &DataType::Utf8);
        assert_eq!(with_new_fields(&evolved, &observed).1, Vec::<String>::new());
    }

    #[test]
    fn hints_replace_types_and_add_columns() {
        let inferred = Schema::new(vec![Field::new("Total", DataType::Int64, true)]);
        let hints =
            Schema::new(vec![Field::new("total", DataType::Float64, true), Field::new("n", DataType::Int32, true)]);
        let hinted = with_hints(&inferred, &hints);
        assert_eq!(hinted.field(0).name(), "Total");
        assert_eq!(hinted.field(0).data_type(), &DataType::Float64);
        assert_eq!(hinted.field(1).name(), "n");
    }

    #[test]
    fn merging_widens_conflicts() {
        let a = Schema::new(vec![Field::new("x", DataType::Int64, true), Field::new("y", DataType::Utf8, true)]);
        let b = Schema::new(vec![Field::new("x", DataType::Float64, true), Field::new("z", DataType::Boolean, true)]);
        let merged = merge_schemas(&a, &b);
        assert_eq!(merged.field(0).data_type(), &DataType::Float64);
        assert_eq!(merged.fields().len(), 3);
    }
}
