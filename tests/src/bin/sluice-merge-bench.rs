//! Merge benchmark: 100 k changes (5 % updates of existing keys, the rest
//! inserts) applied by key to a 1 M-row Delta table of 10 files, with Sluice's
//! merge (compute + commit), and with delta-rs' MERGE as the baseline.
//!
//!   cargo run --release -p sluice-tests --bin sluice-merge-bench -- [--rows 1000000] [--changes 100000]
//!
//! Two shapes of updates: keys spread uniformly over the table (every file
//! holds one, so every file is rewritten), and keys among the most recent
//! 10 % (the usual shape of a change feed), where only the files that hold them
//! are read and rewritten.
//!
//! `--scd 2` merges into a history table (`__start_at`, `__end_at`: an update
//! closes the current version and opens one). `--change-data` creates the
//! target with `delta.enableChangeDataFeed = true`, so the merge also writes
//! its change data files (`_change_data/`), whose cost this measures.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use clap::Parser;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::prelude::SessionContext;
use deltalake::DeltaTableBuilder;
use deltalake::protocol::SaveMode;
use sluice_coordinator::commit::{BatchCommit, CommitKind, commit_batch};
use sluice_coordinator::table_schema::to_delta;
use sluice_proto::spec::MergeSpec;
use sluice_worker::merge::merge_changes;
use url::Url;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 1_000_000)]
    rows: i64,
    #[arg(long, default_value_t = 100_000)]
    changes: i64,
    /// Files the target table is written in.
    #[arg(long, default_value_t = 10)]
    files: i64,
    #[arg(long)]
    dir: Option<PathBuf>,
    /// 1: latest row per key; 2: history.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    scd: u8,
    /// Enable the target's change data feed (the merge writes change data).
    #[arg(long)]
    change_data: bool,
}

/// The target's schema: the changes' columns, plus the history's for SCD 2.
fn target_schema(scd: u8) -> SchemaRef {
    let mut fields: Vec<Field> = schema().fields().iter().map(|f| f.as_ref().clone()).collect();
    if scd == 2 {
        fields.push(Field::new("__start_at", DataType::Int64, true));
        fields.push(Field::new("__end_at", DataType::Int64, true));
    }
    Arc::new(Schema::new(fields))
}

/// Target rows: every key's current version, opened at sequence 1.
fn target_rows(ids: &[i64], scd: u8) -> RecordBatch {
    let batch = rows(ids, 1);
    if scd == 1 {
        return batch;
    }
    let mut columns = batch.columns().to_vec();
    columns.push(Arc::new(Int64Array::from(vec![1; ids.len()])));
    columns.push(Arc::new(Int64Array::from(vec![None::<i64>; ids.len()])));
    RecordBatch::try_new(target_schema(2), columns).expect("a history batch")
}

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, true),
        Field::new("name", DataType::Utf8, true),
        Field::new("amount", DataType::Int64, true),
        Field::new("seq", DataType::Int64, true),
    ]))
}

fn rows(ids: &[i64], seq: i64) -> RecordBatch {
    let names = StringArray::from_iter_values(ids.iter().map(|id| format!("customer-{id:09}")));
    let amounts = Int64Array::from_iter_values(ids.iter().map(|id| (id * 7919) % 100_000));
    let seqs = Int64Array::from_iter_values(ids.iter().map(|_| seq));
    RecordBatch::try_new(
        schema(),
        vec![Arc::new(Int64Array::from(ids.to_vec())), Arc::new(names), Arc::new(amounts), Arc::new(seqs)],
    )
    .expect("a batch")
}

fn url(path: &Path) -> Url {
    std::fs::create_dir_all(path).expect("a folder");
    Url::from_directory_path(path).expect("an absolute path")
}

async fn build_target(path: &Path, total: i64, files: i64, scd: u8, change_data: bool) {
    let per_file = total / files;
    for file in 0..files {
        let ids: Vec<i64> = (file * per_file..(file + 1) * per_file).collect();
        let table = DeltaTableBuilder::from_url(url(path)).expect("url").build().expect("table");
        let table = if file == 0 { table } else { deltalake::open_table(url(path)).await.expect("open") };
        let cdf = change_data.then(|| ("delta.enableChangeDataFeed".to_string(), Some("true".to_string())));
        table
            .write([target_rows(&ids, scd)])
            .with_save_mode(SaveMode::Append)
            .with_configuration(cdf)
            .await
            .expect("write the target");
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create");
    for entry in std::fs::read_dir(from).expect("read dir").flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

fn change_ids(total: i64, changes: i64, recent: bool) -> Vec<i64> {
    let mut rng = fastrand::Rng::with_seed(7);
    let updates = changes / 20;
    let mut ids: Vec<i64> =
        (0..updates).map(|_| if recent { total - 1 - rng.i64(0..total / 10) } else { rng.i64(0..total) }).collect();
    ids.sort_unstable();
    ids.dedup();
    let inserts = changes - ids.len() as i64;
    ids.extend(total..total + inserts);
    ids
}

async fn sluice_merge(path: &Path, changes: RecordBatch, scd: u8) -> (f64, String) {
    let started = Instant::now();
    let table_url = url(path);
    let table = deltalake::open_table(table_url.clone()).await.expect("open");
    let version = table.version();
    let spec = MergeSpec {
        keys: vec!["id".into()],
        sequence_by: "seq".into(),
        delete_when: None,
        ignore_null_updates: false,
        except_columns: vec![],
        scd,
        track_history_columns: vec![],
        replace_rows_per_key: false,
    };
    let stream = Box::pin(RecordBatchStreamAdapter::new(schema(), futures::stream::iter([Ok(changes)])));
    let table_schema = target_schema(scd);
    let output = merge_changes(&spec, &table_url, version, stream, &table_schema, &[], &Default::default())
        .await
        .expect("merge");
    let merged = started.elapsed().as_secs_f64();
    let (delta_schema, _) = to_delta(&table_schema).expect("a Delta schema");
    let change_files = output.cdc.len();
    let request = BatchCommit {
        table_url,
        storage: Default::default(),
        app_id: "bench".into(),
        batch: 1,
        adds: output.adds,
        removes: output.removes,
        cdc: output.cdc,
        kind: CommitKind::Merge,
        computed_on: Some(version),
        follows: None,
        schema: delta_schema,
        partition_by: vec![],
        properties: Default::default(),
        info: Default::default(),
    };
    commit_batch(&request).await.expect("commit");
    let c = output.counts;
    let detail = format!(
        "{} inserted, {} updated; {} of {} files read, {} rewritten, {change_files} change data files; merge {merged:.3}s",
        c.inserted, c.updated, c.files_scanned, 10, c.files_rewritten
    );
    (started.elapsed().as_secs_f64(), detail)
}

async fn delta_rs_merge(path: &Path, changes: RecordBatch) -> f64 {
    let started = Instant::now();
    let table = deltalake::open_table(url(path)).await.expect("open");
    let ctx = SessionContext::new();
    let source = ctx.read_batch(changes).expect("a frame");
    let (_table, metrics) = table
        .merge(source, "target.id = source.id")
        .with_source_alias("source")
        .with_target_alias("target")
        .when_matched_update(|update| {
            update.update("name", "source.name").update("amount", "source.amount").update("seq", "source.seq")
        })
        .expect("matched clause")
        .when_not_matched_insert(|insert| {
            insert
                .set("id", "source.id")
                .set("name", "source.name")
                .set("amount", "source.amount")
                .set("seq", "source.seq")
        })
        .expect("not matched clause")
        .await
        .expect("delta-rs merge");
    let _ = metrics;
    started.elapsed().as_secs_f64()
}

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a runtime");
    let scratch = tempfile::tempdir().expect("a temporary folder");
    let dir = args.dir.clone().unwrap_or_else(|| scratch.path().to_path_buf());
    let base = dir.join("target-base");
    let cdf = if args.change_data { ", change data feed on" } else { "" };
    println!("building a {}-row SCD {} target in {} files{cdf} ...", args.rows, args.scd, args.files);
    runtime.block_on(build_target(&base, args.rows, args.files, args.scd, args.change_data));
    for recent in [false, true] {
        let ids = change_ids(args.rows, args.changes, recent);
        let shape = if recent { "updates among the newest 10 %" } else { "updates spread over the table" };
        let changes = rows(&ids, 2);
        let ours = dir.join(format!("sluice-{recent}"));
        copy_dir(&base, &ours);
        let (seconds, detail) = runtime.block_on(sluice_merge(&ours, changes.clone(), args.scd));
        println!("{shape}: sluice merge {seconds:.3}s ({detail})");
        if args.scd == 2 {
            // delta-rs has no SCD 2 merge to compare with.
            continue;
        }
        let theirs = dir.join(format!("delta-rs-{recent}"));
        copy_dir(&base, &theirs);
        let seconds = runtime.block_on(delta_rs_merge(&theirs, changes));
        println!("{shape}: delta-rs MERGE {seconds:.3}s");
    }
}
