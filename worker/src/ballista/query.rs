//! Runs a task's transform on the cluster's Ballista executors.
//!
//! The worker that claimed the task plans the query itself, over
//! [`DeltaSource`]s for `source` and the flow's `tables:`, and submits the
//! physical plan to the leader's scheduler, which cuts it into stages at its
//! shuffles and runs them on every worker's executor. The result streams back
//! to this worker, which writes the data files and hands back their `Add`
//! actions as for any task: the coordinator commits them with the batch's txn.
//!
//! A query that fails while it runs (an executor lost beyond what Ballista
//! retries itself, the scheduler gone with its leader) fails the task with a
//! retryable error, so the coordinator hands the task out again; the batch is
//! committed once, whichever attempt finishes.

use std::sync::Arc;

use ballista_core::extension::SessionConfigExt;
use datafusion::execution::{SendableRecordBatchStream, SessionStateBuilder};
use datafusion::prelude::SessionContext;
use futures::StreamExt;
use sluice_proto::task::{BallistaRun, DeltaReadKind, TaskSpec};
use tracing::info;

use super::scan::{DeltaSource, physical_codec};
use crate::error::WorkerError;
use crate::transform::{DEFAULT_TRANSFORM, SOURCE_RELATION, session_config, sql_options};

/// The transform's output, computed on Ballista.
pub async fn execute(task: &TaskSpec, run: &BallistaRun) -> Result<SendableRecordBatchStream, WorkerError> {
    let Some(read) = &task.delta_read else {
        return Err(WorkerError::Bug("a Ballista task reads a Delta table".to_string()));
    };
    let DeltaReadKind::Snapshot { version } = read.kind else {
        return Err(WorkerError::Bug("a Ballista task reads a table's snapshot".to_string()));
    };
    let codec = physical_codec();
    let config = session_config(run.partitions.max(1))
        .upgrade_for_ballista()
        .with_ballista_physical_extension_codec(codec.clone());
    let state = SessionStateBuilder::new().with_config(config).with_default_features().build();
    let ctx = SessionContext::new_with_state(state);
    let source = DeltaSource::open(&read.table_url, version, &task.storage).await?;
    let files = source.file_count();
    ctx.register_table(SOURCE_RELATION, Arc::new(source)).map_err(|e| WorkerError::Transform(e.to_string()))?;
    for named in &task.tables {
        let table = DeltaSource::open(&named.table_url, named.version, &task.storage).await?;
        ctx.register_table(named.name.as_str(), Arc::new(table)).map_err(|e| WorkerError::Transform(e.to_string()))?;
    }
    let frame = ctx
        .sql_with_options(task.transform.as_deref().unwrap_or(DEFAULT_TRANSFORM), sql_options())
        .await
        .map_err(|e| WorkerError::Transform(e.to_string()))?;
    let plan = frame.create_physical_plan().await.map_err(|e| WorkerError::Transform(e.to_string()))?;
    info!(
        flow = task.id.flow,
        batch = task.id.batch,
        scheduler = run.scheduler,
        partitions = run.partitions,
        files,
        "running the transform on Ballista"
    );
    let session_config = ctx.state().config().clone();
    let ballista_config = session_config.ballista_config();
    let stream = ballista_core::execution_plans::execute_physical_plan::<datafusion_proto::protobuf::PhysicalPlanNode>(
        format!("http://{}", run.scheduler),
        &ballista_config,
        plan,
        codec.as_ref(),
        ctx.session_id(),
        session_config,
    )
    .await
    .map_err(|e| WorkerError::Query(e.to_string()))?;
    let schema = stream.schema();
    // Errors while the result streams are the query's, and worth another attempt.
    let stream = stream.map(|batch| {
        batch.map_err(|e| datafusion::error::DataFusionError::External(Box::new(WorkerError::Query(e.to_string()))))
    });
    Ok(Box::pin(datafusion::physical_plan::stream::RecordBatchStreamAdapter::new(schema, stream)))
}
