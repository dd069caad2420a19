//! The flow's transform: DataFusion SQL over the relation `source`.
//!
//! Identifiers are case-sensitive as written (`SELECT InvoiceNumber` means the
//! column `InvoiceNumber`), and only queries are accepted: statements that
//! create, insert, copy or set anything are rejected.

use std::fmt;
use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use arrow::datatypes::{Schema, SchemaRef};
use datafusion::catalog::streaming::StreamingTable;
use datafusion::datasource::empty::EmptyTable;
use datafusion::error::DataFusionError;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext};
use tokio::sync::mpsc;

use crate::error::WorkerError;

pub const SOURCE_RELATION: &str = "source";
pub const DEFAULT_TRANSFORM: &str = "SELECT * FROM source";

pub fn session_context() -> SessionContext {
    let mut config = SessionConfig::new().with_target_partitions(1);
    config.options_mut().sql_parser.enable_ident_normalization = false;
    SessionContext::new_with_config(config)
}

/// Queries only: no DDL, no DML, no `SET` or other statements.
pub fn sql_options() -> SQLOptions {
    SQLOptions::new().with_allow_ddl(false).with_allow_dml(false).with_allow_statements(false)
}

fn transform_error(error: DataFusionError) -> WorkerError {
    WorkerError::Transform(error.to_string())
}

/// Plans the transform over an empty `source` and returns its output schema,
/// which also checks the SQL before any data is read.
pub async fn output_schema(source: SchemaRef, transform: Option<&str>) -> Result<Schema, WorkerError> {
    let ctx = session_context();
    ctx.register_table(SOURCE_RELATION, Arc::new(EmptyTable::new(source))).map_err(transform_error)?;
    let frame =
        ctx.sql_with_options(transform.unwrap_or(DEFAULT_TRANSFORM), sql_options()).await.map_err(transform_error)?;
    Ok(frame.schema().as_arrow().clone())
}

/// Runs the transform over the batches arriving on `input`.
pub async fn execute(
    source: SchemaRef,
    input: mpsc::Receiver<Result<RecordBatch, DataFusionError>>,
    transform: Option<&str>,
) -> Result<SendableRecordBatchStream, WorkerError> {
    let ctx = session_context();
    let partition = Arc::new(OneShotPartition { schema: source.clone(), input: Mutex::new(Some(input)) });
    let table = StreamingTable::try_new(source, vec![partition]).map_err(transform_error)?;
    ctx.register_table(SOURCE_RELATION, Arc::new(table)).map_err(transform_error)?;
    let frame =
        ctx.sql_with_options(transform.unwrap_or(DEFAULT_TRANSFORM), sql_options()).await.map_err(transform_error)?;
    frame.execute_stream().await.map_err(transform_error)
}

/// A partition whose batches come from a channel; it can be executed once.
struct OneShotPartition {
    schema: SchemaRef,
    input: Mutex<Option<mpsc::Receiver<Result<RecordBatch, DataFusionError>>>>,
}

impl fmt::Debug for OneShotPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OneShotPartition").finish_non_exhaustive()
    }
}

impl PartitionStream for OneShotPartition {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let input = self.input.lock().unwrap_or_else(|p| p.into_inner()).take();
        let stream = futures::stream::unfold(input, |input| async move {
            let mut receiver = match input {
                Some(receiver) => receiver,
                None => {
                    let error = DataFusionError::Internal("the source of a task can be read only once".to_string());
                    return Some((Err(error), None));
                }
            };
            let next = receiver.recv().await?;
            Some((next, Some(receiver)))
        });
        Box::pin(RecordBatchStreamAdapter::new(self.schema.clone(), stream))
    }
}
