//! The pipeline's checkpoint location: its durable state next to the Delta log.
//!
//! ```text
//! <checkpoint>/flows/<flow>/batches/<batch:020>.json   the batch plan, written before any task runs
//! <checkpoint>/flows/<flow>/commits/<batch:020>.json   the ledger entry, written once the batch is committed
//! <checkpoint>/flows/<flow>/schemas/<version:020>.json the source schema in use (inferred or declared)
//! <checkpoint>/flows/<flow>/listing.json               when the source was last listed in full
//! <checkpoint>/flows/<flow>/watermark_files.json       a watermark over files: the files read in full
//! ```
//!
//! The files ingested so far (the ledger) are those of every committed batch's
//! plan. A batch counts as committed when its commit record exists or when the
//! sink table's `txn` version for the flow has reached it; the second case covers
//! a crash between the Delta commit and the commit record, and the record is
//! written again on the next run.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::datatypes::Schema;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use sluice_proto::storage::StorageOptions;
use sluice_proto::task::SourceFile;
use sluice_worker::storage::store_for;
use url::Url;

use crate::error::CoordinatorError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchPlan {
    pub batch: u64,
    pub files: Vec<SourceFile>,
    /// When the batch was planned (µs since the epoch): the rows' `_metadata.ingest_time`.
    pub planned_at_us: i64,
}

impl BatchPlan {
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommitRecord {
    pub batch: u64,
    /// The Delta version of the commit; `None` when the record was rebuilt from the table's txn.
    pub delta_version: Option<i64>,
    pub files: u64,
    pub rows: Option<u64>,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchemaRecord {
    pub version: u64,
    /// The source schema files are decoded into (without `_metadata` and `_rescued_data`).
    pub schema: Schema,
    /// `inferred`, `declared` or `evolved`.
    pub origin: String,
    /// The schema declared in the pipeline file this version derives from; a
    /// different declaration starts a new version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub declared: Option<Schema>,
    /// Columns this version added to the previous one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub added: Vec<String>,
    /// The file where they were first seen, and the batch that brought them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<u64>,
}

/// When a files source was last listed in full (incremental listings start
/// after the greatest key ingested, and a full one, a backfill, is due after
/// the source's `backfill_interval`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListingRecord {
    pub full_listing_at_ms: i64,
    /// Full listings in a row whose new files all had keys above the greatest
    /// key ingested before them (evidence that keys arrive in lexical order).
    #[serde(default)]
    pub ordered_listings: u32,
}

pub struct Checkpoint {
    store: Arc<dyn ObjectStore>,
    storage: StorageOptions,
    root: Path,
    url: Url,
}

impl Checkpoint {
    pub fn open(url: &Url, storage: &StorageOptions) -> Result<Self, CoordinatorError> {
        let (store, root) = store_for(url, storage)
            .map_err(|e| CoordinatorError::Checkpoint { location: url.to_string(), message: e.to_string() })?;
        Ok(Self { store, storage: storage.clone(), root, url: url.clone() })
    }

    fn error(&self, message: impl std::fmt::Display) -> CoordinatorError {
        let message = sluice_worker::storage::redacted(&message.to_string(), &self.storage);
        CoordinatorError::Checkpoint { location: self.url.to_string(), message }
    }

    fn path(&self, flow: &str, kind: &str, number: u64) -> Path {
        self.root.clone().join("flows").join(flow).join(kind).join(format!("{number:020}.json"))
    }

    async fn read_json<T: serde::de::DeserializeOwned>(&self, path: &Path) -> Result<Option<T>, CoordinatorError> {
        let bytes = match self.store.get(path).await {
            Ok(result) => result.bytes().await.map_err(|e| self.error(e))?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.error(e)),
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| self.error(format!("{path} is not readable: {e}")))
    }

    /// Every entry of one kind for a flow, in number order.
    async fn read_all<T: serde::de::DeserializeOwned>(
        &self,
        flow: &str,
        kind: &str,
    ) -> Result<Vec<T>, CoordinatorError> {
        let prefix = self.root.clone().join("flows").join(flow).join(kind);
        let mut paths: Vec<Path> = self
            .store
            .list(Some(&prefix))
            .map_ok(|meta| meta.location)
            .try_collect()
            .await
            .map_err(|e| self.error(e))?;
        paths.retain(|p| p.extension() == Some("json"));
        paths.sort();
        let mut entries = Vec::with_capacity(paths.len());
        for path in paths {
            if let Some(entry) = self.read_json(&path).await? {
                entries.push(entry);
            }
        }
        Ok(entries)
    }

    fn encode<T: Serialize>(&self, value: &T) -> Result<PutPayload, CoordinatorError> {
        serde_json::to_vec_pretty(value).map(PutPayload::from).map_err(|e| self.error(e))
    }

    /// Writes `value` at `path` unless something is there already; returns what
    /// is there afterwards, so that of two racing writers both use the winner's.
    async fn create_or_read<T>(&self, path: &Path, value: &T) -> Result<T, CoordinatorError>
    where
        T: Serialize + serde::de::DeserializeOwned + Clone,
    {
        let options = PutOptions { mode: PutMode::Create, ..Default::default() };
        match self.store.put_opts(path, self.encode(value)?, options).await {
            Ok(_) => Ok(value.clone()),
            Err(object_store::Error::AlreadyExists { .. }) => {
                self.read_json(path).await?.ok_or_else(|| self.error(format!("{path} vanished while being read")))
            }
            Err(e) => Err(self.error(e)),
        }
    }

    /// Writes a new batch plan. If a plan for that batch exists already (another
    /// run got there first), that plan is returned and must be used instead.
    pub async fn create_plan(&self, flow: &str, plan: &BatchPlan) -> Result<BatchPlan, CoordinatorError> {
        self.create_or_read(&self.path(flow, "batches", plan.batch), plan).await
    }

    /// Replaces the plan of a batch that is known not to be committed.
    pub async fn replace_plan(&self, flow: &str, plan: &BatchPlan) -> Result<(), CoordinatorError> {
        let path = self.path(flow, "batches", plan.batch);
        self.store.put(&path, self.encode(plan)?).await.map_err(|e| self.error(e))?;
        Ok(())
    }

    /// Removes the plan of a batch that is known not to be committed.
    pub async fn delete_plan(&self, flow: &str, batch: u64) -> Result<(), CoordinatorError> {
        match self.store.delete(&self.path(flow, "batches", batch)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error(e)),
        }
    }

    pub async fn plans(&self, flow: &str) -> Result<Vec<BatchPlan>, CoordinatorError> {
        self.read_all(flow, "batches").await
    }

    pub async fn commits(&self, flow: &str) -> Result<BTreeMap<u64, CommitRecord>, CoordinatorError> {
        let records: Vec<CommitRecord> = self.read_all(flow, "commits").await?;
        Ok(records.into_iter().map(|r| (r.batch, r)).collect())
    }

    pub async fn record_commit(&self, flow: &str, record: &CommitRecord) -> Result<(), CoordinatorError> {
        let path = self.path(flow, "commits", record.batch);
        self.store.put(&path, self.encode(record)?).await.map_err(|e| self.error(e))?;
        Ok(())
    }

    pub async fn last_full_listing(&self, flow: &str) -> Result<Option<ListingRecord>, CoordinatorError> {
        self.read_json(&self.listing_path(flow)).await
    }

    pub async fn record_full_listing(&self, flow: &str, record: &ListingRecord) -> Result<(), CoordinatorError> {
        self.store.put(&self.listing_path(flow), self.encode(record)?).await.map_err(|e| self.error(e))?;
        Ok(())
    }

    /// The files (with their identity) a watermark-over-files flow has read
    /// in full in its last committed round; `None` before the first.
    pub async fn watermark_files(&self, flow: &str) -> Result<Option<Vec<SourceFile>>, CoordinatorError> {
        self.read_json(&self.root.clone().join("flows").join(flow).join("watermark_files.json")).await
    }

    pub async fn record_watermark_files(&self, flow: &str, files: &[SourceFile]) -> Result<(), CoordinatorError> {
        let path = self.root.clone().join("flows").join(flow).join("watermark_files.json");
        self.store.put(&path, self.encode(&files)?).await.map_err(|e| self.error(e))?;
        Ok(())
    }

    fn listing_path(&self, flow: &str) -> Path {
        self.root.clone().join("flows").join(flow).join("listing.json")
    }

    pub async fn latest_schema(&self, flow: &str) -> Result<Option<SchemaRecord>, CoordinatorError> {
        Ok(self.read_all::<SchemaRecord>(flow, "schemas").await?.pop())
    }

    /// Records a schema version; a version recorded before (by a racing run) wins.
    pub async fn record_schema(&self, flow: &str, record: &SchemaRecord) -> Result<SchemaRecord, CoordinatorError> {
        self.create_or_read(&self.path(flow, "schemas", record.version), record).await
    }
}
