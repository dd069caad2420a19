//! Decoding JSON lines and CSV that may hold bad records.
//!
//! JSON lines are decoded by [`crate::json_lines`]. For CSV, the good path
//! decodes whole regions of a file (about [`READ_CHUNK`] bytes of whole lines)
//! with arrow's push decoder, as fast as if no record could be bad. Only when a
//! region fails does the rest of that region take the careful path: its lines
//! are decoded in groups of [`BATCH_ROWS`]; a group that fails (a value that
//! does not fit its column, a row with the wrong number of fields) is decoded
//! again in groups of [`SMALL_GROUP`], and only a small group that fails is
//! decoded line by line, to find its bad lines.
//!
//! [`READ_CHUNK`]: crate::chunks::READ_CHUNK

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use sluice_proto::spec::{CsvOptions, Format, SchemaEvolution};
use std::collections::VecDeque;

use crate::exact_ints;
use crate::formats::BATCH_ROWS;
use crate::json_lines::JsonLines;
use crate::rescue;

/// Lines decoded together after a group of [`BATCH_ROWS`] lines failed.
const SMALL_GROUP: usize = 64;

/// A record of a source file that could not be decoded.
#[derive(Debug, Clone)]
pub struct BadRecord {
    /// 1-based line number in the file.
    pub line: u64,
    /// The line as it is in the file, without its line break.
    pub raw: Bytes,
    pub error: String,
}

/// What the decoders are built for.
#[derive(Clone)]
pub struct TextFormat {
    pub format: Format,
    /// The columns of the file, in its order (for CSV) and of the types wanted;
    /// in `rescue` mode a JSON schema ends with `_rescued_data`.
    pub schema: SchemaRef,
    pub csv: CsvOptions,
    pub evolution: SchemaEvolution,
    /// The file, named in rescued data.
    pub file: String,
    /// The schema JSON is decoded with: integer fields as text (see
    /// [`crate::exact_ints`]).
    read: SchemaRef,
}

// One per file being read: boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum TextDecoder {
    /// Decodes into [`TextFormat::json_decoder`]'s schema; flushed batches
    /// are converted to this one (integers parsed exactly).
    Json(arrow::json::reader::Decoder, SchemaRef),
    Csv(arrow::csv::reader::Decoder),
}

impl TextDecoder {
    fn decode(&mut self, buf: &[u8]) -> Result<usize, ArrowError> {
        match self {
            TextDecoder::Json(d, _) => d.decode(buf),
            TextDecoder::Csv(d) => d.decode(buf),
        }
    }

    fn flush(&mut self) -> Result<Option<RecordBatch>, ArrowError> {
        match self {
            TextDecoder::Json(d, schema) => d.flush()?.map(|b| exact_ints::convert_strictly(b, schema)).transpose(),
            TextDecoder::Csv(d) => d.flush(),
        }
    }
}

impl TextFormat {
    pub fn new(format: Format, schema: SchemaRef, csv: CsvOptions, evolution: SchemaEvolution, file: String) -> Self {
        let read = if format == Format::Json { exact_ints::read_schema(&schema) } else { schema.clone() };
        Self { format, schema, csv, evolution, file, read }
    }

    /// A JSON decoder for `self.read`; `lenient`: a value of the wrong type is
    /// NULL instead of an error. Its batches go through [`exact_ints::convert`].
    pub(crate) fn json_decoder(
        &self,
        batch_rows: usize,
        lenient: bool,
    ) -> Result<arrow::json::reader::Decoder, ArrowError> {
        arrow::json::ReaderBuilder::new(self.read.clone())
            .with_batch_size(batch_rows)
            .with_strict_mode(self.evolution.notices_new_columns())
            .with_coerce_primitive(true)
            .with_ignore_type_conflicts(lenient)
            .build_decoder()
    }

    fn is_json(&self) -> bool {
        self.format == Format::Json
    }

    /// A decoder of `batch_rows` rows a batch; `header`: the input starts with a CSV header line.
    pub fn decoder(&self, batch_rows: usize, header: bool) -> Result<TextDecoder, ArrowError> {
        Ok(match self.format {
            Format::Csv => {
                let csv = &self.csv;
                let mut builder = arrow::csv::ReaderBuilder::new(self.schema.clone())
                    .with_header(header)
                    .with_delimiter(csv.delimiter as u8)
                    .with_quote(csv.quote as u8)
                    .with_batch_size(batch_rows);
                if let Some(escape) = csv.escape {
                    builder = builder.with_escape(escape as u8);
                }
                TextDecoder::Csv(builder.build_decoder())
            }
            _ => TextDecoder::Json(self.json_decoder(batch_rows, false)?, self.schema.clone()),
        })
    }
}

/// Error while reading the bytes (not while decoding them).
pub enum TextError {
    Storage(object_store::Error),
    /// The file's decoder cannot even be built (a schema arrow cannot decode into).
    Setup(ArrowError),
    /// A field the schema lacks, in a mode that stops for it.
    NewColumn {
        line: u64,
        column: String,
    },
}

impl From<ArrowError> for TextError {
    fn from(error: ArrowError) -> Self {
        TextError::Setup(error)
    }
}

/// Reads a JSON lines or CSV file region by region.
pub struct TextReader {
    format: TextFormat,
    bytes: BoxStream<'static, object_store::Result<Bytes>>,
    eof: bool,
    /// The start of a line whose end has not been read yet.
    carry: Vec<u8>,
    /// Whole lines read and not decoded yet: the rest of a chunk whose first
    /// line was joined with `carry` (a slice of the chunk, not a copy).
    pending: Bytes,
    /// Whole lines being decoded.
    region: Bytes,
    /// The 1-based line number of `region`'s first byte.
    region_line: u64,
    /// Whether `region` is the file's first.
    first_region: bool,
    /// CSV: bytes of `region` handed to the decoder, and where its unflushed rows start.
    pos: usize,
    batch_start: usize,
    decoding: Decoding,
    /// CSV: rows decoded the careful way, waiting to be taken.
    ready: VecDeque<RecordBatch>,
    bad: Vec<BadRecord>,
}

// One per file being read: boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Decoding {
    Json(JsonLines),
    Csv(TextDecoder),
}

impl TextReader {
    pub fn new(format: TextFormat, bytes: BoxStream<'static, object_store::Result<Bytes>>) -> Result<Self, ArrowError> {
        let decoding = if format.is_json() {
            Decoding::Json(JsonLines::new(format.clone())?)
        } else {
            Decoding::Csv(format.decoder(BATCH_ROWS, format.csv.header)?)
        };
        Ok(Self {
            format,
            bytes,
            eof: false,
            carry: Vec::new(),
            pending: Bytes::new(),
            region: Bytes::new(),
            region_line: 1,
            first_region: true,
            pos: 0,
            batch_start: 0,
            decoding,
            ready: VecDeque::new(),
            bad: Vec::new(),
        })
    }

    /// The bad records found since the last call.
    pub fn take_bad(&mut self) -> Vec<BadRecord> {
        std::mem::take(&mut self.bad)
    }

    /// The next batch of good rows, or `None` at the end of the file. Bad
    /// records found on the way wait in [`Self::take_bad`].
    pub async fn next_batch(&mut self) -> Result<Option<RecordBatch>, TextError> {
        if let Decoding::Json(_) = self.decoding {
            return self.next_json_batch().await;
        }
        loop {
            if let Some(batch) = self.ready.pop_front() {
                return Ok(Some(batch));
            }
            if self.pos == self.region.len() {
                if self.batch_start < self.pos {
                    // The region's last rows.
                    if let Some(batch) = self.flush_rows()? {
                        return Ok(Some(batch));
                    }
                    continue;
                }
                if !self.next_region().await? {
                    return Ok(None);
                }
                continue;
            }
            let Decoding::Csv(decoder) = &mut self.decoding else { unreachable!("a CSV file") };
            match decoder.decode(&self.region[self.pos..]) {
                Ok(consumed) => {
                    self.pos += consumed;
                    // The decoder stopped early: a batch is full.
                    if self.pos < self.region.len()
                        && let Some(batch) = self.flush_rows()?
                    {
                        return Ok(Some(batch));
                    }
                }
                Err(_) => self.careful(self.batch_start)?,
            }
        }
    }

    async fn next_json_batch(&mut self) -> Result<Option<RecordBatch>, TextError> {
        loop {
            if let Some(batch) = self.json().next_batch(false)? {
                return Ok(Some(batch));
            }
            if !self.next_region().await? {
                return Ok(self.json().next_batch(true)?);
            }
            let Decoding::Json(json) = &mut self.decoding else { unreachable!("a JSON file") };
            json.region(&self.region, self.region_line, &mut self.bad)?;
        }
    }

    fn json(&mut self) -> &mut JsonLines {
        match &mut self.decoding {
            Decoding::Json(json) => json,
            Decoding::Csv(_) => unreachable!("a JSON file"),
        }
    }

    fn csv(&mut self) -> &mut TextDecoder {
        match &mut self.decoding {
            Decoding::Csv(decoder) => decoder,
            Decoding::Json(_) => unreachable!("a CSV file"),
        }
    }

    /// Takes the rows decoded since the last flush. When they do not come out
    /// right, the rest of the region takes the careful path and its good rows
    /// wait in `ready`.
    fn flush_rows(&mut self) -> Result<Option<RecordBatch>, TextError> {
        let start = self.batch_start;
        let at_end = self.pos == self.region.len();
        let flushed = if at_end { self.end_of_region() } else { Ok(()) }.and_then(|()| self.csv().flush());
        match flushed {
            Ok(batch) => {
                self.batch_start = self.pos;
                Ok(batch)
            }
            Err(_) => {
                self.careful(start)?;
                Ok(None)
            }
        }
    }

    /// At the end of the file, tells the CSV decoder that its last record ended.
    fn end_of_region(&mut self) -> Result<(), ArrowError> {
        if self.eof && self.carry.is_empty() {
            self.csv().decode(&[])?;
        }
        Ok(())
    }

    /// Reads the next region of whole lines; false at the end of the file.
    async fn next_region(&mut self) -> Result<bool, TextError> {
        self.region_line += memchr::memchr_iter(b'\n', &self.region).count() as u64;
        if !self.region.is_empty() {
            self.first_region = false;
        }
        if !self.pending.is_empty() {
            let pending = std::mem::take(&mut self.pending);
            self.set_region(pending);
            return Ok(true);
        }
        loop {
            if self.eof {
                if self.carry.is_empty() {
                    self.region = Bytes::new();
                    return Ok(false);
                }
                let last = std::mem::take(&mut self.carry);
                self.set_region(Bytes::from(last));
                return Ok(true);
            }
            match self.bytes.next().await {
                Some(Ok(chunk)) => match memchr::memrchr(b'\n', &chunk) {
                    Some(last) => {
                        let lines = if self.carry.is_empty() {
                            chunk.slice(..=last)
                        } else {
                            // Only the line the carry begins is copied; the
                            // chunk's other lines follow as a slice of it.
                            let first = memchr::memchr(b'\n', &chunk).unwrap_or(last);
                            let mut joined = std::mem::take(&mut self.carry);
                            joined.extend_from_slice(&chunk[..=first]);
                            self.pending = chunk.slice(first + 1..=last);
                            Bytes::from(joined)
                        };
                        self.carry = chunk[last + 1..].to_vec();
                        self.set_region(lines);
                        return Ok(true);
                    }
                    None => self.carry.extend_from_slice(&chunk),
                },
                Some(Err(e)) => return Err(TextError::Storage(e)),
                None => self.eof = true,
            }
        }
    }

    fn set_region(&mut self, region: Bytes) {
        self.region = region;
        self.pos = 0;
        self.batch_start = 0;
    }

    /// Decodes `region[start..]` the careful way (see the module's doc), then
    /// goes on with a fresh decoder after it.
    fn careful(&mut self, start: usize) -> Result<(), TextError> {
        let first_line = self.region_line + memchr::memchr_iter(b'\n', &self.region[..start]).count() as u64;
        let mut lines = split_lines(self.region.slice(start..), first_line);
        let header = self.format.format == Format::Csv && self.format.csv.header;
        if header && self.first_region && start == 0 && lines.first().is_some_and(|(line, _)| *line == 1) {
            lines.remove(0);
        }
        decode_lines(&self.format, &lines, &mut self.ready, &mut self.bad)?;
        self.pos = self.region.len();
        self.batch_start = self.pos;
        self.decoding = Decoding::Csv(self.format.decoder(BATCH_ROWS, false).map_err(TextError::Setup)?);
        Ok(())
    }
}

/// The lines holding something other than whitespace, and the line breaks.
pub(crate) fn count_lines(bytes: &[u8]) -> (usize, u64) {
    let (mut lines, mut breaks) = (0, 0);
    let mut start = 0;
    for end in memchr::memchr_iter(b'\n', bytes) {
        lines += usize::from(!is_blank(&bytes[start..end]));
        breaks += 1;
        start = end + 1;
    }
    lines += usize::from(!is_blank(&bytes[start..]));
    (lines, breaks)
}

/// The non-blank lines of `bytes` with their line numbers, each without its line break.
pub(crate) fn split_lines(bytes: Bytes, first_line: u64) -> Vec<(u64, Bytes)> {
    lines_from(&bytes, 0, first_line).filter(|(_, line, _)| !is_blank(line)).map(|(n, line, _)| (n, line)).collect()
}

/// Every line of `bytes` from `start` on (blank ones too), numbered from
/// `first_line`: its number, the line without its line break, and the offset
/// after its line break.
pub(crate) fn lines_from(bytes: &Bytes, start: usize, first_line: u64) -> impl Iterator<Item = (u64, Bytes, usize)> {
    let ends = memchr::memchr_iter(b'\n', &bytes[start..]).map(move |i| start + i).chain(std::iter::once(bytes.len()));
    (first_line..).zip(ends).scan(start, move |from, (number, end)| {
        let line = &bytes[*from..end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        *from = end + 1;
        Some((number, bytes.slice_ref(line), (end + 1).min(bytes.len())))
    })
}

pub(crate) fn is_blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

/// Decodes `lines` in groups, narrowing down to single lines only where a group
/// fails. A line that fails alone is rescued (`rescue` mode), stops the file
/// (a new column, in a mode that notices them), or is a bad record.
pub(crate) fn decode_lines(
    format: &TextFormat,
    lines: &[(u64, Bytes)],
    ready: &mut impl Extend<RecordBatch>,
    bad: &mut Vec<BadRecord>,
) -> Result<(), TextError> {
    for group in lines.chunks(BATCH_ROWS) {
        if let Ok(batch) = decode_group(format, group)? {
            ready.extend(batch);
            continue;
        }
        for small in group.chunks(SMALL_GROUP) {
            if let Ok(batch) = decode_group(format, small)? {
                ready.extend(batch);
                continue;
            }
            for single in small.chunks(1) {
                match decode_group(format, single)? {
                    Ok(batch) => ready.extend(batch),
                    Err(error) => {
                        let (line, raw) = single[0].clone();
                        ready.extend(reject(format, line, raw, error, bad)?);
                    }
                }
            }
        }
    }
    Ok(())
}

/// A line that failed to decode alone: its row with what did not fit rescued
/// (`rescue` mode), an error that stops the file (a new column, in a mode that
/// notices them), or a bad record.
pub(crate) fn reject(
    format: &TextFormat,
    line: u64,
    raw: Bytes,
    error: ArrowError,
    bad: &mut Vec<BadRecord>,
) -> Result<Option<RecordBatch>, TextError> {
    if format.evolution == SchemaEvolution::Rescue {
        if let Some(batch) = rescue::line(format, &raw)? {
            return Ok(Some(batch));
        }
    } else if let Some(column) = new_column(&error) {
        return Err(TextError::NewColumn { line, column });
    }
    bad.push(BadRecord { line, raw, error: describe(format, error) });
    Ok(None)
}

/// The field a strict JSON decoder found that its schema lacks
/// (`parent.child` inside a struct).
pub fn new_column(error: &ArrowError) -> Option<String> {
    let ArrowError::JsonError(message) = error else { return None };
    let quoted = |text: &str, start: &str, end: &str| -> Option<(usize, String)> {
        let at = text.find(start)? + start.len();
        let len = text[at..].find(end)?;
        Some((at + len + end.len(), text[at..at + len].to_string()))
    };
    let mut path = Vec::new();
    let mut rest = message.as_str();
    while let Some((after, parent)) = quoted(rest, "whilst decoding field '", "': ") {
        path.push(parent);
        rest = &rest[after..];
    }
    let (_, column) = quoted(rest, "column '", "' missing from schema")?;
    path.push(column);
    Some(path.join("."))
}

/// Decodes a group of lines with a fresh decoder: the outer error is a decoder
/// that cannot be built, the inner one the group's decoding error.
pub(crate) fn decode_group(
    format: &TextFormat,
    lines: &[(u64, Bytes)],
) -> Result<Result<Option<RecordBatch>, ArrowError>, ArrowError> {
    let mut decoder = format.decoder(lines.len() + 1, false)?;
    Ok((|| {
        for (_, line) in lines {
            let mut rest: &[u8] = line;
            if !format.is_json() {
                // CSV records end at a line break; the lines were split without one.
                let consumed = decoder.decode(rest)?;
                rest = &rest[consumed..];
                if rest.is_empty() {
                    decoder.decode(b"\n")?;
                }
            } else {
                let consumed = decoder.decode(rest)?;
                rest = &rest[consumed..];
            }
            if !rest.is_empty() {
                return Err(ArrowError::JsonError("the line holds more than one record".to_string()));
            }
        }
        if let TextDecoder::Json(json, _) = &decoder
            && json.has_partial_record()
        {
            return Err(ArrowError::JsonError("the line is not one complete JSON object".to_string()));
        }
        let batch = decoder.flush()?;
        if batch.as_ref().map_or(0, RecordBatch::num_rows) != lines.len() {
            return Err(ArrowError::JsonError("the lines do not hold one record each".to_string()));
        }
        Ok(batch)
    })())
}

/// An arrow decoding error as a user reads it: for CSV, the column by name
/// rather than by position, and no row number (the record's line is known).
pub(crate) fn describe(format: &TextFormat, error: ArrowError) -> String {
    let mut message = match error {
        ArrowError::JsonError(m) | ArrowError::CsvError(m) | ArrowError::ParseError(m) => m,
        other => other.to_string(),
    };
    if format.is_json() {
        return message;
    }
    let number_after = |text: &str, marker: &str| -> Option<(usize, u64)> {
        let start = text.find(marker)? + marker.len();
        let digits: String = text[start..].chars().take_while(char::is_ascii_digit).collect();
        Some((start - marker.len(), digits.parse().ok()?))
    };
    if let Some((_, column)) = number_after(&message, "for column ")
        && let Some(field) = usize::try_from(column).ok().and_then(|c| format.schema.fields().get(c))
    {
        message = message.replacen(&format!("for column {column}"), &format!("for column `{}`", field.name()), 1);
    }
    for marker in [" at line ", " for line "] {
        if let Some((at, number)) = number_after(&message, marker) {
            message.replace_range(at..at + marker.len() + number.to_string().len(), "");
        }
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, Int64Array};
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    fn reader(format: Format, text: &'static [u8], chunk: usize) -> TextReader {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("name", DataType::Utf8, true),
        ]));
        let chunks: Vec<object_store::Result<Bytes>> = text.chunks(chunk).map(|c| Ok(Bytes::from_static(c))).collect();
        let format =
            TextFormat::new(format, schema, CsvOptions::default(), SchemaEvolution::None, "file:///f".to_string());
        TextReader::new(format, futures::stream::iter(chunks).boxed()).unwrap()
    }

    async fn read_all(mut reader: TextReader) -> (Vec<i64>, Vec<(u64, String)>) {
        let mut ids = Vec::new();
        while let Ok(Some(batch)) = reader.next_batch().await {
            let column = batch.column(0).as_any().downcast_ref::<Int64Array>().unwrap().clone();
            ids.extend((0..column.len()).map(|i| if column.is_null(i) { -1 } else { column.value(i) }));
        }
        let mut bad: Vec<(u64, String)> = reader.take_bad().into_iter().map(|b| (b.line, b.error)).collect();
        bad.sort();
        (ids, bad)
    }

    const JSON: &[u8] = b"{\"id\": 1, \"name\": \"a\"}\n\
        {\"id\": 2, \"name\": \"b\"\n\
        {\"id\": 3, \"name\": \"c\"}\n\
        \n\
        not json\n\
        {\"id\": \"four\", \"name\": \"d\"}\n\
        {\"id\": 5, \"name\": \"\xff\"}\n\
        [6]\n\
        {\"id\": 7, \"name\": \"g\"} {\"id\": 8}\n\
        {\"id\": 9, \"name\": \"tail\"";

    #[tokio::test]
    async fn bad_json_lines_are_set_aside_with_their_line_and_good_ones_kept() {
        for chunk in [7, 64, 4096] {
            let (ids, bad) = read_all(reader(Format::Json, JSON, chunk)).await;
            assert_eq!(ids, vec![1, 3], "chunk {chunk}");
            let lines: Vec<u64> = bad.iter().map(|(line, _)| *line).collect();
            assert_eq!(lines, vec![2, 5, 6, 7, 8, 9, 10], "chunk {chunk}: {bad:?}");
            assert!(bad[2].1.contains("four"), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn bad_csv_rows_are_set_aside_with_their_line() {
        let text: &'static [u8] = b"id,name\n1,a\n2,b,extra\nx,c\n4,d\n5,e";
        for chunk in [5, 4096] {
            let (ids, bad) = read_all(reader(Format::Csv, text, chunk)).await;
            assert_eq!(ids, vec![1, 4, 5], "chunk {chunk}");
            let lines: Vec<u64> = bad.iter().map(|(line, _)| *line).collect();
            assert_eq!(lines, vec![3, 4], "{bad:?}");
            assert!(bad[1].1.contains("column `id`"), "{bad:?}");
            assert!(!bad[1].1.contains("line"), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn good_rows_before_a_bad_last_region_are_kept() {
        let (ids, bad) = read_all(reader(Format::Json, b"{\"id\": \"x\"}\n{\"id\": 2}\n", 4096)).await;
        assert_eq!((ids, bad.len()), (vec![2], 1));
    }

    #[tokio::test]
    async fn clean_input_stays_on_the_fast_path() {
        let text: String = (0..20_000).map(|i| format!("{{\"id\": {i}, \"name\": \"n{i}\"}}\n")).collect();
        let text: &'static [u8] = Box::leak(text.into_bytes().into_boxed_slice());
        let (ids, bad) = read_all(reader(Format::Json, text, 100_000)).await;
        assert_eq!(ids.len(), 20_000);
        assert!(bad.is_empty());
        assert!(ids.windows(2).all(|w| w[0] + 1 == w[1]));
    }
}
