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

use std::io::{BufRead, Cursor};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef};
use arrow::error::ArrowError;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::ParquetRecordBatchStreamBuilder;
use parquet::arrow::async_reader::{ParquetObjectReader, ParquetRecordBatchStream};
use sluice_proto::spec::{CsvOptions, Format};
use sluice_proto::task::SourceFile;

use crate::conform::conform_batch;
use crate::error::ReadError;
use crate::storage::{parse_url, store_for};
use crate::text::{BadRecord, TextError, TextFormat, TextReader};

/// Rows per decoded batch.
pub const BATCH_ROWS: usize = 8192;

/// Bytes read from the store at a time.
pub const READ_CHUNK: u64 = 8 << 20;

/// The file's first `size` bytes (its size when discovered) in chunks of
/// [`READ_CHUNK`], one chunk read ahead of the decoder. object_store's own
/// `get` stream reads local files 8 KiB at a time, each read a trip through the
/// blocking thread pool, which made decoding wait on I/O.
fn read_ahead(store: Arc<dyn ObjectStore>, path: Path, size: u64) -> BoxStream<'static, object_store::Result<Bytes>> {
    let ranges: Vec<std::ops::Range<u64>> =
        (0..size).step_by(READ_CHUNK as usize).map(|start| start..(start + READ_CHUNK).min(size)).collect();
    futures::stream::iter(ranges)
        .map(move |range| {
            let (store, path) = (store.clone(), path.clone());
            async move { store.get_range(&path, range).await }
        })
        .buffered(2)
        .boxed()
}

/// Reads one file batch by batch.
pub struct FileDecoder {
    file: SourceFile,
    schema: SchemaRef,
    kind: DecoderKind,
    /// Rows handed out so far (for the message of a file that fails part way).
    rows: u64,
}

// One value per file being read: boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
enum DecoderKind {
    Text(TextReader),
    Parquet(ParquetRecordBatchStream<ParquetObjectReader>),
}

/// The object store holding `file`, and the file's path in it.
fn locate(file: &SourceFile) -> Result<(Arc<dyn ObjectStore>, Path), ReadError> {
    let url = parse_url(&file.url).map_err(|e| read_error(file, None, e.to_string(), false))?;
    store_for(&url).map_err(|e| read_error(file, None, e.to_string(), false))
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
    /// Opens `file` for decoding into `schema` (the source schema, without `_metadata`).
    pub async fn open(
        file: &SourceFile,
        format: Format,
        csv: &CsvOptions,
        schema: SchemaRef,
    ) -> Result<Self, ReadError> {
        let (store, path) = locate(file)?;
        let kind = match format {
            Format::Json | Format::Csv => {
                let bytes = read_ahead(store.clone(), path, file.size);
                let text = TextFormat { format, schema: schema.clone(), csv: csv.clone() };
                DecoderKind::Text(
                    TextReader::new(text, bytes).map_err(|e| read_error(file, None, e.to_string(), false))?,
                )
            }
            Format::Parquet => {
                let reader = ParquetObjectReader::new(store.clone(), path).with_file_size(file.size);
                let stream = ParquetRecordBatchStreamBuilder::new(reader)
                    .await
                    .map_err(|e| parquet_error(file, e))?
                    .with_batch_size(BATCH_ROWS)
                    .build()
                    .map_err(|e| parquet_error(file, e))?;
                DecoderKind::Parquet(stream)
            }
        };
        Ok(Self { file: file.clone(), schema, kind, rows: 0 })
    }

    /// The next batch of the file's good rows, or `None` at its end. Records
    /// that cannot be decoded wait in [`Self::take_bad`]. An error means the
    /// rest of the file cannot be read.
    pub async fn next_batch(&mut self) -> Result<Option<RecordBatch>, ReadError> {
        let batch = match &mut self.kind {
            DecoderKind::Parquet(stream) => match stream.try_next().await {
                Ok(Some(batch)) => Some(conform_batch(&batch, &self.schema).map_err(|e| {
                    read_error(&self.file, None, self.after_rows(format!("values do not fit the schema: {e}")), false)
                })?),
                Ok(None) => None,
                Err(e) => {
                    let message = self.after_rows(format!("not a readable Parquet file: {e}"));
                    return Err(read_error(&self.file, None, message, false));
                }
            },
            DecoderKind::Text(reader) => match reader.next_batch().await {
                Ok(batch) => batch,
                Err(TextError::Storage(e)) => {
                    let mut error = storage_error(&self.file, e);
                    error.message = self.after_rows(error.message);
                    return Err(error);
                }
                Err(TextError::Setup(e)) => return Err(read_error(&self.file, None, e.to_string(), false)),
            },
        };
        self.rows += batch.as_ref().map_or(0, |b| b.num_rows() as u64);
        Ok(batch)
    }

    /// Records found so far that could not be decoded.
    pub fn take_bad(&mut self) -> Vec<BadRecord> {
        match &mut self.kind {
            DecoderKind::Text(reader) => reader.take_bad(),
            DecoderKind::Parquet(_) => Vec::new(),
        }
    }

    /// `message`, saying how many rows were read before it when any were.
    fn after_rows(&self, message: String) -> String {
        match self.rows {
            0 => message,
            rows => format!("{message} (after its first {rows} rows, which were read)"),
        }
    }
}

fn parquet_error(file: &SourceFile, error: parquet::errors::ParquetError) -> ReadError {
    read_error(file, None, format!("not a readable Parquet file: {error}"), false)
}

// ---------------------------------------------------------------------------
// Schema inference.
// ---------------------------------------------------------------------------

/// How much of the first batch's files inference samples.
#[derive(Debug, Clone, Copy)]
pub struct InferLimits {
    pub max_files: usize,
    pub max_bytes: u64,
}

impl Default for InferLimits {
    fn default() -> Self {
        Self { max_files: 100, max_bytes: 64 << 20 }
    }
}

/// Infers one schema for `files` from a bounded sample of them.
pub async fn infer_schema(
    files: &[SourceFile],
    format: Format,
    csv: &CsvOptions,
    limits: InferLimits,
) -> Result<Schema, ReadError> {
    let mut merged: Option<Schema> = None;
    let mut budget = limits.max_bytes;
    for file in files.iter().take(limits.max_files) {
        if budget == 0 {
            break;
        }
        let schema = infer_file(file, format, csv, budget).await?;
        budget = budget.saturating_sub(file.size);
        merged = Some(match merged {
            None => schema,
            Some(previous) => merge_schemas(&previous, &schema),
        });
    }
    let schema = merged.unwrap_or_else(Schema::empty);
    Ok(Schema::new(schema.fields().iter().map(|f| without_null_type(f)).collect::<Vec<_>>()))
}

async fn infer_file(file: &SourceFile, format: Format, csv: &CsvOptions, budget: u64) -> Result<Schema, ReadError> {
    let (store, path) = locate(file)?;
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
                Ok(arrow::json::reader::infer_json_schema(sample, None).map_err(decode_error)?.0)
            } else {
                infer_csv(sample, csv).map_err(decode_error)
            }
        }
    }
}

fn infer_csv(sample: impl BufRead, csv: &CsvOptions) -> Result<Schema, ArrowError> {
    let mut format = arrow::csv::reader::Format::default()
        .with_header(csv.header)
        .with_delimiter(csv.delimiter as u8)
        .with_quote(csv.quote as u8);
    if let Some(escape) = csv.escape {
        format = format.with_escape(escape as u8);
    }
    Ok(format.infer_schema(sample, None)?.0)
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
    fn merging_widens_conflicts() {
        let a = Schema::new(vec![Field::new("x", DataType::Int64, true), Field::new("y", DataType::Utf8, true)]);
        let b = Schema::new(vec![Field::new("x", DataType::Float64, true), Field::new("z", DataType::Boolean, true)]);
        let merged = merge_schemas(&a, &b);
        assert_eq!(merged.field(0).data_type(), &DataType::Float64);
        assert_eq!(merged.fields().len(), 3);
    }
}
