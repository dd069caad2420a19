//! Decoding regions of JSON lines, fast when every line is good and nearly as
//! fast when some are not.
//!
//! Lines are decoded in groups of [`GROUP_ROWS`] rows by one arrow decoder
//! built with `ignore_type_conflicts`: a tape of that many rows stays in the
//! CPU's cache, which made decoding these invoices about 1.4x faster than
//! groups of 8192 rows. Groups are coalesced into batches of [`BATCH_ROWS`] on
//! the way out.
//!
//! A group is first decoded in one call (the fast way). When that fails (a
//! line that is not JSON, a record cut short, bytes that are not UTF-8), the
//! group is decoded the careful way: lines are fed to the group's decoder one
//! at a time, each after a check of its own, so that a bad line does not spoil
//! the rows before it:
//!
//! - the light check, for most files: the line starts with `{`, ends with `}`
//!   and is UTF-8. It catches lines cut short, text that is not JSON and bytes
//!   that are not UTF-8 at almost no cost. A bad line it lets through makes the
//!   decoder fail; the decoder is then rebuilt with the group's lines before it
//!   (at most a group's decoding, and rare);
//! - the thorough check, once a file has shown [`THOROUGH_AFTER`] such lines:
//!   `serde_json` reads the line as one JSON value (about five times faster
//!   than arrow builds its tape), so broken lines no longer reach the decoder.
//!
//! A line that fails a check is decoded alone and strictly: arrow's decoder is
//! the judge of what is good, the checks only keep bad lines away from the
//! group. After a group that had bad lines, the next group is careful too;
//! after a clean one, fast again.
//!
//! A value of the wrong type does not fail a group: it comes out NULL. So every
//! NULL of a decoded group is checked against its line: the key is absent, or
//! every occurrence of it holds `null`. A row with a NULL that is not explained
//! so is decoded again alone and strictly, and leaves the group if that fails.
//!
//! [`BATCH_ROWS`]: crate::formats::BATCH_ROWS

use std::borrow::Cow;

use arrow::array::{Array, AsArray, BooleanArray, OffsetSizeTrait, RecordBatch};
use arrow::buffer::{NullBuffer, OffsetBuffer};
use arrow::compute::{BatchCoalescer, filter_record_batch};
use arrow::datatypes::{DataType, Field};
use arrow::error::ArrowError;
use bytes::Bytes;
use memchr::memmem::Finder;
use serde::de::IgnoredAny;

use crate::exact_ints;
use crate::formats::BATCH_ROWS;
use crate::text;
use crate::text::{
    BadRecord, TextError, TextFormat, count_lines, decode_group, decode_lines, is_blank, lines_from, new_column,
    split_lines,
};

/// Rows decoded between two flushes of the decoder.
pub const GROUP_ROWS: usize = 1024;

/// Bad lines let through by the light check before a file's lines get the
/// thorough one.
const THOROUGH_AFTER: usize = 4;

/// Decodes the regions of one JSON lines file.
pub struct JsonLines {
    format: TextFormat,
    decoder: arrow::json::reader::Decoder,
    out: BatchCoalescer,
    /// The next group is decoded line by line.
    careful: bool,
    /// Bad lines the light check let through, in this file.
    slipped: usize,
    /// Fields the schema lacks (`"name"`) that a strict decoder found in this
    /// file: lines holding them are decoded alone.
    unknown: Vec<Finder<'static>>,
    keys: Vec<KeyNode>,
}

impl JsonLines {
    pub fn new(format: TextFormat) -> Result<Self, ArrowError> {
        let decoder = lenient_decoder(&format)?;
        let out = BatchCoalescer::new(format.schema.clone(), BATCH_ROWS);
        let keys = format.schema.fields().iter().map(|f| KeyNode::new(f, true, false)).collect();
        Ok(Self { format, decoder, out, careful: false, slipped: 0, unknown: Vec::new(), keys })
    }

    /// Decodes a region of whole lines, the first of them numbered `first_line`.
    pub fn region(&mut self, region: &Bytes, first_line: u64, bad: &mut Vec<BadRecord>) -> Result<(), TextError> {
        let mut at = 0;
        let mut line = first_line;
        while at < region.len() {
            (at, line) = if self.careful {
                self.careful_group(region, at, line, bad)?
            } else {
                match self.fast_group(region, at, line, bad)? {
                    Some(next) => next,
                    None => {
                        self.careful = true;
                        continue;
                    }
                }
            };
        }
        Ok(())
    }

    /// The next full batch of good rows; with `end`, the last rows of the file too.
    pub fn next_batch(&mut self, end: bool) -> Result<Option<RecordBatch>, ArrowError> {
        if end && !self.out.has_completed_batch() {
            self.out.finish_buffered_batch()?;
        }
        Ok(self.out.next_completed_batch())
    }

    /// Decodes the group starting at `at` in one call; returns where it stopped
    /// and the number of the line there, or `None` when that fails (nothing of
    /// the group is kept then).
    fn fast_group(
        &mut self,
        region: &Bytes,
        at: usize,
        line: u64,
        bad: &mut Vec<BadRecord>,
    ) -> Result<Option<(usize, u64)>, TextError> {
        let decoded = self.decoder.decode(&region[at..]).ok().filter(|_| !self.decoder.has_partial_record());
        let Some(consumed) = decoded else {
            self.reset()?;
            return Ok(None);
        };
        let end = at + consumed;
        let (lines, breaks) = count_lines(&region[at..end]);
        if self.decoder.len() != lines || !ends_a_line(region, end) {
            // A record spans lines, or a line holds two.
            self.reset()?;
            return Ok(None);
        }
        match self.decoder.flush() {
            Ok(Some(batch)) => {
                self.accept(batch, || Cow::Owned(split_lines(region.slice(at..end), line)), bad)?;
                Ok(Some((end, line + breaks)))
            }
            Ok(None) => Ok(Some((end, line + breaks))),
            Err(_) => {
                self.reset()?;
                Ok(None)
            }
        }
    }

    /// Decodes up to [`GROUP_ROWS`] lines from `at` one by one (see the module's
    /// doc); returns where it stopped and the number of the line there.
    fn careful_group(
        &mut self,
        region: &Bytes,
        at: usize,
        first_line: u64,
        bad: &mut Vec<BadRecord>,
    ) -> Result<(usize, u64), TextError> {
        let bad_before = bad.len();
        let mut rescued = false;
        // The lines in the decoder, in its row order.
        let mut group: Vec<(u64, Bytes)> = Vec::with_capacity(GROUP_ROWS);
        // Where the group ends, and the number of the line there.
        let mut next = (at, first_line);
        for (number, raw, after) in lines_from(region, at, first_line) {
            if group.len() == GROUP_ROWS {
                break;
            }
            next = (after, number + 1);
            if is_blank(&raw) {
                continue;
            }
            let checked = if self.slipped < THOROUGH_AFTER { looks_whole(&raw) } else { is_one_value(&raw) };
            if checked && !self.holds_unknown(&raw) && self.feed(&raw, &group)? {
                group.push((number, raw));
            } else {
                rescued |= self.alone(number, raw, bad)?;
            }
        }
        loop {
            match self.decoder.flush() {
                Ok(Some(batch)) => self.accept(batch, || Cow::Borrowed(&group), bad)?,
                Ok(None) => {}
                Err(error) => {
                    self.reset()?;
                    if self.learn(&error) {
                        // Set aside the lines holding the field, decode the rest again.
                        for (number, raw) in std::mem::take(&mut group) {
                            if !self.holds_unknown(&raw) && self.feed(&raw, &group)? {
                                group.push((number, raw));
                            } else {
                                rescued |= self.alone(number, raw, bad)?;
                            }
                        }
                        continue;
                    }
                    // Something no line showed alone (a field of a non-nullable
                    // column missing): the old way, down to single lines.
                    let mut batches = Vec::new();
                    decode_lines(&self.format, &group, &mut batches, bad)?;
                    self.push_all(batches)?;
                }
            }
            break;
        }
        self.careful = rescued || bad.len() > bad_before || !self.unknown.is_empty();
        Ok(next)
    }

    /// Notes the field a strict decoder found that the schema lacks, unless it
    /// was noted before; false if the error is not about such a field.
    fn learn(&mut self, error: &ArrowError) -> bool {
        let Some(path) = new_column(error) else { return false };
        let name = path.rsplit('.').next().unwrap_or(&path);
        let key = Finder::new(format!("\"{name}\"").as_bytes()).into_owned();
        if self.unknown.iter().any(|known| known.needle() == key.needle()) {
            return false;
        }
        self.unknown.push(key);
        true
    }

    /// Whether `line` holds, as a key, a field the schema lacks that this
    /// file has shown before.
    fn holds_unknown(&self, line: &[u8]) -> bool {
        self.unknown.iter().any(|key| key_values(line, key).next().is_some())
    }

    /// Feeds one checked line to the decoder; false if the decoder refused it
    /// after all (the decoder then holds `group` again, without the line).
    fn feed(&mut self, text: &[u8], group: &[(u64, Bytes)]) -> Result<bool, TextError> {
        let before = self.decoder.len();
        let fed = self.decoder.decode(text);
        if matches!(fed, Ok(n) if n == text.len())
            && !self.decoder.has_partial_record()
            && self.decoder.len() == before + 1
        {
            return Ok(true);
        }
        self.slipped += 1;
        self.reset()?;
        for (_, held) in group {
            let refed = self.decoder.decode(held);
            debug_assert!(matches!(refed, Ok(n) if n == held.len()), "a line the decoder took before");
        }
        Ok(false)
    }

    /// Decodes one line alone and strictly: a good row joins the output, a bad
    /// one goes to [`text::reject`]. Returns whether the line was not good.
    fn alone(&mut self, line: u64, raw: Bytes, bad: &mut Vec<BadRecord>) -> Result<bool, TextError> {
        match decode_group(&self.format, &[(line, raw.clone())])? {
            Ok(batch) => {
                self.push_all(batch)?;
                Ok(false)
            }
            Err(error) => {
                let rescued = text::reject(&self.format, line, raw, error, bad)?;
                self.push_all(rescued)?;
                Ok(true)
            }
        }
    }

    /// Takes a decoded group whose row `i` came from `lines()[i]`: rows with a
    /// value that does not fit, or a NULL their line does not explain, are
    /// decoded again alone.
    fn accept<'l>(
        &mut self,
        batch: RecordBatch,
        lines: impl FnOnce() -> Cow<'l, [(u64, Bytes)]>,
        bad: &mut Vec<BadRecord>,
    ) -> Result<(), TextError> {
        let misfits = match exact_ints::convert(batch.clone(), &self.format.schema)? {
            Ok(batch) => return self.explain_nulls(batch, lines, bad),
            Err(misfits) => misfits,
        };
        // A number that is not a whole one in an integer column: its line is
        // decoded alone (and fails), the other lines' rows taken.
        let lines = lines();
        let mut keep = vec![true; batch.num_rows()];
        for misfit in misfits {
            keep[misfit.row] = false;
        }
        let mut others = Vec::with_capacity(lines.len());
        for ((line, raw), kept) in lines.iter().zip(&keep) {
            if *kept {
                others.push((*line, raw.clone()));
            } else {
                self.alone(*line, raw.clone(), bad)?;
            }
        }
        let batch = filter_record_batch(&batch, &BooleanArray::from(keep))?;
        let batch = exact_ints::convert_strictly(batch, &self.format.schema)?;
        self.explain_nulls(batch, || Cow::Owned(others), bad)
    }

    /// [`Self::accept`] once integers are converted: rows with a NULL their
    /// line does not explain are decoded again alone.
    fn explain_nulls<'l>(
        &mut self,
        batch: RecordBatch,
        lines: impl FnOnce() -> Cow<'l, [(u64, Bytes)]>,
        bad: &mut Vec<BadRecord>,
    ) -> Result<(), TextError> {
        let mut nulls = Vec::new();
        for (key, column) in self.keys.iter().zip(batch.columns()) {
            key.nulls(column.as_ref(), None, None, &mut nulls);
        }
        if nulls.is_empty() {
            return Ok(self.out.push_batch(batch)?);
        }
        let lines = lines();
        let mut suspects: Vec<u32> = nulls
            .into_iter()
            .filter(|(row, key)| !key.explains_null(&lines[*row as usize].1))
            .map(|(row, _)| row)
            .collect();
        suspects.sort_unstable();
        suspects.dedup();
        let mut keep = vec![true; batch.num_rows()];
        for row in suspects {
            let (line, raw) = &lines[row as usize];
            if let Err(error) = decode_group(&self.format, &[(*line, raw.clone())])? {
                keep[row as usize] = false;
                let rescued = text::reject(&self.format, *line, raw.clone(), error, bad)?;
                self.push_all(rescued)?;
            }
        }
        let batch =
            if keep.iter().all(|k| *k) { batch } else { filter_record_batch(&batch, &BooleanArray::from(keep))? };
        Ok(self.out.push_batch(batch)?)
    }

    fn push_all(&mut self, batches: impl IntoIterator<Item = RecordBatch>) -> Result<(), ArrowError> {
        batches.into_iter().try_for_each(|batch| self.out.push_batch(batch))
    }

    fn reset(&mut self) -> Result<(), TextError> {
        self.decoder = lenient_decoder(&self.format).map_err(TextError::Setup)?;
        Ok(())
    }
}

fn lenient_decoder(format: &TextFormat) -> Result<arrow::json::reader::Decoder, ArrowError> {
    format.json_decoder(GROUP_ROWS, true)
}

/// Whether the decoder, which stops after a record and the whitespace after it,
/// stopped at the start of a line (and not before a line's second record).
fn ends_a_line(region: &[u8], end: usize) -> bool {
    let last = region[..end].iter().rposition(|b| !b.is_ascii_whitespace());
    end == region.len() || last.is_none_or(|last| region[last..end].contains(&b'\n'))
}

/// The light check: the line opens and closes an object and is UTF-8.
fn looks_whole(line: &[u8]) -> bool {
    line.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
        && line.iter().rfind(|b| !b.is_ascii_whitespace()) == Some(&b'}')
        && std::str::from_utf8(line).is_ok()
}

/// The thorough check: the line opens an object, is UTF-8, and holds exactly
/// one JSON value.
fn is_one_value(line: &[u8]) -> bool {
    line.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
        && std::str::from_utf8(line).is_ok()
        && serde_json::from_slice::<IgnoredAny>(line).is_ok()
}

/// A field of the schema, with what finds its key in a line.
struct KeyNode {
    /// `"name"`; `None` when a line cannot be searched for it (a list's
    /// element, a map's entries, a name JSON may escape), so that every NULL
    /// of the field is checked by decoding its line.
    key: Option<Finder<'static>>,
    children: Vec<KeyNode>,
}

impl KeyNode {
    /// `named`: the field's name is a key in the JSON (not a list's element);
    /// `in_map`: the field is inside a map, whose keys are data, not names.
    fn new(field: &Field, named: bool, in_map: bool) -> Self {
        let name = field.name();
        let searchable = named && !in_map && !name.chars().any(|c| c == '"' || c == '\\' || c == '/' || c.is_control());
        let key = searchable.then(|| Finder::new(format!("\"{name}\"").as_bytes()).into_owned());
        let children = match field.data_type() {
            DataType::Struct(fields) => fields.iter().map(|f| KeyNode::new(f, true, in_map)).collect(),
            DataType::List(item) | DataType::LargeList(item) | DataType::FixedSizeList(item, _) => {
                vec![KeyNode::new(item, false, in_map)]
            }
            DataType::Map(entries, _) => vec![KeyNode::new(entries, false, true)],
            _ => Vec::new(),
        };
        Self { key, children }
    }

    /// Adds `(row, field)` for each NULL of `array` that its parent does not
    /// explain; `rows` maps the array's slots to the batch's rows (for the
    /// elements of lists), `parent` holds the parent struct's NULLs.
    fn nulls<'a>(
        &'a self,
        array: &dyn Array,
        rows: Option<&[u32]>,
        parent: Option<&NullBuffer>,
        out: &mut Vec<(u32, &'a KeyNode)>,
    ) {
        let row = |slot: usize| rows.map_or(slot as u32, |rows| rows[slot]);
        if let Some(nulls) = array.nulls().filter(|nulls| nulls.null_count() > 0) {
            for (slot, valid) in nulls.iter().enumerate() {
                if !valid && parent.is_none_or(|p| p.is_valid(slot)) {
                    out.push((row(slot), self));
                }
            }
        }
        if !has_nulls_below(array) {
            return;
        }
        match array.data_type() {
            DataType::Struct(_) => {
                let array = array.as_struct();
                for (child, column) in self.children.iter().zip(array.columns()) {
                    child.nulls(column.as_ref(), rows, array.nulls(), out);
                }
            }
            DataType::List(_) => {
                let array = array.as_list::<i32>();
                self.elements(array.offsets(), array.values().as_ref(), row, out);
            }
            DataType::LargeList(_) => {
                let array = array.as_list::<i64>();
                self.elements(array.offsets(), array.values().as_ref(), row, out);
            }
            DataType::Map(_, _) => {
                let array = array.as_map();
                self.elements(array.offsets(), array.entries(), row, out);
            }
            DataType::FixedSizeList(_, size) => {
                let array = array.as_fixed_size_list();
                let size = (*size).max(1) as usize;
                let rows: Vec<u32> = (0..array.values().len()).map(|slot| row(slot / size)).collect();
                self.children[0].nulls(array.values().as_ref(), Some(&rows), None, out);
            }
            _ => {}
        }
    }

    fn elements<'a, O: OffsetSizeTrait>(
        &'a self,
        offsets: &OffsetBuffer<O>,
        values: &dyn Array,
        row: impl Fn(usize) -> u32,
        out: &mut Vec<(u32, &'a KeyNode)>,
    ) {
        let mut rows = vec![0u32; values.len()];
        for (slot, range) in offsets.windows(2).enumerate() {
            let (start, end) = (range[0].as_usize(), range[1].as_usize());
            rows[start..end].fill(row(slot));
        }
        self.children[0].nulls(values, Some(&rows), None, out);
    }

    /// Whether `line` shows why this field is NULL: its key is absent, or
    /// each occurrence of it holds `null`.
    fn explains_null(&self, line: &[u8]) -> bool {
        let Some(key) = &self.key else { return false };
        if memchr::memmem::find(line, b"\\u").is_some() {
            // An escaped key may spell the name.
            return false;
        }
        key_values(line, key).all(|value| value.starts_with(b"null"))
    }
}

/// The values that follow each occurrence of `"key"` as a key in `line` (an
/// occurrence not followed by a colon is a string value, and skipped).
fn key_values<'l>(line: &'l [u8], key: &'l Finder<'static>) -> impl Iterator<Item = &'l [u8]> {
    key.find_iter(line).filter_map(|at| skip_space(&line[at + key.needle().len()..]).strip_prefix(b":").map(skip_space))
}

fn skip_space(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r')).unwrap_or(bytes.len());
    &bytes[start..]
}

/// Whether any array below `array` (not `array` itself) holds a NULL.
fn has_nulls_below(array: &dyn Array) -> bool {
    let data = array.to_data();
    fn below(data: &arrow::array::ArrayData) -> bool {
        data.child_data().iter().any(|child| child.null_count() > 0 || below(child))
    }
    below(&data)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::Int64Array;
    use arrow::datatypes::Schema;
    use futures::StreamExt;
    use sluice_proto::spec::{CsvOptions, Format, RESCUED_DATA, SchemaEvolution};

    use super::*;
    use crate::rescue;
    use crate::text::TextReader;

    async fn read(text: String, chunk: usize) -> (Vec<i64>, Vec<(u64, String)>) {
        let (ids, bad, _) = read_with(text, chunk, SchemaEvolution::None).await;
        (ids, bad)
    }

    /// The ids read, the bad lines, and the rescued data of each row.
    async fn read_with(
        text: String,
        chunk: usize,
        evolution: SchemaEvolution,
    ) -> (Vec<i64>, Vec<(u64, String)>, Vec<Option<String>>) {
        let item = DataType::Struct(
            vec![Field::new("code", DataType::Utf8, true), Field::new("qty", DataType::Int64, true)].into(),
        );
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("name", DataType::Utf8, true),
            Field::new(
                "addr",
                DataType::Struct(
                    vec![Field::new("city", DataType::Utf8, true), Field::new("zip", DataType::Int64, true)].into(),
                ),
                true,
            ),
            Field::new("items", DataType::List(Arc::new(Field::new("item", item, true))), true),
        ]));
        let schema = match evolution {
            SchemaEvolution::Rescue => Arc::new(rescue::with_rescued_column(&schema)),
            _ => schema,
        };
        let format = TextFormat::new(Format::Json, schema, CsvOptions::default(), evolution, "file:///f".to_string());
        let bytes = Bytes::from(text);
        let chunks: Vec<object_store::Result<Bytes>> =
            (0..bytes.len()).step_by(chunk).map(|at| Ok(bytes.slice(at..(at + chunk).min(bytes.len())))).collect();
        let mut reader = TextReader::new(format, futures::stream::iter(chunks).boxed()).unwrap();
        let mut ids = Vec::new();
        let mut rescued = Vec::new();
        while let Some(batch) = reader.next_batch().await.ok().flatten() {
            let column = batch.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
            ids.extend(column.iter().map(|id| id.unwrap_or(-1)));
            if let Some(column) = batch.column_by_name(RESCUED_DATA) {
                rescued.extend(column.as_string::<i32>().iter().map(|r| r.map(str::to_string)));
            }
        }
        let mut bad: Vec<(u64, String)> = reader.take_bad().into_iter().map(|b| (b.line, b.error)).collect();
        bad.sort();
        (ids, bad, rescued)
    }

    #[tokio::test]
    async fn values_of_the_wrong_type_are_found_among_nulls_at_every_level() {
        let lines = [
            r#"{"id":1,"name":"a","addr":{"city":"x","zip":1},"items":[{"code":"c","qty":1}]}"#,
            r#"{"id":2}"#,
            r#"{"id":3,"name":null,"addr":null,"items":null}"#,
            r#"{"id":4,"addr":{"city":"x","zip":"not a number"}}"#,
            r#"{"id":5,"items":[{"code":"c","qty":"many"}]}"#,
            r#"{"id":"six"}"#,
            r#"{"id":7,"items":[null,{"code":"d"}],"addr":{"city":null}}"#,
            r#"{"id":8,"addr":"somewhere"}"#,
            r#"{"i\u0064":"nine"}"#,
            r#"{"id":10,"name":"id","note":"\"id\": 5"}"#,
            r#"{"id":11, "name" : null , "addr" :null}"#,
            // Numbers that are not whole ones in integer columns, and ones that are.
            r#"{"id":12.5}"#,
            r#"{"id":13,"addr":{"zip":1.5}}"#,
            r#"{"id":14,"items":[{"code":"c","qty":1},{"code":"d","qty":2.5}]}"#,
            r#"{"id":15.0,"addr":{"zip":1e3},"items":[{"qty":2.00}]}"#,
        ];
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        let (ids, bad) = read(text, 4096).await;
        assert_eq!(ids, vec![1, 2, 3, 7, 10, 11, 15]);
        let bad_lines: Vec<u64> = bad.iter().map(|(line, _)| *line).collect();
        assert_eq!(bad_lines, vec![4, 5, 6, 8, 9, 12, 13, 14], "{bad:?}");
        assert!(bad[2].1.contains("six"), "{bad:?}");
        assert!(bad[7].1.contains("'items.item.qty': 2.5 is not a whole number"), "{bad:?}");
    }

    #[tokio::test]
    async fn a_group_with_a_broken_line_keeps_its_other_lines_even_those_only_arrow_reads() {
        // A raw tab inside a string: serde_json refuses it, arrow reads it.
        let lines = [
            "{\"id\":1,\"name\":\"a\"}",
            "{\"id\":2,\"name\":\"trunc",
            "{\"id\":3,\"name\":\"tab\there\"}",
            "not json",
            "{\"id\":5,\"name\":\"\u{e9}\"} {\"id\":55}",
            "{\"id\":6,\"name\":\"f\"}",
        ];
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        let (mut ids, bad) = read(text, 4096).await;
        ids.sort();
        assert_eq!(ids, vec![1, 3, 6]);
        let bad_lines: Vec<u64> = bad.iter().map(|(line, _)| *line).collect();
        assert_eq!(bad_lines, vec![2, 4, 5], "{bad:?}");
    }

    #[tokio::test]
    async fn two_records_on_the_line_where_a_group_ends_are_a_bad_line() {
        let mut text = String::new();
        for id in 1..GROUP_ROWS as i64 {
            text.push_str(&format!("{{\"id\":{id}}}\n"));
        }
        text.push_str("{\"id\":1024} {\"id\":99999}\n{\"id\":1025}\n");
        let (ids, bad) = read(text, 1 << 20).await;
        let expected: Vec<i64> = (1..GROUP_ROWS as i64).chain([1025]).collect();
        assert_eq!(ids, expected);
        assert_eq!(bad.iter().map(|(line, _)| *line).collect::<Vec<_>>(), vec![GROUP_ROWS as u64]);
    }

    #[tokio::test]
    async fn in_rescue_mode_lines_with_unknown_fields_are_rescued_and_the_others_decoded_in_groups() {
        let mut text = String::new();
        let mut expected = Vec::new();
        for id in 1..=3000i64 {
            let line = match id % 50 {
                0 => format!("{{\"id\":{id},\"extra\":{id}}}"),
                25 => format!("{{\"id\":{id},\"name\":\"x\",\"addr\":{{\"zip\":1,\"floor\":2}}}}"),
                _ => format!("{{\"id\":{id},\"name\":\"extra\"}}"),
            };
            expected.push((id, matches!(id % 50, 0 | 25)));
            text.push_str(&line);
            text.push('\n');
        }
        let (ids, bad, rescued) = read_with(text, 1 << 16, SchemaEvolution::Rescue).await;
        assert!(bad.is_empty(), "{bad:?}");
        let mut got: Vec<(i64, bool)> = ids.into_iter().zip(rescued.iter().map(Option::is_some)).collect();
        got.sort();
        assert_eq!(got, expected);
        assert!(rescued.iter().flatten().any(|r| r.contains("\"extra\":50")), "{rescued:?}");
        assert!(rescued.iter().flatten().any(|r| r.contains("floor")), "{rescued:?}");
    }

    #[tokio::test]
    async fn bad_lines_spread_over_many_groups_and_chunks_are_each_found_once() {
        let mut text = String::new();
        let mut expected = Vec::new();
        let mut expected_bad = Vec::new();
        for id in 1..=5000i64 {
            let line = match id % 97 {
                0 => format!("{{\"id\":{id},\"name\":\"tru"),
                13 => "not json".to_string(),
                29 => format!("{{\"id\":{id},\"addr\":{{\"zip\":\"x\"}}}}"),
                // Broken inside: the light check lets it through, the decoder does not.
                53 => format!("{{\"id\":{id},\"name\":\"a\" \"b\"}}"),
                // An escaped key: its row's NULLs are checked by decoding it alone.
                41 => format!("{{\"id\":{id},\"n\\u0061me\":\"x\"}}"),
                _ => format!("{{\"id\":{id},\"name\":\"n{id}\",\"addr\":null}}"),
            };
            match id % 97 {
                0 | 13 | 29 | 53 => expected_bad.push(id as u64),
                _ => expected.push(id),
            }
            text.push_str(&line);
            text.push('\n');
        }
        for chunk in [1000, 1 << 20] {
            let (ids, bad) = read(text.clone(), chunk).await;
            assert_eq!(ids, expected, "chunk {chunk}");
            let bad_lines: Vec<u64> = bad.iter().map(|(line, _)| *line).collect();
            assert_eq!(bad_lines, expected_bad, "chunk {chunk}");
        }
    }
}
