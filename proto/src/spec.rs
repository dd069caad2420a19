//! The pipeline file.
//!
//! Users write YAML ([`RawPipeline`] and friends mirror it key for key, and reject
//! unknown keys); [`parse_pipeline`] validates it once into a [`PipelineSpec`],
//! resolving relative paths against the pipeline file's folder. Every error names
//! the field, as `flows[0].source.files.format`, and what is allowed there.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arrow_schema::Schema;
use serde::{Deserialize, Serialize};
use url::Url;

use crate::schema_ddl;

/// Files per micro-batch when the pipeline file does not say (Auto Loader's default).
pub const DEFAULT_MAX_FILES_PER_BATCH: u64 = 1000;

/// URL schemes a location may use.
pub const SUPPORTED_SCHEMES: &[&str] = &["file", "s3", "s3a", "az", "abfs", "abfss", "gs"];

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The YAML does not have the shape of a pipeline file; the message names the
    /// field path, the line and the column.
    #[error("invalid pipeline file: {0}")]
    Shape(String),
    #[error("invalid pipeline file: {field}: {message}")]
    Invalid { field: String, message: String },
}

impl SpecError {
    fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid { field: field.into(), message: message.into() }
    }
}

// ---------------------------------------------------------------------------
// The file as written.
// ---------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPipeline {
    pub pipeline: String,
    pub checkpoint: String,
    #[serde(default)]
    pub trigger: Option<serde_yaml::Value>,
    pub flows: Vec<RawFlow>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFlow {
    pub name: String,
    pub source: RawSource,
    #[serde(default)]
    pub transform: Option<String>,
    pub sink: RawSink,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    #[serde(default)]
    pub files: Option<RawFilesSource>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFilesSource {
    pub path: String,
    pub format: Format,
    #[serde(default)]
    pub glob: Option<String>,
    #[serde(default)]
    pub schema: Option<String>,
    #[serde(default)]
    pub max_files_per_batch: Option<u64>,
    #[serde(default)]
    pub max_bytes_per_batch: Option<serde_yaml::Value>,
    #[serde(default)]
    pub allow_overwrites: bool,
    #[serde(default)]
    pub csv: Option<CsvOptions>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSink {
    pub table: String,
    #[serde(default)]
    pub mode: SinkMode,
    #[serde(default)]
    pub partition_by: Vec<String>,
    #[serde(default)]
    pub properties: BTreeMap<String, serde_yaml::Value>,
}

// ---------------------------------------------------------------------------
// The validated spec.
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct PipelineSpec {
    pub name: String,
    pub checkpoint: Url,
    pub trigger: Trigger,
    pub flows: Vec<FlowSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Process everything there is now, in as many batches as the limits need, then stop.
    AvailableNow,
    /// Keep running, starting a new round this long after the previous one began.
    Interval(Duration),
}

#[derive(Debug, Clone)]
pub struct FlowSpec {
    pub name: String,
    pub source: SourceSpec,
    /// DataFusion SQL over the relation `source`; `None` means `SELECT * FROM source`.
    pub transform: Option<String>,
    pub sink: SinkSpec,
}

#[derive(Debug, Clone)]
pub enum SourceSpec {
    Files(FilesSource),
}

#[derive(Debug, Clone)]
pub struct FilesSource {
    pub location: Url,
    pub format: Format,
    pub glob: Option<String>,
    pub schema: SchemaSpec,
    pub max_files_per_batch: u64,
    pub max_bytes_per_batch: Option<u64>,
    pub allow_overwrites: bool,
    pub csv: CsvOptions,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Newline-delimited JSON.
    Json,
    Csv,
    Parquet,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsvOptions {
    #[serde(default = "default_true")]
    pub header: bool,
    #[serde(default = "default_delimiter")]
    pub delimiter: char,
    #[serde(default = "default_quote")]
    pub quote: char,
    #[serde(default)]
    pub escape: Option<char>,
}

impl Default for CsvOptions {
    fn default() -> Self {
        Self { header: true, delimiter: ',', quote: '"', escape: None }
    }
}

fn default_true() -> bool {
    true
}
fn default_delimiter() -> char {
    ','
}
fn default_quote() -> char {
    '"'
}

#[derive(Debug, Clone)]
pub enum SchemaSpec {
    /// Sample the files of the first batch and keep the result in the checkpoint.
    Infer,
    Declared(Arc<Schema>),
}

#[derive(Debug, Clone)]
pub struct SinkSpec {
    pub table: Url,
    pub mode: SinkMode,
    pub partition_by: Vec<String>,
    pub properties: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkMode {
    #[default]
    Append,
}

impl FlowSpec {
    /// The Delta `txn` application id under which this flow's batches are committed.
    pub fn app_id(&self, pipeline: &str) -> String {
        format!("sluice:{pipeline}/{}", self.name)
    }

    pub fn files_source(&self) -> &FilesSource {
        match &self.source {
            SourceSpec::Files(files) => files,
        }
    }
}

// ---------------------------------------------------------------------------
// Validation.
// ---------------------------------------------------------------------------

/// Parses and validates a pipeline file. Relative local paths are resolved
/// against `base_dir` (the pipeline file's folder), or kept relative to the
/// working directory when it is `None`.
pub fn parse_pipeline(yaml: &str, base_dir: Option<&Path>) -> Result<PipelineSpec, SpecError> {
    let raw: RawPipeline = serde_yaml::from_str(yaml).map_err(|e| SpecError::Shape(e.to_string()))?;
    PipelineSpec::from_raw(raw, base_dir)
}

impl PipelineSpec {
    pub fn from_raw(raw: RawPipeline, base_dir: Option<&Path>) -> Result<Self, SpecError> {
        validate_name("pipeline", &raw.pipeline)?;
        let checkpoint = parse_location("checkpoint", &raw.checkpoint, base_dir)?;
        let trigger = parse_trigger(raw.trigger.as_ref())?;
        if raw.flows.is_empty() {
            return Err(SpecError::invalid("flows", "a pipeline needs at least one flow"));
        }
        let mut flows: Vec<FlowSpec> = Vec::with_capacity(raw.flows.len());
        for (index, raw_flow) in raw.flows.into_iter().enumerate() {
            let flow = FlowSpec::from_raw(raw_flow, &format!("flows[{index}]"), base_dir)?;
            if flows.iter().any(|f| f.name == flow.name) {
                return Err(SpecError::invalid(
                    format!("flows[{index}].name"),
                    format!("flow `{}` is defined twice; flow names must be unique", flow.name),
                ));
            }
            if let Some(other) = flows.iter().find(|f| f.sink.table == flow.sink.table) {
                return Err(SpecError::invalid(
                    format!("flows[{index}].sink.table"),
                    format!("flow `{}` writes to the same table; each flow needs its own sink", other.name),
                ));
            }
            flows.push(flow);
        }
        Ok(Self { name: raw.pipeline, checkpoint, trigger, flows })
    }
}

impl FlowSpec {
    fn from_raw(raw: RawFlow, field: &str, base_dir: Option<&Path>) -> Result<Self, SpecError> {
        validate_name(&format!("{field}.name"), &raw.name)?;
        let Some(files) = raw.source.files else {
            return Err(SpecError::invalid(format!("{field}.source"), "a source needs a `files:` section"));
        };
        let source = FilesSource::from_raw(files, &format!("{field}.source.files"), base_dir)?;
        let transform = match raw.transform {
            Some(sql) if sql.trim().is_empty() => {
                return Err(SpecError::invalid(
                    format!("{field}.transform"),
                    "is empty; leave it out to keep every column",
                ));
            }
            other => other,
        };
        let sink = SinkSpec::from_raw(raw.sink, &format!("{field}.sink"), base_dir)?;
        Ok(Self { name: raw.name, source: SourceSpec::Files(source), transform, sink })
    }
}

impl FilesSource {
    fn from_raw(raw: RawFilesSource, field: &str, base_dir: Option<&Path>) -> Result<Self, SpecError> {
        let location = parse_location(&format!("{field}.path"), &raw.path, base_dir)?;
        if let Some(glob) = &raw.glob {
            globset::Glob::new(glob)
                .map_err(|e| SpecError::invalid(format!("{field}.glob"), format!("not a valid glob: {e}")))?;
        }
        let schema = match raw.schema.as_deref().map(str::trim) {
            None | Some("infer") => SchemaSpec::Infer,
            Some(ddl) => SchemaSpec::Declared(Arc::new(
                schema_ddl::parse_schema(ddl)
                    .map_err(|e| SpecError::invalid(format!("{field}.schema"), format!("{e} (or write `infer`)")))?,
            )),
        };
        let max_files_per_batch = raw.max_files_per_batch.unwrap_or(DEFAULT_MAX_FILES_PER_BATCH);
        if max_files_per_batch == 0 {
            return Err(SpecError::invalid(format!("{field}.max_files_per_batch"), "must be at least 1"));
        }
        let max_bytes_per_batch = raw
            .max_bytes_per_batch
            .as_ref()
            .map(|value| parse_byte_size(&format!("{field}.max_bytes_per_batch"), value))
            .transpose()?;
        if raw.csv.is_some() && raw.format != Format::Csv {
            return Err(SpecError::invalid(format!("{field}.csv"), "csv options need `format: csv`"));
        }
        Ok(Self {
            location,
            format: raw.format,
            glob: raw.glob,
            schema,
            max_files_per_batch,
            max_bytes_per_batch,
            allow_overwrites: raw.allow_overwrites,
            csv: raw.csv.unwrap_or_default(),
        })
    }
}

impl SinkSpec {
    fn from_raw(raw: RawSink, field: &str, base_dir: Option<&Path>) -> Result<Self, SpecError> {
        let table = parse_location(&format!("{field}.table"), &raw.table, base_dir)?;
        for (index, column) in raw.partition_by.iter().enumerate() {
            if column.trim().is_empty() || raw.partition_by[..index].contains(column) {
                return Err(SpecError::invalid(
                    format!("{field}.partition_by[{index}]"),
                    format!("`{column}` is empty or repeated"),
                ));
            }
        }
        let mut properties = BTreeMap::new();
        for (key, value) in raw.properties {
            let text = match value {
                serde_yaml::Value::String(s) => s,
                serde_yaml::Value::Bool(b) => b.to_string(),
                serde_yaml::Value::Number(n) => n.to_string(),
                _ => {
                    return Err(SpecError::invalid(
                        format!("{field}.properties.{key}"),
                        "must be a string, number or boolean",
                    ));
                }
            };
            properties.insert(key, text);
        }
        Ok(Self { table, mode: raw.mode, partition_by: raw.partition_by, properties })
    }
}

fn validate_name(field: &str, name: &str) -> Result<(), SpecError> {
    let valid = !name.is_empty()
        && name.len() <= 128
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if valid {
        Ok(())
    } else {
        Err(SpecError::invalid(
            field,
            format!("`{name}` is not a valid name: use 1 to 128 letters, digits, `_` or `-`"),
        ))
    }
}

fn parse_trigger(value: Option<&serde_yaml::Value>) -> Result<Trigger, SpecError> {
    const ALLOWED: &str = "allowed: `available_now` or `{ interval: 30s }`";
    let Some(value) = value else { return Ok(Trigger::AvailableNow) };
    if value.as_str() == Some("available_now") {
        return Ok(Trigger::AvailableNow);
    }
    let interval = value
        .as_mapping()
        .filter(|m| m.len() == 1)
        .and_then(|m| m.get("interval"))
        .ok_or_else(|| SpecError::invalid("trigger", format!("unknown trigger; {ALLOWED}")))?;
    let text = interval
        .as_str()
        .ok_or_else(|| SpecError::invalid("trigger.interval", "must be a duration such as `30s` or `5m`"))?;
    let duration = humantime::parse_duration(text).map_err(|e| {
        SpecError::invalid("trigger.interval", format!("`{text}` is not a duration ({e}); write e.g. `30s` or `5m`"))
    })?;
    if duration.is_zero() {
        return Err(SpecError::invalid("trigger.interval", "must be longer than zero"));
    }
    Ok(Trigger::Interval(duration))
}

fn parse_byte_size(field: &str, value: &serde_yaml::Value) -> Result<u64, SpecError> {
    let bytes = match value {
        serde_yaml::Value::Number(n) => n.as_u64(),
        serde_yaml::Value::String(s) => s.parse::<bytesize::ByteSize>().ok().map(|b| b.as_u64()),
        _ => None,
    };
    match bytes {
        Some(b) if b > 0 => Ok(b),
        _ => Err(SpecError::invalid(field, "must be a size such as `512MiB`, `1GiB` or a number of bytes")),
    }
}

/// A location as a URL: `scheme://...` as written, a local path as `file://`.
pub fn parse_location(field: &str, text: &str, base_dir: Option<&Path>) -> Result<Url, SpecError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(SpecError::invalid(field, "is empty"));
    }
    if text.contains("://") {
        let url =
            Url::parse(text).map_err(|e| SpecError::invalid(field, format!("`{text}` is not a valid URL: {e}")))?;
        if !SUPPORTED_SCHEMES.contains(&url.scheme()) {
            return Err(SpecError::invalid(
                field,
                format!(
                    "unsupported scheme `{}`; allowed: a local path or {}",
                    url.scheme(),
                    SUPPORTED_SCHEMES.join(", ")
                ),
            ));
        }
        return Ok(url);
    }
    let path = Path::new(text);
    let absolute = match (path.is_absolute(), base_dir) {
        (true, _) => path.to_path_buf(),
        (false, Some(base)) => base.join(path),
        (false, None) => std::env::current_dir().map(|cwd| cwd.join(path)).unwrap_or_else(|_| path.to_path_buf()),
    };
    Url::from_directory_path(normalize(&absolute))
        .map_err(|()| SpecError::invalid(field, format!("`{text}` cannot be made an absolute path")))
}

/// Removes `.` and `..` components without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
pipeline: retail
checkpoint: ./lake/_checkpoints/retail
trigger: { interval: 30s }
flows:
  - name: invoices_bronze
    source:
      files:
        path: ./landing/invoices
        format: json
        glob: "*.json"
        schema: "InvoiceNumber STRING, CreatedTime BIGINT"
        max_files_per_batch: 10
        max_bytes_per_batch: 1GiB
    transform: SELECT * FROM source
    sink:
      table: ./lake/bronze/invoices
      partition_by: [StoreID]
      properties: { delta.appendOnly: true }
"#;

    fn error_of(yaml: &str) -> String {
        parse_pipeline(yaml, Some(Path::new("/base"))).unwrap_err().to_string()
    }

    #[test]
    fn parses_a_complete_file() {
        let spec = parse_pipeline(GOOD, Some(Path::new("/base/dir"))).unwrap();
        assert_eq!(spec.trigger, Trigger::Interval(Duration::from_secs(30)));
        assert_eq!(spec.checkpoint.as_str(), "file:///base/dir/lake/_checkpoints/retail/");
        let flow = &spec.flows[0];
        let files = flow.files_source();
        assert_eq!(files.max_bytes_per_batch, Some(1 << 30));
        assert_eq!(files.location.path(), "/base/dir/landing/invoices/");
        assert_eq!(flow.sink.properties["delta.appendOnly"], "true");
        assert_eq!(flow.app_id(&spec.name), "sluice:retail/invoices_bronze");
    }

    #[test]
    fn unknown_keys_are_named_with_the_allowed_ones() {
        let err = error_of(&GOOD.replace("glob:", "globb:"));
        assert!(err.contains("flows[0].source.files") && err.contains("unknown field `globb`"), "{err}");
        assert!(err.contains("expected one of"), "{err}");
    }

    #[test]
    fn bad_values_name_the_field() {
        let err = error_of(&GOOD.replace("format: json", "format: xml"));
        assert!(err.contains("flows[0].source.files.format") && err.contains("`json`, `csv`, `parquet`"), "{err}");
        let err = error_of(&GOOD.replace("interval: 30s", "interval: soon"));
        assert!(err.contains("trigger.interval"), "{err}");
        let err = error_of(&GOOD.replace("1GiB", "lots"));
        assert!(err.contains("max_bytes_per_batch"), "{err}");
        let err = error_of(&GOOD.replace("BIGINT", "BIGNUM"));
        assert!(err.contains("flows[0].source.files.schema") && err.contains("unknown type `BIGNUM`"), "{err}");
        let err = error_of(&GOOD.replace("./landing/invoices", "ftp://host/x"));
        assert!(err.contains("unsupported scheme `ftp`"), "{err}");
        let err = error_of(&GOOD.replace("pipeline: retail", "pipeline: re tail"));
        assert!(err.contains("pipeline: `re tail` is not a valid name"), "{err}");
        let err =
            error_of(&GOOD.replace("mode: append", "").replace("partition_by", "mode: merge\n      partition_by"));
        assert!(err.contains("unknown variant `merge`"), "{err}");
    }

    #[test]
    fn trigger_defaults_to_available_now() {
        let spec = parse_pipeline(&GOOD.replace("trigger: { interval: 30s }", ""), None).unwrap();
        assert_eq!(spec.trigger, Trigger::AvailableNow);
        let err = error_of(&GOOD.replace("{ interval: 30s }", "sometimes"));
        assert!(err.contains("available_now"), "{err}");
    }
}
