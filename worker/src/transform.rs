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

/// How every transform's SQL is read: identifiers are case-sensitive as written.
pub fn session_config(target_partitions: usize) -> SessionConfig {
    let mut config = SessionConfig::new().with_target_partitions(target_partitions);
    config.options_mut().sql_parser.enable_ident_normalization = false;
    config
}

pub fn session_context() -> SessionContext {
    SessionContext::new_with_config(session_config(1))
}

/// Queries only: no DDL, no DML, no `SET` or other statements.
pub fn sql_options() -> SQLOptions {
    SQLOptions::new().with_allow_ddl(false).with_allow_dml(false).with_allow_statements(false)
}

/// Checks, without any schema, that `sql` is one query (`SELECT`, `WITH`,
/// `VALUES`, set operations): statements that create, drop, insert, copy,
/// write files or set options are refused with what was found. This runs when
/// a pipeline is submitted or started; execution refuses them again
/// ([`sql_options`]).
pub fn check_query(sql: &str) -> Result<(), String> {
    use datafusion::sql::parser::{DFParser, Statement};
    use datafusion::sql::sqlparser::ast::Statement as Sql;
    let statements = DFParser::parse_sql(sql).map_err(|e| format!("is not valid SQL: {e}"))?;
    let refuse = |what: &str| {
        Err(format!(
            "must be a single query (SELECT ... FROM source); {what} is not allowed: a transform reads, it never creates, changes or writes anything"
        ))
    };
    match statements.len() {
        0 => return Err("is empty".to_string()),
        1 => {}
        n => return refuse(&format!("a script of {n} statements")),
    }
    match &statements[0] {
        Statement::Statement(statement) => match statement.as_ref() {
            Sql::Query(_) => Ok(()),
            other => {
                let text = other.to_string();
                let words: Vec<&str> = text.split_whitespace().take(2).collect();
                refuse(&format!("`{}`", words.join(" ")))
            }
        },
        Statement::CopyTo(_) => refuse("`COPY ... TO`"),
        Statement::CreateExternalTable(_) => refuse("`CREATE EXTERNAL TABLE`"),
        Statement::Explain(_) => refuse("`EXPLAIN`"),
        Statement::Reset(_) => refuse("`RESET`"),
    }
}

fn transform_error(error: DataFusionError) -> WorkerError {
    WorkerError::Transform(error.to_string())
}

/// The transform's logical plan over empty relations of the given schemas.
async fn plan_over_empty(
    source: SchemaRef,
    tables: &[(String, SchemaRef)],
    transform: Option<&str>,
) -> Result<datafusion::dataframe::DataFrame, WorkerError> {
    let ctx = session_context();
    ctx.register_table(SOURCE_RELATION, Arc::new(EmptyTable::new(source))).map_err(transform_error)?;
    for (name, schema) in tables {
        ctx.register_table(name.as_str(), Arc::new(EmptyTable::new(schema.clone()))).map_err(transform_error)?;
    }
    ctx.sql_with_options(transform.unwrap_or(DEFAULT_TRANSFORM), sql_options()).await.map_err(transform_error)
}

/// Plans the transform over an empty `source` (and empty `tables`, by name)
/// and returns its output schema, which also checks the SQL before any data is read.
pub async fn output_schema(
    source: SchemaRef,
    tables: &[(String, SchemaRef)],
    transform: Option<&str>,
) -> Result<Schema, WorkerError> {
    let frame = plan_over_empty(source, tables, transform).await?;
    Ok(frame.schema().as_arrow().clone())
}

/// Whether the transform needs rows of different parts of its input
/// together: an aggregation, a join, a window, a distinct or a sort. Such a
/// transform over a whole table is what a shuffle (Ballista) spreads over
/// the cluster; a row-by-row one (projections, filters) is not.
pub async fn needs_shuffle(
    source: SchemaRef,
    tables: &[(String, SchemaRef)],
    transform: Option<&str>,
) -> Result<bool, WorkerError> {
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    use datafusion::logical_expr::LogicalPlan;
    let frame = plan_over_empty(source, tables, transform).await?;
    let mut found = false;
    frame
        .logical_plan()
        .apply(|node| {
            found = matches!(
                node,
                LogicalPlan::Aggregate(_)
                    | LogicalPlan::Join(_)
                    | LogicalPlan::Window(_)
                    | LogicalPlan::Distinct(_)
                    | LogicalPlan::Sort(_)
            );
            Ok(if found { TreeNodeRecursion::Stop } else { TreeNodeRecursion::Continue })
        })
        .map_err(transform_error)?;
    Ok(found)
}

/// Registers each of `tables` in `ctx` under its name: the Delta table at its pinned version.
pub async fn register_tables(
    ctx: &SessionContext,
    tables: &[sluice_proto::task::NamedTable],
    storage: &sluice_proto::storage::StorageOptions,
) -> Result<(), WorkerError> {
    for named in tables {
        let table = crate::delta_source::open_at(&named.table_url, named.version, storage).await?;
        table.update_datafusion_session(&ctx.state()).map_err(|e| WorkerError::Transform(e.to_string()))?;
        let provider = table.table_provider().await.map_err(|e| WorkerError::Transform(e.to_string()))?;
        ctx.register_table(named.name.as_str(), provider).map_err(transform_error)?;
    }
    Ok(())
}

/// Runs the transform over the batches arriving on `input`.
pub async fn execute(
    source: SchemaRef,
    input: mpsc::Receiver<Result<RecordBatch, DataFusionError>>,
    transform: Option<&str>,
    tables: &[sluice_proto::task::NamedTable],
    storage: &sluice_proto::storage::StorageOptions,
) -> Result<SendableRecordBatchStream, WorkerError> {
    let ctx = session_context();
    register_tables(&ctx, tables, storage).await?;
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

#[cfg(test)]
mod tests {
    use super::check_query;

    #[test]
    fn only_one_query_is_accepted() {
        for sql in [
            "SELECT * FROM source",
            "WITH s AS (SELECT a FROM source) SELECT a FROM s UNION ALL SELECT 1",
            "select *, _metadata.file_path from source where x > 1",
            "VALUES (1)",
        ] {
            assert_eq!(check_query(sql), Ok(()), "{sql}");
        }
        for (sql, named) in [
            ("CREATE TABLE t AS SELECT * FROM source", "`CREATE TABLE`"),
            ("DROP TABLE source", "`DROP TABLE`"),
            ("INSERT INTO t SELECT * FROM source", "`INSERT INTO`"),
            ("COPY source TO '/tmp/out.parquet'", "`COPY ... TO`"),
            ("CREATE EXTERNAL TABLE x STORED AS PARQUET LOCATION '/etc'", "`CREATE EXTERNAL TABLE`"),
            ("SET datafusion.execution.batch_size = 1", "`SET"),
            ("SELECT 1; DROP TABLE source", "a script of 2 statements"),
        ] {
            let error = check_query(sql).unwrap_err();
            assert!(error.contains(named) && error.contains("not allowed"), "{sql}: {error}");
        }
        assert!(check_query("SELEC * FROM source").unwrap_err().starts_with("is not valid SQL"));
    }
}
