//! Expectations: named SQL checks on a flow's output rows, as in Delta Live
//! Tables. A row fails an expectation when its predicate is false; NULL passes,
//! as in a SQL CHECK constraint (write `x IS NOT NULL` to require a value).
//!
//! Each batch of output is checked as it streams to the writer: `warn` keeps
//! and counts the row, `drop` leaves it out, `quarantine` moves it to the
//! quarantine table with the names of the expectations it failed, and `fail`
//! stops the task with the expectation's name and a sample of failing rows.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use arrow::array::{Array, AsArray, BooleanArray, RecordBatch, StructArray};
use arrow::compute::kernels::boolean::{not, or};
use arrow::compute::{filter_record_batch, prep_null_mask_filter};
use arrow::datatypes::SchemaRef;
use datafusion::common::DFSchema;
use datafusion::error::DataFusionError;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::StreamExt;
use sluice_proto::spec::{Expectation, OnViolation};
use sluice_proto::task::ExpectationCount;

use crate::metadata::METADATA_COLUMN;
use crate::quarantine::{Collector, Entry, KIND_EXPECTATION, collect, rows_as_json};
use crate::transform::session_context;

/// Failing rows shown in the error of a `fail` expectation.
const FAIL_SAMPLE_ROWS: usize = 3;

struct Check {
    spec: Expectation,
    predicate: Arc<dyn PhysicalExpr>,
}

/// A flow's expectations, compiled against its output schema.
pub struct Expectations {
    checks: Vec<Check>,
}

/// Counts per expectation, and the message of a `fail` expectation that tripped.
#[derive(Default)]
pub struct Outcome {
    pub counts: BTreeMap<String, ExpectationCount>,
    pub failed: Option<String>,
}

impl Expectations {
    /// Compiles each expectation's predicate; the error names the expectation.
    pub fn compile(specs: &[Expectation], schema: &SchemaRef) -> Result<Self, String> {
        let ctx = session_context();
        let df_schema = DFSchema::try_from(schema.as_ref().clone()).map_err(|e| e.to_string())?;
        let mut checks = Vec::with_capacity(specs.len());
        for spec in specs {
            let problem = |e: DataFusionError| format!("expectation `{}` (`{}`): {e}", spec.name, spec.expr);
            let expr = ctx.parse_sql_expr(&spec.expr, &df_schema).map_err(problem)?;
            let predicate = ctx.create_physical_expr(expr, &df_schema).map_err(problem)?;
            let data_type = predicate.data_type(schema).map_err(problem)?;
            if data_type != arrow::datatypes::DataType::Boolean {
                return Err(format!(
                    "expectation `{}` (`{}`) is {data_type}, not a condition (true or false)",
                    spec.name, spec.expr
                ));
            }
            checks.push(Check { spec: spec.clone(), predicate });
        }
        Ok(Self { checks })
    }

    pub fn is_empty(&self) -> bool {
        self.checks.is_empty()
    }

    /// Checks every batch of `stream`, passing on the rows to keep.
    pub fn apply(
        self,
        stream: SendableRecordBatchStream,
        quarantine: Collector,
        outcome: Arc<Mutex<Outcome>>,
    ) -> SendableRecordBatchStream {
        let schema = stream.schema();
        let checked = stream.map(move |batch| {
            let batch = batch?;
            let mut outcome = outcome.lock().unwrap_or_else(|e| e.into_inner());
            match self.check(&batch, &quarantine, &mut outcome) {
                Ok(kept) => Ok(kept),
                Err(message) => {
                    outcome.failed.get_or_insert(message.clone());
                    Err(DataFusionError::Execution(message))
                }
            }
        });
        Box::pin(RecordBatchStreamAdapter::new(schema, checked))
    }

    fn check(&self, batch: &RecordBatch, quarantine: &Collector, outcome: &mut Outcome) -> Result<RecordBatch, String> {
        let rows = batch.num_rows();
        let mut failed_any: Vec<(usize, BooleanArray)> = Vec::new();
        let mut drop: Option<BooleanArray> = None;
        let mut moved: Option<BooleanArray> = None;
        for (index, check) in self.checks.iter().enumerate() {
            let name = &check.spec.name;
            let result = check
                .predicate
                .evaluate(batch)
                .and_then(|value| value.into_array(rows))
                .map_err(|e| format!("expectation `{name}` could not be evaluated: {e}"))?;
            let result = result.as_any().downcast_ref::<BooleanArray>().ok_or("a predicate is not boolean")?;
            // Failed: false, not NULL.
            let failed = not(result).map_err(|e| e.to_string())?;
            let failed = if failed.nulls().is_some() { prep_null_mask_filter(&failed) } else { failed };
            let count = failed.true_count() as u64;
            let entry = outcome
                .counts
                .entry(name.clone())
                .or_insert_with(|| ExpectationCount { action: check.spec.on_violation.name().to_string(), failed: 0 });
            entry.failed += count;
            if count == 0 {
                continue;
            }
            let merge = |into: &mut Option<BooleanArray>| -> Result<(), String> {
                *into = Some(match into.take() {
                    None => failed.clone(),
                    Some(previous) => or(&previous, &failed).map_err(|e| e.to_string())?,
                });
                Ok(())
            };
            match check.spec.on_violation {
                OnViolation::Warn => {}
                OnViolation::Drop => merge(&mut drop)?,
                OnViolation::Quarantine => merge(&mut moved)?,
                OnViolation::Fail => return Err(fail_message(&check.spec, batch, &failed, count)),
            }
            failed_any.push((index, failed));
        }
        if let Some(moved) = &moved {
            let rows = filter_record_batch(batch, moved).map_err(|e| e.to_string())?;
            let failed_here: Vec<(usize, BooleanArray)> = failed_any
                .iter()
                .map(|(index, failed)| {
                    let kept = arrow::compute::filter(failed, moved).map_err(|e| e.to_string())?;
                    Ok((*index, kept.as_boolean().clone()))
                })
                .collect::<Result<_, String>>()?;
            let entries = self.entries(&rows, &failed_here)?;
            collect(quarantine, entries);
        }
        let removed = match (drop, moved) {
            (None, None) => return Ok(batch.clone()),
            (Some(a), None) | (None, Some(a)) => a,
            (Some(a), Some(b)) => or(&a, &b).map_err(|e| e.to_string())?,
        };
        filter_record_batch(batch, &not(&removed).map_err(|e| e.to_string())?).map_err(|e| e.to_string())
    }

    /// Quarantine entries for `rows`, the rows that failed a `quarantine`
    /// expectation; `failed` says which expectations each of them failed.
    fn entries(&self, rows: &RecordBatch, failed: &[(usize, BooleanArray)]) -> Result<Vec<Entry>, String> {
        let lines = rows_as_json(rows).map_err(|e| e.to_string())?;
        let paths = file_paths(rows);
        Ok((0..rows.num_rows())
            .map(|row| {
                let names: Vec<String> = failed
                    .iter()
                    .filter(|(_, failed)| failed.value(row))
                    .map(|(index, _)| self.checks[*index].spec.name.clone())
                    .collect();
                Entry {
                    kind: KIND_EXPECTATION,
                    file: paths[row].clone(),
                    line: None,
                    raw: lines.get(row).cloned(),
                    error: format!("failed expectation(s): {}", names.join(", ")),
                    expectations: names,
                }
            })
            .collect())
    }
}

/// The error of a `fail` expectation: its name, predicate, count and a few rows.
fn fail_message(spec: &Expectation, batch: &RecordBatch, failed: &BooleanArray, count: u64) -> String {
    let sample = filter_record_batch(batch, failed)
        .map(|rows| rows.slice(0, rows.num_rows().min(FAIL_SAMPLE_ROWS)))
        .ok()
        .and_then(|rows| rows_as_json(&rows).ok())
        .map(|lines| {
            lines.into_iter().map(|l| String::from_utf8_lossy(&l).into_owned()).collect::<Vec<_>>().join("\n  ")
        })
        .unwrap_or_default();
    format!(
        "expectation `{}` (`{}`) failed on {count} row(s) of this batch, and it is set to `fail`; nothing was committed. Failing rows:\n  {sample}",
        spec.name, spec.expr
    )
}

/// The `_metadata.file_path` of each row, when the output kept `_metadata`.
fn file_paths(batch: &RecordBatch) -> Vec<Option<String>> {
    let paths = batch
        .column_by_name(METADATA_COLUMN)
        .and_then(|c| c.as_any().downcast_ref::<StructArray>())
        .and_then(|s| s.column_by_name("file_path"))
        .and_then(|c| c.as_any().downcast_ref::<arrow::array::StringArray>().cloned());
    (0..batch.num_rows()).map(|i| paths.as_ref().filter(|p| !p.is_null(i)).map(|p| p.value(i).to_string())).collect()
}
