//! A source Delta table with a real change data feed, changed through
//! deltalake's own operations (write, update, delete), and a model of what it
//! should hold.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use deltalake::kernel::{DataType as DeltaType, PrimitiveType, StructField};
use deltalake::operations::create::CreateBuilder;
use deltalake::protocol::SaveMode;
use deltalake::{DeltaTable, DeltaTableBuilder};
use url::Url;

/// One commit to the source table.
#[derive(Debug, Clone)]
pub enum Change {
    /// New rows `(id, amount)`.
    Insert(Vec<(i64, i64)>),
    /// `amount = value` for these ids.
    Update(Vec<i64>, i64),
    Delete(Vec<i64>),
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime")
}

fn url(path: &Path) -> Url {
    std::fs::create_dir_all(path).expect("create the table folder");
    Url::from_directory_path(path).expect("an absolute path")
}

async fn open(path: &Path) -> DeltaTable {
    DeltaTableBuilder::from_url(url(path)).expect("a table url").load().await.expect("open the source table")
}

/// Creates the source table `(id BIGINT, name STRING, amount BIGINT)`, with the
/// change data feed enabled when `cdf` is true.
pub fn create_source(path: &Path, cdf: bool) {
    runtime().block_on(async {
        let columns = [
            StructField::new("id", DeltaType::Primitive(PrimitiveType::Long), true),
            StructField::new("name", DeltaType::Primitive(PrimitiveType::String), true),
            StructField::new("amount", DeltaType::Primitive(PrimitiveType::Long), true),
        ];
        CreateBuilder::new()
            .with_location(url(path).as_str())
            .with_columns(columns)
            .with_configuration_property(deltalake::TableProperty::EnableChangeDataFeed, Some(cdf.to_string()))
            .with_save_mode(SaveMode::ErrorIfExists)
            .await
            .expect("create the source table");
    });
}

fn rows_batch(rows: &[(i64, i64)]) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, true),
        Field::new("name", DataType::Utf8, true),
        Field::new("amount", DataType::Int64, true),
    ]));
    let ids = Int64Array::from_iter_values(rows.iter().map(|r| r.0));
    let names = StringArray::from_iter_values(rows.iter().map(|r| format!("customer-{}", r.0)));
    let amounts = Int64Array::from_iter_values(rows.iter().map(|r| r.1));
    RecordBatch::try_new(schema, vec![Arc::new(ids), Arc::new(names), Arc::new(amounts)]).expect("a batch")
}

fn id_list(ids: &[i64]) -> String {
    ids.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
}

/// Commits each change as its own version of the source table.
pub fn apply(path: &Path, changes: &[Change]) {
    runtime().block_on(async {
        for change in changes {
            let table = open(path).await;
            match change {
                Change::Insert(rows) => {
                    table.write([rows_batch(rows)]).with_save_mode(SaveMode::Append).await.expect("insert");
                }
                Change::Update(ids, value) => {
                    table
                        .update()
                        .with_predicate(format!("id IN ({})", id_list(ids)))
                        .with_update("amount", value.to_string())
                        .await
                        .expect("update");
                }
                Change::Delete(ids) => {
                    table.delete().with_predicate(format!("id IN ({})", id_list(ids))).await.expect("delete");
                }
            }
        }
    });
}

/// What the source holds after `changes`, by id, and every version each id
/// had, as an SCD type 2 table sequenced by the source's commit version keeps them.
#[derive(Debug, Default, Clone)]
pub struct Model {
    pub rows: BTreeMap<i64, i64>,
    /// By id: `(amount, start version, end version)`, oldest first.
    pub history: BTreeMap<i64, Vec<(i64, i64, Option<i64>)>>,
    /// The source's latest version (0: created, empty).
    pub version: i64,
    next_id: i64,
}

impl Model {
    /// A random next change that keeps to ids the model knows.
    pub fn random_change(&mut self, rng: &mut fastrand::Rng) -> Change {
        let existing: Vec<i64> = self.rows.keys().copied().collect();
        let pick = |rng: &mut fastrand::Rng, n: usize| -> Vec<i64> {
            let mut ids: Vec<i64> = (0..n).map(|_| existing[rng.usize(..existing.len())]).collect();
            ids.sort_unstable();
            ids.dedup();
            ids
        };
        let change = match rng.u8(..10) {
            0..=3 => {
                let count = rng.usize(1..6);
                let rows = (0..count).map(|i| (self.next_id + i as i64, rng.i64(0..1000))).collect();
                self.next_id += count as i64;
                Change::Insert(rows)
            }
            _ if existing.is_empty() => return self.random_change_insert(rng),
            4..=7 => {
                let count = rng.usize(1..4);
                Change::Update(pick(rng, count), rng.i64(0..1000))
            }
            _ => {
                let count = rng.usize(1..3);
                Change::Delete(pick(rng, count))
            }
        };
        self.apply(&change);
        change
    }

    fn random_change_insert(&mut self, rng: &mut fastrand::Rng) -> Change {
        let change = Change::Insert(vec![(self.next_id, rng.i64(0..1000))]);
        self.next_id += 1;
        self.apply(&change);
        change
    }

    fn apply(&mut self, change: &Change) {
        self.version += 1;
        let version = self.version;
        match change {
            Change::Insert(rows) => {
                for (id, amount) in rows {
                    self.rows.insert(*id, *amount);
                    self.history.entry(*id).or_default().push((*amount, version, None));
                }
            }
            Change::Update(ids, value) => {
                for id in ids {
                    self.rows.insert(*id, *value);
                    let versions = self.history.entry(*id).or_default();
                    // An update that leaves the tracked columns as they were opens no version.
                    if let Some(last) = versions.last_mut()
                        && last.0 != *value
                    {
                        last.2 = Some(version);
                        versions.push((*value, version, None));
                    }
                }
            }
            Change::Delete(ids) => {
                for id in ids {
                    self.rows.remove(id);
                    if let Some(last) = self.history.get_mut(id).and_then(|v| v.last_mut()) {
                        last.2 = Some(version);
                    }
                }
            }
        }
    }

    /// The history as `id:amount:start:end` (end `-` while current), by id and start.
    pub fn history_text(&self) -> String {
        let mut parts = Vec::new();
        for (id, versions) in &self.history {
            for (amount, start, end) in versions {
                let end = end.map_or_else(|| "-".to_string(), |e| e.to_string());
                parts.push(format!("{id}:{amount}:{start}:{end}"));
            }
        }
        parts.join(",")
    }
}
