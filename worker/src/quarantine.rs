//! The quarantine table: what could not become a row of the sink, kept where
//! users can query it. A task collects entries while it runs and writes them
//! as Parquet files below the quarantine table at its end; the coordinator
//! commits them, with the batch's txn, before the batch's own commit.

use std::num::NonZeroU64;
use std::sync::{Arc, Mutex, OnceLock};

use arrow::array::{
    ArrayRef, Int64Array, ListBuilder, RecordBatch, StringArray, StringBuilder, TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use base64::Engine;
use delta_kernel::table_properties::DataSkippingNumIndexedCols;
use deltalake::datafile::writer::{DeltaWriter, WriterConfig};
use deltalake::kernel::{Add, StructType};

use crate::conform::{conform_batch, to_delta};
use crate::error::WorkerError;
use crate::storage::{ensure_local_dir, parse_url};
use crate::text::BadRecord;
use sluice_proto::storage::StorageOptions;

/// A record of a source file that could not be decoded.
pub const KIND_RECORD: &str = "record";
/// A file that could not be read (at all, or from some row on).
pub const KIND_FILE: &str = "file";
/// An output row that failed a `quarantine` expectation.
pub const KIND_EXPECTATION: &str = "expectation";

/// One quarantined item.
#[derive(Debug, Clone)]
pub struct Entry {
    pub kind: &'static str,
    pub file: Option<String>,
    pub line: Option<u64>,
    /// The input as it was: a line of a file, or an output row as JSON.
    pub raw: Option<Vec<u8>>,
    pub error: String,
    /// For an expectation entry: the expectations the row failed.
    pub expectations: Vec<String>,
}

impl Entry {
    pub fn record(file: &str, bad: BadRecord) -> Self {
        Self {
            kind: KIND_RECORD,
            file: Some(file.to_string()),
            line: Some(bad.line),
            raw: Some(bad.raw.to_vec()),
            error: bad.error,
            expectations: Vec::new(),
        }
    }

    pub fn file(file: &str, error: String) -> Self {
        Self { kind: KIND_FILE, file: Some(file.to_string()), line: None, raw: None, error, expectations: Vec::new() }
    }
}

/// What a task quarantines, shared by its reading and writing sides.
pub type Collector = Arc<Mutex<Vec<Entry>>>;

/// Each row of `batch` as a line of JSON: how a row that is not a line of a
/// file (an expectation's, a Parquet file's) is kept in the quarantine, and
/// how rescued columns are read into `_rescued_data`.
pub fn rows_as_json(batch: &RecordBatch) -> Result<Vec<Vec<u8>>, arrow::error::ArrowError> {
    let mut out = Vec::new();
    {
        let mut writer = arrow::json::LineDelimitedWriter::new(&mut out);
        writer.write(batch)?;
        writer.finish()?;
    }
    Ok(out.split(|b| *b == b'\n').filter(|l| !l.is_empty()).map(<[u8]>::to_vec).collect())
}

/// Adds `entries` to the collector.
pub fn collect(collector: &Collector, entries: impl IntoIterator<Item = Entry>) {
    collector.lock().unwrap_or_else(|e| e.into_inner()).extend(entries);
}

/// How many of `entries` are of `kind`.
pub fn count(entries: &[Entry], kind: &str) -> u64 {
    entries.iter().filter(|e| e.kind == kind).count() as u64
}

/// The quarantine table's schema: Delta's, and the Arrow schema rows are written with.
pub fn schema() -> &'static (StructType, SchemaRef) {
    static SCHEMA: OnceLock<(StructType, SchemaRef)> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let text = |name: &str| Field::new(name, DataType::Utf8, true);
        let fields = vec![
            Field::new("batch", DataType::Int64, true),
            text("flow"),
            text("kind"),
            text("file_path"),
            Field::new("line", DataType::Int64, true),
            text("raw"),
            text("raw_encoding"),
            text("error"),
            Field::new("expectations", DataType::List(Arc::new(Field::new("element", DataType::Utf8, true))), true),
            Field::new("quarantined_at", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), true),
        ];
        let (delta, arrow) = to_delta(&Schema::new(fields)).expect("the quarantine schema maps to Delta");
        (delta, Arc::new(arrow))
    })
}

/// Where a batch's quarantined entries come from.
pub struct Origin<'a> {
    pub flow: &'a str,
    pub batch: u64,
    pub at_us: i64,
}

fn to_batch(entries: &[Entry], origin: &Origin<'_>) -> Result<RecordBatch, WorkerError> {
    let rows = entries.len();
    let mut raw = StringBuilder::new();
    let mut encoding = StringBuilder::new();
    for entry in entries {
        match &entry.raw {
            None => {
                raw.append_null();
                encoding.append_null();
            }
            Some(bytes) => match std::str::from_utf8(bytes) {
                Ok(text) => {
                    raw.append_value(text);
                    encoding.append_value("text");
                }
                Err(_) => {
                    raw.append_value(base64::engine::general_purpose::STANDARD.encode(bytes));
                    encoding.append_value("base64");
                }
            },
        }
    }
    let mut expectations = ListBuilder::new(StringBuilder::new());
    for entry in entries {
        if entry.expectations.is_empty() {
            expectations.append_null();
        } else {
            for name in &entry.expectations {
                expectations.values().append_value(name);
            }
            expectations.append(true);
        }
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(vec![origin.batch as i64; rows])),
        Arc::new(StringArray::from(vec![origin.flow; rows])),
        Arc::new(StringArray::from_iter_values(entries.iter().map(|e| e.kind))),
        Arc::new(StringArray::from_iter(entries.iter().map(|e| e.file.as_deref()))),
        Arc::new(Int64Array::from_iter(entries.iter().map(|e| e.line.map(|l| l as i64)))),
        Arc::new(raw.finish()),
        Arc::new(encoding.finish()),
        Arc::new(StringArray::from_iter_values(entries.iter().map(|e| e.error.as_str()))),
        Arc::new(expectations.finish()),
        Arc::new(TimestampMicrosecondArray::from(vec![origin.at_us; rows]).with_timezone("UTC")),
    ];
    let built = Schema::new(
        schema()
            .1
            .fields()
            .iter()
            .zip(&columns)
            .map(|(f, c)| Field::new(f.name(), c.data_type().clone(), true))
            .collect::<Vec<_>>(),
    );
    let batch = RecordBatch::try_new(Arc::new(built), columns).map_err(|e| WorkerError::Schema(e.to_string()))?;
    conform_batch(&batch, &schema().1).map_err(|e| WorkerError::Schema(e.to_string()))
}

/// Writes `entries` as data files below the quarantine table at `url`; returns their `Add` actions.
pub async fn write(
    url: &str,
    entries: &[Entry],
    origin: &Origin<'_>,
    storage: &StorageOptions,
) -> Result<Vec<Add>, WorkerError> {
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    let url = parse_url(url)?;
    ensure_local_dir(&url)?;
    let table = crate::storage::table_builder(&url, storage)?.build()?;
    let config = WriterConfig::new(
        schema().1.clone(),
        Vec::new(),
        None,
        NonZeroU64::new(crate::task_runner::TARGET_FILE_SIZE),
        None,
        DataSkippingNumIndexedCols::NumColumns(32),
        None,
    );
    let mut writer = DeltaWriter::new(table.object_store(), config);
    for chunk in entries.chunks(crate::formats::BATCH_ROWS) {
        let batch = to_batch(chunk, origin)?;
        if let Err(error) = writer.write(&batch).await {
            let _ = writer.abort().await;
            return Err(error.into());
        }
    }
    Ok(writer.close().await?)
}
