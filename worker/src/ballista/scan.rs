//! A Delta table as the leaf of a Ballista query.
//!
//! delta-rs' own codecs cannot ship a Delta scan to executors (its logical
//! codec panics, its physical codec is deprecated), so a query that Ballista
//! runs reads Delta tables through these two types of Sluice's own:
//!
//! - [`DeltaSource`], the table provider the worker that plans the query
//!   registers (`source`, and each of the flow's `tables:`): a table at a
//!   pinned version and its data files, listed once when the query is planned;
//! - [`DeltaFilesExec`], the scan it plans: the same table and version, the
//!   files cut into partitions of about equal bytes, and the projection. It
//!   travels to the executors as JSON inside the plan ([`SluiceCodec`]), and
//!   each executor opens the table itself, with the pipeline's storage
//!   options, and reads only its partition's files through delta-rs (so
//!   column mapping, partition values and schema evolution are delta-rs').
//!
//! Filters are not pushed into the scan: DataFusion keeps them above it.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use arrow::array::Array;
use arrow::datatypes::{Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::{TableProvider, TableType};
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::Expr;
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties};
use datafusion::prelude::SessionContext;
use datafusion_proto::physical_plan::{PhysicalExtensionCodec, PhysicalProtoConverterExtension};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use sluice_proto::storage::StorageOptions;

use crate::conform::conform_batch;
use crate::delta_source::{open_at, read_error};
use crate::failpoint;

/// An executor reaching a scan of its partition (crash tests).
pub const BALLISTA_SCAN: &str = "ballista_scan";

/// A Delta table at a version, and its data files.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TableAtVersion {
    pub table_url: String,
    pub version: u64,
    /// The table's whole schema, as a transform sees it.
    pub schema: Schema,
    /// Object-store options; `${NAME}` values resolve on each executor.
    #[serde(default)]
    pub storage: StorageOptions,
}

/// One data file: its path relative to the table root, and its size.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DataFile {
    pub path: String,
    pub size: u64,
}

/// A Delta table as a table provider whose scans can run on Ballista.
#[derive(Debug)]
pub struct DeltaSource {
    table: Arc<TableAtVersion>,
    files: Vec<DataFile>,
    schema: SchemaRef,
}

impl DeltaSource {
    /// Opens the table at `version` and lists its data files.
    pub async fn open(table_url: &str, version: u64, storage: &StorageOptions) -> Result<Self, crate::WorkerError> {
        let table = open_at(table_url, version, storage).await?;
        let snapshot = table.snapshot().map_err(|e| crate::WorkerError::Read(read_error(table_url, e)))?;
        let schema = snapshot.snapshot().arrow_schema();
        let files: Vec<DataFile> = snapshot
            .snapshot()
            .file_views(&table.log_store(), None)
            .map_ok(|file| DataFile { path: file.path().to_string(), size: file.size().max(0) as u64 })
            .try_collect()
            .await
            .map_err(|e| crate::WorkerError::Read(read_error(table_url, e)))?;
        let table = TableAtVersion {
            table_url: table_url.to_string(),
            version,
            schema: schema.as_ref().clone(),
            storage: storage.clone(),
        };
        Ok(Self { table: Arc::new(table), files, schema })
    }

    pub fn file_count(&self) -> usize {
        self.files.len()
    }
}

#[async_trait]
impl TableProvider for DeltaSource {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let parts = state.config().target_partitions().max(1);
        let groups = split_by_size(&self.files, parts);
        Ok(Arc::new(DeltaFilesExec::new(self.table.clone(), groups, projection.cloned(), None)?))
    }
}

/// Cuts `files` into at most `parts` groups of about equal bytes (largest
/// first, each to the lightest group); at least one group, maybe empty.
pub fn split_by_size(files: &[DataFile], parts: usize) -> Vec<Vec<String>> {
    let count = parts.clamp(1, files.len().max(1));
    let mut order: Vec<&DataFile> = files.iter().collect();
    order.sort_by(|a, b| b.size.cmp(&a.size).then_with(|| a.path.cmp(&b.path)));
    let mut groups: Vec<(u64, Vec<String>)> = vec![(0, Vec::new()); count];
    for file in order {
        let lightest = groups.iter_mut().min_by_key(|(bytes, _)| *bytes).expect("at least one group");
        lightest.0 += file.size.max(1);
        lightest.1.push(file.path.clone());
    }
    groups.into_iter().map(|(_, paths)| paths).collect()
}

/// The scan of a Delta table's files, one partition per group.
///
/// Its one input is an in-memory source of one row per partition, holding
/// the partition's index: `execute(j)` reads input partition `j` and scans
/// the groups whose indexes it finds. Ballista restricts each task's copy of
/// a stage to the task's partitions by slicing the leaves it knows (file
/// scans, in-memory sources, shuffle reads); a leaf of its own it would
/// leave whole, and every task would read every file. With the index
/// source as the leaf, Ballista slices that, and each task scans only its
/// own groups.
#[derive(Debug)]
pub struct DeltaFilesExec {
    table: Arc<TableAtVersion>,
    /// Every group of the scan, by global partition index.
    groups: Vec<Vec<String>>,
    projection: Option<Vec<usize>>,
    projected: SchemaRef,
    /// The partition indexes, one row per partition (see above).
    indexes: Arc<dyn ExecutionPlan>,
    properties: Arc<PlanProperties>,
}

/// What [`DeltaFilesExec`] travels as (its index input travels as a plan of its own).
#[derive(Serialize, Deserialize)]
struct ScanMessage {
    table: TableAtVersion,
    groups: Vec<Vec<String>>,
    projection: Option<Vec<usize>>,
}

const PARTITION_INDEX: &str = "sluice_partition";

/// An in-memory source with one partition per group, each one row: its index.
fn partition_indexes(count: usize) -> Result<Arc<dyn ExecutionPlan>> {
    use arrow::array::{RecordBatch, UInt32Array};
    use arrow::datatypes::{DataType, Field};
    let schema = Arc::new(Schema::new(vec![Field::new(PARTITION_INDEX, DataType::UInt32, false)]));
    let partitions = (0..count)
        .map(|index| {
            let column = Arc::new(UInt32Array::from(vec![index as u32]));
            RecordBatch::try_new(schema.clone(), vec![column]).map(|batch| vec![batch])
        })
        .collect::<Result<Vec<_>, _>>()?;
    let source = datafusion::datasource::memory::MemorySourceConfig::try_new_exec(&partitions, schema, None)?;
    Ok(source)
}

impl DeltaFilesExec {
    fn new(
        table: Arc<TableAtVersion>,
        groups: Vec<Vec<String>>,
        projection: Option<Vec<usize>>,
        indexes: Option<Arc<dyn ExecutionPlan>>,
    ) -> Result<Self> {
        let projected = match &projection {
            Some(columns) => Arc::new(table.schema.project(columns)?),
            None => Arc::new(table.schema.clone()),
        };
        let indexes = match indexes {
            Some(indexes) => indexes,
            None => partition_indexes(groups.len().max(1))?,
        };
        let properties = PlanProperties::new(
            EquivalenceProperties::new(projected.clone()),
            Partitioning::UnknownPartitioning(indexes.properties().output_partitioning().partition_count()),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        Ok(Self { table, groups, projection, projected, indexes, properties: Arc::new(properties) })
    }
}

impl DisplayAs for DeltaFilesExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let files: usize = self.groups.iter().map(Vec::len).sum();
        write!(
            f,
            "DeltaFilesExec: table={} version={} files={files} groups={}",
            self.table.table_url,
            self.table.version,
            self.groups.len()
        )
    }
}

impl ExecutionPlan for DeltaFilesExec {
    fn name(&self) -> &str {
        "DeltaFilesExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.indexes]
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![false]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    #[allow(deprecated)]
    fn with_new_children(self: Arc<Self>, children: Vec<Arc<dyn ExecutionPlan>>) -> Result<Arc<dyn ExecutionPlan>> {
        let [indexes] = <[_; 1]>::try_from(children)
            .map_err(|_| DataFusionError::Internal("DeltaFilesExec has one input".to_string()))?;
        Ok(Arc::new(Self::new(self.table.clone(), self.groups.clone(), self.projection.clone(), Some(indexes))?))
    }

    fn execute(&self, partition: usize, context: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        let indexes = self.indexes.execute(partition, context)?;
        let groups = self.groups.clone();
        let table = self.table.clone();
        let projection = self.projection.clone();
        let projected = self.projected.clone();
        let schema = projected.clone();
        let stream = futures::stream::once(async move {
            let batches: Vec<arrow::array::RecordBatch> = indexes.try_collect().await?;
            let mut files = Vec::new();
            for batch in &batches {
                let column =
                    batch.column(0).as_any().downcast_ref::<arrow::array::UInt32Array>().ok_or_else(|| {
                        DataFusionError::Internal("a Delta scan's partition index is not UInt32".into())
                    })?;
                for index in column.values() {
                    files.extend(groups.get(*index as usize).cloned().unwrap_or_default());
                }
            }
            scan_files(table, files, projection, projected).await
        })
        .try_flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, stream)))
    }
}

/// Tables opened by this process's scans, by URL and version: the tasks of a
/// query each scan a part of the same snapshot, which is loaded once.
static OPENED: std::sync::Mutex<Vec<((String, u64), deltalake::DeltaTable)>> = std::sync::Mutex::new(Vec::new());

/// Snapshots kept in [`OPENED`], the most recent last.
const OPENED_KEPT: usize = 8;

/// The table at the scan's version, opened once per process.
async fn opened(table: &TableAtVersion) -> Result<deltalake::DeltaTable, crate::WorkerError> {
    let key = (table.table_url.clone(), table.version);
    if let Some((_, delta)) = OPENED.lock().unwrap_or_else(|e| e.into_inner()).iter().find(|(k, _)| *k == key) {
        return Ok(delta.clone());
    }
    let delta = open_at(&table.table_url, table.version, &table.storage).await?;
    let mut cache = OPENED.lock().unwrap_or_else(|e| e.into_inner());
    if !cache.iter().any(|(k, _)| *k == key) {
        if cache.len() >= OPENED_KEPT {
            cache.remove(0);
        }
        cache.push((key, delta.clone()));
    }
    Ok(delta)
}

/// Reads `files` of the table through delta-rs, shaped as `projected`.
async fn scan_files(
    table: Arc<TableAtVersion>,
    files: Vec<String>,
    projection: Option<Vec<usize>>,
    projected: SchemaRef,
) -> Result<futures::stream::BoxStream<'static, Result<arrow::array::RecordBatch>>> {
    if files.is_empty() {
        return Ok(futures::stream::empty().boxed());
    }
    failpoint::hit(BALLISTA_SCAN).await;
    let external = |e: crate::WorkerError| DataFusionError::External(Box::new(e));
    let delta = opened(&table).await.map_err(external)?;
    let ctx = SessionContext::new();
    delta.update_datafusion_session(&ctx.state()).map_err(|e| DataFusionError::External(Box::new(e)))?;
    let provider = delta.table_provider().with_file_paths(files).build().await?;
    let plan = provider.scan(&ctx.state(), projection.as_ref(), &[], None).await?;
    let stream = datafusion::physical_plan::execute_stream(plan, ctx.task_ctx())?;
    Ok(stream
        .map(move |batch| {
            let batch = batch?;
            conform_batch(&batch, &projected).map_err(|e| DataFusionError::ArrowError(Box::new(e), None))
        })
        .boxed())
}

/// Encodes and decodes [`DeltaFilesExec`]; composed with Ballista's own codec
/// in [`physical_codec`].
#[derive(Debug, Default)]
pub struct SluiceCodec;

impl PhysicalExtensionCodec for SluiceCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[Arc<dyn ExecutionPlan>],
        _ctx: &TaskContext,
        _proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let message: ScanMessage = serde_json::from_slice(buf)
            .map_err(|e| DataFusionError::Internal(format!("not a Sluice Delta scan: {e}")))?;
        let [indexes] = inputs else {
            return Err(DataFusionError::Internal("a Sluice Delta scan has one input".to_string()));
        };
        let table = Arc::new(message.table);
        Ok(Arc::new(DeltaFilesExec::new(table, message.groups, message.projection, Some(indexes.clone()))?))
    }

    fn try_encode(
        &self,
        node: Arc<dyn ExecutionPlan>,
        buf: &mut Vec<u8>,
        _proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<()> {
        let Some(scan) = (node.as_ref() as &dyn Any).downcast_ref::<DeltaFilesExec>() else {
            return Err(DataFusionError::NotImplemented(format!("{} is not a Sluice Delta scan", node.name())));
        };
        let message = ScanMessage {
            table: scan.table.as_ref().clone(),
            groups: scan.groups.clone(),
            projection: scan.projection.clone(),
        };
        serde_json::to_writer(buf, &message).map_err(|e| DataFusionError::Internal(e.to_string()))
    }
}

/// Ballista's codec (shuffles) and Sluice's (Delta scans), for the
/// scheduler, the executors and the workers that submit queries alike.
pub fn physical_codec() -> Arc<dyn PhysicalExtensionCodec> {
    Arc::new(datafusion_proto::physical_plan::ComposedPhysicalExtensionCodec::new(vec![
        Arc::new(SluiceCodec),
        Arc::new(ballista_core::serde::BallistaPhysicalExtensionCodec::default()),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_split_by_bytes_into_at_most_the_parts_asked() {
        let files: Vec<DataFile> = [100, 90, 10, 10, 5, 80]
            .iter()
            .enumerate()
            .map(|(i, &size)| DataFile { path: format!("f{i}"), size })
            .collect();
        let groups = split_by_size(&files, 3);
        assert_eq!(groups.len(), 3);
        let bytes = |group: &Vec<String>| -> u64 {
            group.iter().map(|p| files.iter().find(|f| &f.path == p).map_or(0, |f| f.size)).sum()
        };
        let sizes: Vec<u64> = groups.iter().map(bytes).collect();
        assert_eq!(sizes.iter().sum::<u64>(), 295);
        assert!(sizes.iter().all(|&s| (90..=105).contains(&s)), "{sizes:?}");
        assert_eq!(split_by_size(&files[..2], 8).len(), 2);
        assert_eq!(split_by_size(&[], 4), vec![Vec::<String>::new()]);
    }
}
