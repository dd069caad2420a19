//! Runs a flow whose source is a Delta table: its change data feed
//! (`delta_changes`) or its snapshot (`delta`).
//!
//! Such a flow keeps no state of its own. Its progress is the txn version in
//! the target table, which is the last source version consumed: a batch of
//! versions `start..=end` is committed with txn version `end`, atomically with
//! its data, so the position can never drift from the table. A batch is
//! committed only if the txn still holds the version it follows, so two runs
//! racing on the same flow cannot both consume a range.

use std::sync::atomic::Ordering;
use std::time::Instant;

use arrow::datatypes::Schema;
use deltalake::DeltaTable;
use sluice_proto::spec::{DeltaChangesSource, SinkMode, SourceSpec, TableRef, WatermarkSource, WatermarkValue};
use sluice_proto::task::{DeltaRead, DeltaReadKind, TaskSpec, WatermarkRead};
use sluice_worker::delta_source::{explain, file_bounds, relation_schema};
use sluice_worker::watermark::WatermarkKind;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::commit::load_table;
use crate::error::CoordinatorError;
use crate::flow_runner::{BatchWork, Committed, FlowContext, commit_info};
use crate::progress::{BatchReport, FlowSummary, ProgressEvent};

/// Up to this many versions in a batch, the ranges its tasks read are
/// balanced by each commit's bytes (one log entry read per version); above,
/// by the number of versions.
const MAX_WEIGHED_VERSIONS: u64 = 1000;

pub struct DeltaFlowRunner {
    ctx: FlowContext,
    /// The source table (`ctx.flow.source`'s).
    table: TableRef,
}

/// One batch: what to read and the txn version it ends at (for a watermark
/// source, the txn version is the highest value read, known after reading).
struct Planned {
    kind: DeltaReadKind,
    batch: u64,
    watermark: Option<WatermarkRead>,
}

impl DeltaFlowRunner {
    /// `None` when the flow's source is not a Delta table.
    pub fn new(ctx: FlowContext) -> Option<Self> {
        let table = ctx.flow.source.table()?.clone();
        Some(Self { ctx, table })
    }

    fn flow(&self) -> &str {
        self.ctx.flow_name()
    }

    fn source_error(&self, message: String) -> CoordinatorError {
        CoordinatorError::Source { flow: self.flow().to_string(), table: self.table.url.to_string(), message }
    }

    pub async fn run_until_caught_up(
        &mut self,
        cancel: &CancellationToken,
        summary: &mut FlowSummary,
    ) -> Result<(), CoordinatorError> {
        while !cancel.is_cancelled() {
            let Some(source) = self.open_source().await? else { break };
            let target = self.ctx.target().await?;
            let committed = self.ctx.committed(target.as_ref()).await?;
            let Some(planned) = self.plan(&source, committed).await? else { break };
            let watermark = planned.watermark.is_some();
            if let Some(report) = self.run_batch(&source, target.as_ref(), committed, &planned).await? {
                summary.add(&report);
                self.ctx.progress.send(ProgressEvent::BatchCommitted(report));
            }
            // A watermark batch reads everything beyond the watermark: one per round.
            if watermark {
                break;
            }
        }
        self.ctx.progress.send(ProgressEvent::FlowCaughtUp { flow: self.flow().to_string() });
        Ok(())
    }

    /// The source table, or `None` when it is another flow's sink that does not exist yet.
    async fn open_source(&self) -> Result<Option<DeltaTable>, CoordinatorError> {
        let table = &self.table;
        let loaded = load_table(&table.url, &self.ctx.storage).await.map_err(|e| self.source_error(e.to_string()))?;
        match (loaded, &table.upstream) {
            (Some(source), _) => Ok(Some(source)),
            (None, Some(upstream)) => {
                info!(flow = self.flow(), upstream, "the upstream flow has not written its table yet; nothing to read");
                Ok(None)
            }
            (None, None) => Err(self.source_error("there is no Delta table here".to_string())),
        }
    }

    /// The next batch, or `None` when the flow is caught up.
    async fn plan(&self, source: &DeltaTable, committed: Option<u64>) -> Result<Option<Planned>, CoordinatorError> {
        let latest = source.version().unwrap_or(0);
        match &self.ctx.flow.source {
            // `new` gives files flows no Delta runner.
            SourceSpec::Files(_) => Ok(None),
            SourceSpec::Delta(spec) => {
                let version = spec.version.unwrap_or(latest);
                if version > latest {
                    return Err(self.source_error(format!(
                        "`version: {version}` does not exist yet; the table's latest version is {latest}"
                    )));
                }
                if committed.is_some_and(|c| c >= version) {
                    return Ok(None);
                }
                Ok(Some(Planned { kind: DeltaReadKind::Snapshot { version }, batch: version, watermark: None }))
            }
            SourceSpec::DeltaChanges(spec) => {
                let start = match committed {
                    Some(last) => last + 1,
                    None => self.first_version(source, spec, latest).await?,
                };
                // The versions not consumed yet, for the backlog metric.
                let labels = [("pipeline", self.ctx.pipeline.clone()), ("flow", self.flow().to_string())];
                let backlog = (latest + 1).saturating_sub(start);
                metrics::gauge!(sluice_worker::telemetry::BACKLOG_VERSIONS, &labels).set(backlog as f64);
                if start > latest {
                    return Ok(None);
                }
                self.check_change_feed(source, start).await?;
                let most = spec.max_versions_per_batch.unwrap_or(u64::MAX);
                let end = latest.min(start.saturating_add(most - 1));
                Ok(Some(Planned { kind: DeltaReadKind::Changes { start, end }, batch: end, watermark: None }))
            }
            SourceSpec::Watermark(spec) => {
                let kind = self.watermark_kind(source, &spec.column)?;
                let bounds = WatermarkBounds::of(spec, kind).map_err(|e| self.source_error(e))?;
                let watermark = committed.and_then(|c| i64::try_from(c).ok());
                if let Some(base) = watermark.or(bounds.initial)
                    && !self.may_hold_beyond(source, &spec.column, kind, base).await?
                {
                    return Ok(None);
                }
                let read = WatermarkRead { column: spec.column.clone(), after: bounds.after(committed) };
                let kind = DeltaReadKind::Snapshot { version: latest };
                Ok(Some(Planned { kind, batch: committed.unwrap_or(0), watermark: Some(read) }))
            }
        }
    }

    /// How the watermark column's values compare; an error names the column's problem.
    fn watermark_kind(&self, source: &DeltaTable, column: &str) -> Result<WatermarkKind, CoordinatorError> {
        let schema = source.snapshot().map_err(|e| self.source_error(e.to_string()))?.snapshot().arrow_schema();
        watermark_kind(&schema, column, "the table does not have; it has").map_err(|e| self.source_error(e))
    }

    /// Whether any data file's statistics allow a value of `column` above
    /// `base`; a file without statistics may hold one.
    async fn may_hold_beyond(
        &self,
        source: &DeltaTable,
        column: &str,
        kind: WatermarkKind,
        base: i64,
    ) -> Result<bool, CoordinatorError> {
        let files = file_bounds(source, column).await.map_err(|e| self.source_error(e.to_string()))?;
        Ok(files.iter().any(|file| match stats_upper_bound(file.max.as_ref(), kind) {
            Some(max) => max > base,
            None => true,
        }))
    }

    /// Where a flow that has consumed nothing yet starts reading.
    async fn first_version(
        &self,
        source: &DeltaTable,
        spec: &DeltaChangesSource,
        latest: u64,
    ) -> Result<u64, CoordinatorError> {
        if let Some(version) = spec.starting_version {
            return Ok(version);
        }
        let Some(since) = spec.starting_timestamp_ms else { return Ok(0) };
        for version in 0..=latest {
            let Some(bytes) =
                source.log_store().read_commit_entry(version).await.map_err(|e| self.source_error(e.to_string()))?
            else {
                continue;
            };
            let committed_at = String::from_utf8_lossy(&bytes).lines().find_map(|line| {
                let action: serde_json::Value = serde_json::from_str(line).ok()?;
                let info = action.get("commitInfo")?;
                info.get("inCommitTimestamp").or_else(|| info.get("timestamp"))?.as_i64()
            });
            if committed_at.is_some_and(|t| t >= since) {
                return Ok(version);
            }
        }
        Ok(latest + 1)
    }

    /// What reading each version of `start..=end` costs ([`change_bytes`]),
    /// from the commits' log entries (read 16 at a time).
    async fn change_sizes(&self, source: &DeltaTable, start: u64, end: u64) -> Result<Vec<u64>, CoordinatorError> {
        use futures::{StreamExt, TryStreamExt};
        let log_store = source.log_store();
        let entries: Vec<_> = futures::stream::iter(start..=end)
            .map(|version| {
                let log_store = log_store.clone();
                async move { log_store.read_commit_entry(version).await }
            })
            .buffered(16)
            .try_collect()
            .await
            .map_err(|e| self.source_error(e.to_string()))?;
        Ok(entries.iter().map(|entry| entry.as_deref().map_or(0, change_bytes)).collect())
    }

    /// Fails with what to do when the feed cannot be read from `start`.
    async fn check_change_feed(&self, source: &DeltaTable, start: u64) -> Result<(), CoordinatorError> {
        let snapshot = source.snapshot().map_err(|e| self.source_error(e.to_string()))?;
        let enabled = snapshot
            .metadata()
            .configuration()
            .get("delta.enableChangeDataFeed")
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        if !enabled {
            return Err(self.source_error(
                "the change data feed is not enabled on this table: set the table property \
                 `delta.enableChangeDataFeed = true` (changes committed from then on can be read), \
                 or read the table whole with a `delta:` source"
                    .to_string(),
            ));
        }
        let entry = source.log_store().read_commit_entry(start).await.map_err(|e| self.source_error(e.to_string()))?;
        if entry.is_none() {
            return Err(self.source_error(explain(deltalake::DeltaTableError::InvalidVersion(start))));
        }
        Ok(())
    }

    /// The batch's report; `None` when a watermark batch found nothing beyond the watermark.
    async fn run_batch(
        &self,
        source: &DeltaTable,
        target: Option<&DeltaTable>,
        committed: Option<u64>,
        planned: &Planned,
    ) -> Result<Option<BatchReport>, CoordinatorError> {
        let started = Instant::now();
        let flow = self.flow().to_string();
        let source_schema = source.snapshot().map_err(|e| self.source_error(e.to_string()))?.snapshot().arrow_schema();
        let relation = relation_schema(&source_schema, planned.kind);
        let tables = self.ctx.pin_tables().await?;
        let (table_schema, delta_schema) = self.ctx.table_schema(&relation, &tables, target).await?;
        let ballista = self.ctx.query_engine(&relation, &tables).await?;
        let engine = if ballista.is_some() { "ballista" } else { "local" };
        let merge = self.ctx.merge_task(target);
        // A merge needs all of a key's changes, an overwrite and a snapshot read the whole input: one task.
        let ranges = match planned.kind {
            DeltaReadKind::Changes { start, end } if merge.is_none() && self.ctx.flow.sink.mode == SinkMode::Append => {
                let parts = self.ctx.parallelism.load(Ordering::Relaxed);
                if parts > 1 && end > start {
                    // Weighing each version reads its log entry; a very long range is cut by count.
                    let sizes = if end - start < MAX_WEIGHED_VERSIONS {
                        self.change_sizes(source, start, end).await?
                    } else {
                        vec![1; (end - start + 1) as usize]
                    };
                    split_versions(start, &sizes, parts)
                } else {
                    vec![planned.kind]
                }
            }
            kind => vec![kind],
        };
        let tasks: Vec<TaskSpec> = ranges
            .into_iter()
            .enumerate()
            .map(|(index, kind)| TaskSpec {
                delta_read: Some(DeltaRead { table_url: self.table.url.to_string(), kind }),
                watermark: planned.watermark.clone(),
                tables: tables.iter().map(|t| t.named.clone()).collect(),
                ballista: ballista.clone(),
                ..self.ctx.task(planned.batch, index, &relation, &table_schema, &merge)
            })
            .collect();
        let (first, last) = match planned.kind {
            DeltaReadKind::Changes { start, end } => (start, end),
            DeltaReadKind::Snapshot { version } => (version, version),
        };
        self.ctx.progress.send(ProgressEvent::BatchStarted {
            flow: flow.clone(),
            batch: planned.batch,
            files: 0,
            bytes: 0,
            tasks: tasks.len(),
            resumed: false,
            source_versions: Some((first, last)),
        });
        info!(flow, batch = planned.batch, first, last, tasks = tasks.len(), engine, "batch started");
        let mut info = commit_info(&self.ctx.pipeline, &flow, planned.batch, 0, 0);
        info.insert("sluice.source".to_string(), self.table.url.to_string().into());
        info.insert("sluice.source.first_version".to_string(), first.into());
        info.insert("sluice.source.last_version".to_string(), last.into());
        info.insert("sluice.engine".to_string(), engine.into());
        for table in &tables {
            info.insert(format!("sluice.tables.{}.version", table.named.name), table.named.version.into());
        }
        if let Some(read) = &planned.watermark {
            info.insert("sluice.watermark.column".to_string(), read.column.clone().into());
            info.insert("sluice.watermark.after".to_string(), read.after.into());
        }
        let work = BatchWork { batch: planned.batch, tasks, delta_schema, follows: Some(committed), info };
        let Committed { version, rows, merge, batch, quality } = self.ctx.execute_and_commit(work, None).await?;
        let Some(batch) = batch else {
            info!(flow, "nothing beyond the watermark; nothing committed");
            return Ok(None);
        };
        let seconds = started.elapsed().as_secs_f64();
        info!(flow, batch, rows, version, seconds, "batch committed");
        Ok(Some(BatchReport {
            flow,
            batch,
            files: 0,
            rows,
            bytes: 0,
            seconds,
            version,
            source_versions: Some((first, last)),
            merge,
            quality: (!quality.is_empty()).then_some(quality),
        }))
    }
}

/// How `column` of `schema` compares as a watermark; the error names what is
/// wrong (`missing` says whose columns they are, e.g. "the files do not have; they have").
pub(crate) fn watermark_kind(schema: &Schema, column: &str, missing: &str) -> Result<WatermarkKind, String> {
    let field = schema.field_with_name(column).map_err(|_| {
        let columns: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        format!("`watermark.column` names `{column}`, which {missing}: {}", columns.join(", "))
    })?;
    WatermarkKind::of(field.data_type()).ok_or_else(|| {
        format!("column `{column}` is {}: a watermark follows an integer, timestamp or date column", field.data_type())
    })
}

/// A watermark source's `initial_value` and `lag` as numbers of its column's kind.
pub(crate) struct WatermarkBounds {
    pub initial: Option<i64>,
    pub lag: i64,
}

impl WatermarkBounds {
    /// An error says which setting does not fit the column, and what to write.
    pub fn of(spec: &WatermarkSource, kind: WatermarkKind) -> Result<Self, String> {
        let value = |name: &str, value: Option<WatermarkValue>| match (kind, value) {
            (_, None) => Ok(None),
            (WatermarkKind::Number, Some(WatermarkValue::Number(n)))
            | (WatermarkKind::Time, Some(WatermarkValue::Micros(n))) => Ok(Some(n)),
            (kind, Some(_)) => {
                let (is, write) = match (kind, name) {
                    (WatermarkKind::Number, _) => ("a number", "a number"),
                    (WatermarkKind::Time, "lag") => ("a time", "a duration such as `10m`"),
                    (WatermarkKind::Time, _) => ("a time", "a timestamp such as `2026-01-31T00:00:00Z`"),
                };
                Err(format!("`watermark.{name}` does not fit column `{}`, which is {is}: write {write}", spec.column))
            }
        };
        Ok(Self { initial: value("initial_value", spec.initial_value)?, lag: value("lag", spec.lag)?.unwrap_or(0) })
    }

    /// Where the next read starts, after the flow's last committed watermark:
    /// the lag re-reads below it, never below `initial_value` (`None` orders
    /// below every `Some`).
    pub fn after(&self, committed: Option<u64>) -> Option<i64> {
        let watermark = committed.and_then(|c| i64::try_from(c).ok());
        watermark.map(|w| w.saturating_sub(self.lag)).max(self.initial)
    }
}

/// The largest value a file's statistic allows, as a watermark number. Delta
/// keeps timestamps to the millisecond, so a time's bound is rounded up.
fn stats_upper_bound(max: Option<&serde_json::Value>, kind: WatermarkKind) -> Option<i64> {
    let max = max?;
    match kind {
        WatermarkKind::Number => max.as_i64(),
        WatermarkKind::Time => {
            let text = max.as_str()?;
            if let Ok(time) = chrono::DateTime::parse_from_rfc3339(text) {
                return Some(time.timestamp_micros() + 999);
            }
            let date = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()?;
            Some(date.and_hms_opt(23, 59, 59)?.and_utc().timestamp_micros() + 999_999)
        }
    }
}

/// The bytes that reading one commit's changes means: its change data files
/// when it has some (a reader reads only those), else its added and removed
/// data files.
fn change_bytes(commit: &[u8]) -> u64 {
    let (mut cdc, mut data) = (0u64, 0u64);
    for line in String::from_utf8_lossy(commit).lines() {
        let Ok(action) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let size = |kind: &str| action.get(kind).and_then(|a| a.get("size")).and_then(|s| s.as_u64());
        cdc += size("cdc").unwrap_or(0);
        data += size("add").unwrap_or(0) + size("remove").unwrap_or(0);
    }
    if cdc > 0 { cdc } else { data }
}

/// Splits versions `start..` (one entry of `sizes` per version) into at most
/// `parts` contiguous ranges of about equal bytes, each of at least one version.
fn split_versions(start: u64, sizes: &[u64], parts: usize) -> Vec<DeltaReadKind> {
    let count = sizes.len();
    let parts = parts.clamp(1, count.max(1));
    // An empty commit still costs a little (its log entry, a task's overhead).
    let weights: Vec<u64> = sizes.iter().map(|&s| s.max(1)).collect();
    let total: u64 = weights.iter().sum();
    let mut ranges = Vec::with_capacity(parts);
    let (mut begin, mut sum) = (0usize, 0u64);
    for (index, weight) in weights.iter().enumerate() {
        sum += weight;
        let closed = ranges.len();
        let parts_after = parts - closed - 1;
        let versions_after = count - index - 1;
        let boundary = (total as u128 * (closed as u128 + 1) / parts as u128) as u64;
        if parts_after > 0 && (sum >= boundary || versions_after == parts_after) {
            ranges.push(DeltaReadKind::Changes { start: start + begin as u64, end: start + index as u64 });
            begin = index + 1;
        }
    }
    if begin < count {
        ranges.push(DeltaReadKind::Changes { start: start + begin as u64, end: start + count as u64 - 1 });
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changes(ranges: &[(u64, u64)]) -> Vec<DeltaReadKind> {
        ranges.iter().map(|&(start, end)| DeltaReadKind::Changes { start, end }).collect()
    }

    #[test]
    fn version_ranges_are_balanced_by_bytes_and_cover_the_batch_once() {
        // Equal commits: equal ranges.
        assert_eq!(split_versions(3, &[10; 9], 3), changes(&[(3, 5), (6, 8), (9, 11)]));
        // One big commit gets a task of its own; the small ones share.
        assert_eq!(split_versions(0, &[100, 1, 1, 1, 100, 1], 2), changes(&[(0, 2), (3, 5)]));
        assert_eq!(split_versions(0, &[1, 1, 1, 1, 1000], 2), changes(&[(0, 3), (4, 4)]));
        // More parts than versions, and empty commits.
        assert_eq!(split_versions(5, &[0], 4), changes(&[(5, 5)]));
        assert_eq!(split_versions(0, &[0, 0, 0], 8), changes(&[(0, 0), (1, 1), (2, 2)]));
        for parts in 1..6 {
            let sizes = [5, 900, 3, 3, 40, 0, 700, 1];
            let ranges = split_versions(10, &sizes, parts);
            assert!(ranges.len() <= parts);
            let mut next = 10;
            for range in ranges {
                let DeltaReadKind::Changes { start, end } = range else { panic!("a change range") };
                assert!(start == next && end >= start, "{parts} parts: {start}..={end} after {next}");
                next = end + 1;
            }
            assert_eq!(next, 18, "{parts} parts cover every version");
        }
    }

    #[test]
    fn change_bytes_prefer_change_data_files() {
        let data = br#"{"add":{"path":"a","size":100}}
{"remove":{"path":"b","size":40}}"#;
        assert_eq!(change_bytes(data), 140);
        let with_cdc = br#"{"add":{"path":"a","size":100}}
{"cdc":{"path":"c","size":7}}
{"commitInfo":{}}"#;
        assert_eq!(change_bytes(with_cdc), 7);
    }
}
