//! Decoding source files into Arrow batches, and inferring their schema.
//!
//! JSON and CSV are streamed from the object store chunk by chunk through
//! arrow's push decoders, so memory stays bounded whatever the file size.
//! Parquet is read through the async reader, footer first. A decoding error is
//! reported with the file and, for JSON and CSV, the line: the good path never
//! parses line by line; only after an error is the file scanned for the line.

// `ParquetObjectReader` is deprecated in parquet 59 in favour of a hand-written
// `AsyncFileReader`; it still works, and replacing it is tracked for the
// object-storage work.
#![allow(deprecated)]

use std::io::{BufRead, Cursor};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef};
use arrow::error::ArrowError;
use bytes::{Buf, Bytes};
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
    /// For CSV: whether the first line is a header, to turn row numbers into line numbers.
    csv_header: bool,
    kind: DecoderKind,
}

// One value per file being read: boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
enum DecoderKind {
    Text { bytes: BoxStream<'static, object_store::Result<Bytes>>, pending: Bytes, eof: bool, decoder: TextDecoder },
    Parquet(ParquetRecordBatchStream<ParquetObjectReader>),
}

#[allow(clippy::large_enum_variant)]
enum TextDecoder {
    Json(arrow::json::reader::Decoder),
    Csv(arrow::csv::reader::Decoder),
}

impl TextDecoder {
    fn decode(&mut self, buf: &[u8]) -> Result<usize, ArrowError> {
        match self {
            TextDecoder::Json(d) => d.decode(buf),
            TextDecoder::Csv(d) => d.decode(buf),
        }
    }

    fn flush(&mut self) -> Result<Option<RecordBatch>, ArrowError> {
        match self {
            TextDecoder::Json(d) => d.flush(),
            TextDecoder::Csv(d) => d.flush(),
        }
    }
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

fn json_decoder(schema: &SchemaRef) -> Result<arrow::json::reader::Decoder, ArrowError> {
    arrow::json::ReaderBuilder::new(schema.clone()).with_batch_size(BATCH_ROWS).build_decoder()
}

fn csv_decoder(schema: &SchemaRef, csv: &CsvOptions) -> arrow::csv::reader::Decoder {
    let mut builder = arrow::csv::ReaderBuilder::new(schema.clone())
        .with_header(csv.header)
        .with_delimiter(csv.delimiter as u8)
        .with_quote(csv.quote as u8)
        .with_batch_size(BATCH_ROWS);
    if let Some(escape) = csv.escape {
        builder = builder.with_escape(escape as u8);
    }
    builder.build_decoder()
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
                let decoder = match format {
                    Format::Json => TextDecoder::Json(
                        json_decoder(&schema).map_err(|e| read_error(file, None, e.to_string(), false))?,
                    ),
                    _ => TextDecoder::Csv(csv_decoder(&schema, csv)),
                };
                let bytes = read_ahead(store.clone(), path, file.size);
                DecoderKind::Text { bytes, pending: Bytes::new(), eof: false, decoder }
            }
            Format::Parquet => {
                let reader = ParquetObjectReader::new(store.clone(), path).with_file_size(file.size);
                let stream = ParquetRecordBatchStreamBuilder::new(reader)
                    .await
                    .map_err(|e| read_error(file, None, format!("not a readable Parquet file: {e}"), false))?
                    .with_batch_size(BATCH_ROWS)
                    .build()
                    .map_err(|e| read_error(file, None, format!("not a readable Parquet file: {e}"), false))?;
                DecoderKind::Parquet(stream)
            }
        };
        Ok(Self { file: file.clone(), schema, csv_header: csv.header, kind })
    }

    /// The next batch of the file, or `None` at its end.
    pub async fn next_batch(&mut self) -> Result<Option<RecordBatch>, ReadError> {
        match &mut self.kind {
            DecoderKind::Parquet(stream) => match stream.try_next().await {
                Ok(Some(batch)) => conform_batch(&batch, &self.schema)
                    .map(Some)
                    .map_err(|e| read_error(&self.file, None, e.to_string(), false)),
                Ok(None) => Ok(None),
                Err(e) => Err(read_error(&self.file, None, format!("not a readable Parquet file: {e}"), false)),
            },
            DecoderKind::Text { bytes, pending, eof, decoder } => {
                let csv = matches!(decoder, TextDecoder::Csv(_));
                match next_text_batch(bytes, pending, eof, decoder).await {
                    Ok(batch) => Ok(batch),
                    Err(TextError::Storage(e)) => Err(storage_error(&self.file, e)),
                    Err(TextError::Decode(e)) if csv => Err(csv_error(&self.file, &self.schema, self.csv_header, e)),
                    Err(TextError::Decode(e)) => {
                        Err(locate_json_error(self.file.clone(), self.schema.clone(), e).await)
                    }
                }
            }
        }
    }
}

/// arrow-csv reports a value that does not parse "for column K at line N" with
/// K counted from 0 and N counting data rows, and a row with the wrong number of
/// fields "for line N" counting file lines. Users get the file line and the
/// column's name.
fn csv_error(file: &SourceFile, schema: &Schema, header: bool, error: ArrowError) -> ReadError {
    let mut message = error.to_string();
    let number_after = |text: &str, marker: &str| -> Option<u64> {
        let start = text.find(marker)? + marker.len();
        text[start..].chars().take_while(char::is_ascii_digit).collect::<String>().parse().ok()
    };
    if let Some(column) = number_after(&message, "for column ")
        && let Some(field) = usize::try_from(column).ok().and_then(|c| schema.fields().get(c))
    {
        message = message.replacen(&format!("for column {column}"), &format!("for column `{}`", field.name()), 1);
    }
    let line = if let Some(row) = number_after(&message, " at line ") {
        message = message.replacen(&format!(" at line {row}"), "", 1);
        Some(row + u64::from(header))
    } else if let Some(line) = number_after(&message, " for line ") {
        message = message.replacen(&format!(" for line {line}"), "", 1);
        Some(line)
    } else {
        None
    };
    read_error(file, line, message, false)
}

/// Finds the line that a JSON decoding error came from, for the error message.
async fn locate_json_error(file: SourceFile, schema: SchemaRef, error: ArrowError) -> ReadError {
    let all = match locate(&file) {
        Ok((store, path)) => match store.get(&path).await {
            Ok(result) => result.bytes().await.ok(),
            Err(_) => None,
        },
        Err(_) => None,
    };
    match all.and_then(|bytes| locate_json_line(&bytes, &schema)) {
        Some((line, message)) => read_error(&file, Some(line), message, false),
        None => read_error(&file, None, error.to_string(), false),
    }
}

enum TextError {
    Storage(object_store::Error),
    Decode(ArrowError),
}

async fn next_text_batch(
    bytes: &mut BoxStream<'static, object_store::Result<Bytes>>,
    pending: &mut Bytes,
    eof: &mut bool,
    decoder: &mut TextDecoder,
) -> Result<Option<RecordBatch>, TextError> {
    loop {
        if pending.is_empty() && !*eof {
            match bytes.next().await {
                Some(Ok(chunk)) => *pending = chunk,
                Some(Err(e)) => return Err(TextError::Storage(e)),
                None => *eof = true,
            }
        }
        if *eof && pending.is_empty() {
            // An empty buffer tells the CSV decoder the input ended (a last row without a newline).
            decoder.decode(&[]).map_err(TextError::Decode)?;
            return decoder.flush().map_err(TextError::Decode);
        }
        let consumed = decoder.decode(pending).map_err(TextError::Decode)?;
        pending.advance(consumed);
        if !pending.is_empty() {
            // The decoder stopped before the end of the chunk: a batch is full.
            if let Some(batch) = decoder.flush().map_err(TextError::Decode)? {
                return Ok(Some(batch));
            }
        }
    }
}

/// Decodes `data` line by line to find the first line that does not decode into
/// `schema`. Only called after a decoding error, to name the line.
pub fn locate_json_line(data: &[u8], schema: &SchemaRef) -> Option<(u64, String)> {
    let mut decoder = json_decoder(schema).ok()?;
    for (index, line) in data.split(|b| *b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let outcome = decoder.decode(line).and_then(|consumed| {
            if consumed < line.len() || decoder.has_partial_record() {
                // Leftover bytes or an unfinished value: the line is not one whole JSON object.
                Err(ArrowError::JsonError("the line is not one complete JSON object".to_string()))
            } else {
                decoder.flush().map(|_| ())
            }
        });
        if let Err(error) = outcome {
            return Some((index as u64 + 1, error.to_string()));
        }
    }
    None
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
    fn locates_the_bad_json_line() {
        let schema = Arc::new(Schema::new(vec![Field::new("a", DataType::Int64, true)]));
        let data = b"{\"a\": 1}\n\n{\"a\": 2}\n{\"a\": \"x\"}\n{\"a\": 4}\n";
        let (line, message) = locate_json_line(data, &schema).unwrap();
        assert_eq!(line, 4, "{message}");
        let (line, _) = locate_json_line(b"{\"a\": 1}\n{\"a\": 2\n", &schema).unwrap();
        assert_eq!(line, 2);
        assert!(locate_json_line(b"{\"a\": 1}\n", &schema).is_none());
    }

    #[test]
    fn csv_errors_name_the_file_line_and_the_column() {
        let schema =
            Schema::new(vec![Field::new("id", DataType::Int64, true), Field::new("amount", DataType::Float64, true)]);
        let file = SourceFile { url: "file:///a.csv".into(), size: 1, modified_ms: 0, etag: None };
        let parse = ArrowError::ParseError(
            "Error while parsing value 'x' as type 'Float64' for column 1 at line 2. Row data: '[2,x]'".into(),
        );
        let error = csv_error(&file, &schema, true, parse);
        assert_eq!(error.line, Some(3));
        assert!(error.message.contains("for column `amount`. Row data"), "{}", error.message);
        let fields = ArrowError::CsvError("incorrect number of fields for line 4, expected 2 got 1".into());
        let error = csv_error(&file, &schema, true, fields);
        assert_eq!(error.line, Some(4));
        assert!(error.message.ends_with("incorrect number of fields, expected 2 got 1"), "{}", error.message);
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
