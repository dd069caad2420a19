//! Runs a flow whose source is a watermark over a folder of files
//! (`watermark: { files: {...}, column: ... }`): the classic incremental load
//! of exports that are rewritten or appended to in place, where which files
//! are new says nothing and a column that only grows says everything.
//!
//! Each round lists the whole folder, decodes the files as a `files:` source
//! would (same formats, schema, CSV options, quarantine of malformed rows),
//! keeps the rows whose column is beyond the watermark, and commits them with
//! the highest value read as the txn version: the watermark moves atomically
//! with the data, and a crash before the commit leaves it where it was. The
//! schema is the declared one, or inferred each round from the newest files.
//! Fields outside it are ignored. A round with nothing beyond the watermark
//! commits nothing.
//!
//! A file that has not changed since a committed round read it is not read
//! again: that round committed all of its rows beyond the watermark of then
//! less the lag, and the others stay at or below every later watermark less
//! the lag (the watermark only grows). A round that commits nothing (nothing
//! beyond the watermark, only late rows within the lag) records nothing, so
//! its late rows are read again by the round that moves the watermark. So a round reads the
//! new and rewritten files only. The list of files read is written to the
//! checkpoint after the round's commit, never before: a crash in between
//! costs one round reading everything again, and nothing is skipped unread.

use std::sync::Arc;
use std::time::Instant;

use arrow::datatypes::Schema;
use sluice_proto::spec::{FilesSource, SchemaEvolution, SchemaSpec, SourceSpec, WatermarkInput, WatermarkSource};
use sluice_proto::task::{TaskSpec, WatermarkRead};
use sluice_worker::formats::{infer_schema, with_hints};
use sluice_worker::metadata::with_metadata_field;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::delta_flow::{WatermarkBounds, watermark_kind};
use crate::discovery::{Ledger, list_source, sort_oldest_first};
use crate::error::CoordinatorError;
use crate::flow_runner::{BatchWork, Committed, FlowContext, commit_info};
use crate::progress::{BatchReport, FlowSummary, ProgressEvent};

pub struct WatermarkFilesRunner {
    ctx: FlowContext,
    spec: WatermarkSource,
    files: FilesSource,
}

impl WatermarkFilesRunner {
    /// `None` when the flow's source is not a watermark over files.
    pub fn new(ctx: FlowContext) -> Option<Self> {
        let SourceSpec::Watermark(spec) = &ctx.flow.source else { return None };
        let WatermarkInput::Files(files) = &spec.input else { return None };
        let (spec, files) = (spec.clone(), files.as_ref().clone());
        Some(Self { ctx, spec, files })
    }

    fn flow(&self) -> &str {
        self.ctx.flow_name()
    }

    fn source_error(&self, message: String) -> CoordinatorError {
        CoordinatorError::Source { flow: self.flow().to_string(), table: self.files.location.to_string(), message }
    }

    /// One batch a round: everything beyond the watermark.
    pub async fn run_until_caught_up(
        &mut self,
        cancel: &CancellationToken,
        summary: &mut FlowSummary,
    ) -> Result<(), CoordinatorError> {
        if !cancel.is_cancelled()
            && let Some(report) = self.run_round().await?
        {
            summary.add(&report);
            self.ctx.progress.send(ProgressEvent::BatchCommitted(report));
        }
        self.ctx.progress.send(ProgressEvent::FlowCaughtUp { flow: self.flow().to_string() });
        Ok(())
    }

    /// The schema files are decoded into: declared, or inferred from the
    /// newest files (within `schema_sample`), where a column the sink table
    /// has keeps the table's type (a stray value in one file, such as text in
    /// a number column, is then a malformed row, not a new type), and the
    /// hints have the last word.
    async fn schema(
        &self,
        files: &[sluice_proto::task::SourceFile],
        target: Option<&deltalake::DeltaTable>,
    ) -> Result<Schema, CoordinatorError> {
        let source = &self.files;
        if let SchemaSpec::Declared(schema) = &source.schema {
            return Ok(schema.as_ref().clone());
        }
        let newest: Vec<_> = files.iter().rev().cloned().collect();
        let mut schema = infer_schema(&newest, source.format, &source.csv, source.schema_sample, &self.ctx.storage)
            .await
            .map_err(|e| CoordinatorError::Worker { flow: self.flow().to_string(), source: e.into() })?;
        if let Some(table) = target {
            let table_schema = table.snapshot().map_err(|e| self.ctx.delta_error(e))?.snapshot().arrow_schema();
            let known: Vec<_> = table_schema
                .fields()
                .iter()
                .filter(|f| schema.fields().iter().any(|s| s.name() == f.name()))
                .map(|f| f.as_ref().clone())
                .collect();
            schema = with_hints(&schema, &Schema::new(known));
        }
        Ok(match &source.schema_hints {
            Some(hints) => with_hints(&schema, hints),
            None => schema,
        })
    }

    async fn run_round(&self) -> Result<Option<BatchReport>, CoordinatorError> {
        let started = Instant::now();
        let flow = self.flow().to_string();
        let listed = list_source(&flow, &self.files, &self.ctx.storage, None).await?;
        let mut read_before = Ledger::default();
        read_before.record(&self.ctx.checkpoint.watermark_files(&flow).await?.unwrap_or_default());
        let changed = read_before.compare(listed.clone());
        let mut to_read = changed.new;
        to_read.extend(changed.rewritten);
        sort_oldest_first(&mut to_read);
        if to_read.is_empty() {
            return Ok(None);
        }
        let target = self.ctx.target().await?;
        let schema = self.schema(&to_read, target.as_ref()).await?;
        if schema.fields().is_empty() {
            return Ok(None);
        }
        let column = &self.spec.column;
        let kind =
            watermark_kind(&schema, column, "the files do not have; they have").map_err(|e| self.source_error(e))?;
        let bounds = WatermarkBounds::of(&self.spec, kind).map_err(|e| self.source_error(e))?;
        let committed = self.ctx.committed(target.as_ref()).await?;
        let read = WatermarkRead { column: column.clone(), after: bounds.after(committed) };

        let source_schema = Arc::new(schema);
        let relation = with_metadata_field(&source_schema)
            .map_err(|e| CoordinatorError::Schema { flow: flow.clone(), message: e.to_string() })?;
        let (table_schema, delta_schema) = self.ctx.table_schema(&relation, &[], target.as_ref()).await?;
        let merge = self.ctx.merge_task(target.as_ref());
        let batch = committed.unwrap_or(0);
        let now_us = chrono::Utc::now().timestamp_micros();
        let tasks: Vec<TaskSpec> = self
            .ctx
            .file_tasks(batch, &to_read, &self.files, &source_schema, &table_schema, merge, now_us)
            .into_iter()
            .map(|task| TaskSpec { watermark: Some(read.clone()), schema_evolution: SchemaEvolution::None, ..task })
            .collect();
        let (files, bytes) = (to_read.len() as u64, to_read.iter().map(|f| f.size).sum::<u64>());
        self.ctx.progress.send(ProgressEvent::BatchStarted {
            flow: flow.clone(),
            batch,
            files,
            bytes,
            tasks: tasks.len(),
            resumed: false,
            source_versions: None,
        });
        info!(flow, files, after = read.after, tasks = tasks.len(), "watermark round started");
        let mut info = commit_info(&self.ctx.pipeline, &flow, batch, files, bytes);
        info.insert("sluice.source".to_string(), self.files.location.to_string().into());
        info.insert("sluice.watermark.column".to_string(), read.column.clone().into());
        info.insert("sluice.watermark.after".to_string(), read.after.into());
        let work = BatchWork { batch, tasks, delta_schema, follows: Some(committed), info };
        let Committed { version, rows, merge, batch, quality } = self.ctx.execute_and_commit(work, None).await?;
        let Some(batch) = batch else {
            // Rows within the lag below the watermark wait for a round that
            // moves it: these files are read again until one does.
            info!(flow, "nothing beyond the watermark; nothing committed");
            return Ok(None);
        };
        // Committed: every row of these files beyond the last watermark less the lag is in.
        self.ctx.checkpoint.record_watermark_files(&flow, &listed).await?;
        let seconds = started.elapsed().as_secs_f64();
        info!(flow, batch, rows, version, seconds, "batch committed");
        Ok(Some(BatchReport {
            flow,
            batch,
            files,
            rows,
            bytes,
            seconds,
            version,
            source_versions: None,
            merge,
            quality: (!quality.is_empty()).then_some(quality),
        }))
    }
}
