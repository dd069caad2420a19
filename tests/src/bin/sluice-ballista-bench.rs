//! Shuffle-stage benchmark: the gold aggregation "daily sales per store" over
//! a silver table of about 10 M sales, run
//!
//! - locally: DataFusion in this process over the Delta table (the query
//!   alone), and the embedded runtime (`sluice run`: the whole flow, query,
//!   data files and commit);
//! - on Ballista in a real cluster (etcd, a coordinator, workers) with one
//!   worker, then two: the whole flow, from submission to its commit.
//!
//!   cargo build --release -p sluice-tests --bins
//!   target/release/sluice-ballista-bench [--rows 10000000] [--files 40] [--runs 3]
//!
//! On one 2-core machine the workers share the cores; the two-worker figures
//! show what the shuffle between processes costs, not a speed-up.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use clap::Parser;
use deltalake::protocol::SaveMode;
use sluice_tests::cluster::Cluster;
use sluice_tests::harness::{Sandbox, commit_infos, query_i64, table_version};
use sluice_tests::sales::{DAILY_SALES, DAYS, STORES, daily_sales_flow, pipeline_of};
use url::Url;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 10_000_000)]
    rows: i64,
    /// Data files of the silver table.
    #[arg(long, default_value_t = 40)]
    files: i64,
    /// Runs of each measurement; the best and the median are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Keep the silver table here between invocations (built when missing).
    #[arg(long)]
    dir: Option<PathBuf>,
}

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("invoice_id", DataType::Int64, true),
        Field::new("store_id", DataType::Int64, true),
        Field::new("day", DataType::Utf8, true),
        Field::new("amount_cents", DataType::Int64, true),
    ]))
}

/// Sales `first..first + count`, as `sales::sale_line` spreads them.
fn sales(first: i64, count: i64) -> RecordBatch {
    let ids: Vec<i64> = (first..first + count).collect();
    let mix = |i: i64| (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let stores: Vec<i64> = ids.iter().map(|&i| ((mix(i) >> 7) % STORES) as i64).collect();
    let days: Vec<String> = ids.iter().map(|&i| format!("2026-11-{:02}", 1 + (mix(i) >> 19) % DAYS)).collect();
    let amounts: Vec<i64> = ids.iter().map(|&i| (100 + (mix(i) >> 31) % 100_000) as i64).collect();
    RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(Int64Array::from(ids)),
            Arc::new(Int64Array::from(stores)),
            Arc::new(StringArray::from(days)),
            Arc::new(Int64Array::from(amounts)),
        ],
    )
    .expect("a batch")
}

async fn build_silver(path: &Path, rows: i64, files: i64) {
    let url = Url::from_directory_path(path).expect("an absolute path");
    std::fs::create_dir_all(path).expect("a folder");
    let per_file = rows / files;
    for file in 0..files {
        let table = if file == 0 {
            deltalake::DeltaTableBuilder::from_url(url.clone()).expect("url").build().expect("table")
        } else {
            deltalake::open_table(url.clone()).await.expect("open")
        };
        let batches: Vec<RecordBatch> =
            (0..per_file).step_by(100_000).map(|o| sales(file * per_file + o, 100_000.min(per_file - o))).collect();
        table.write(batches).with_save_mode(SaveMode::Append).await.expect("write silver");
    }
}

/// DataFusion alone, in this process, with two partitions.
async fn query_locally(path: &Path) -> f64 {
    let url = Url::from_directory_path(path).expect("a URL");
    let table = deltalake::open_table(url).await.expect("open");
    let config = datafusion::prelude::SessionConfig::new().with_target_partitions(2);
    let ctx = datafusion::prelude::SessionContext::new_with_config(config);
    table.update_datafusion_session(&ctx.state()).expect("session");
    ctx.register_table("source", table.table_provider().await.expect("provider")).expect("register");
    let started = Instant::now();
    let batches = ctx.sql(DAILY_SALES).await.expect("sql").collect().await.expect("run");
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    assert_eq!(rows as u64, STORES * DAYS);
    started.elapsed().as_secs_f64()
}

fn gold(name: &str, engine: &str, silver: &Path) -> String {
    pipeline_of(name, &[daily_sales_flow(engine, &silver.display().to_string(), name)])
}

/// The batch's own seconds, planning to commit, from the pipeline's event log.
fn batch_seconds(sandbox: &Sandbox, name: &str) -> f64 {
    let log = sandbox.path(&format!("lake/_checkpoints/{name}/_event_log"));
    let text = sluice_tests::harness::query_string(&log, "SELECT CAST(seconds AS VARCHAR) FROM t WHERE kind = 'batch'");
    text.trim().parse().unwrap_or_else(|e| panic!("{name}: the batch's seconds `{text}`: {e}"))
}

fn check(sandbox: &Sandbox, name: &str, rows: i64, engine: &str) {
    let table = sandbox.path(&format!("lake/{name}/daily_sales"));
    assert_eq!(
        query_i64(&table, "SELECT CAST(SUM(invoices) AS BIGINT) FROM t"),
        rows,
        "{name}: every sale counted once"
    );
    let engines: Vec<String> =
        commit_infos(&table).iter().filter_map(|c| c["sluice.engine"].as_str().map(str::to_string)).collect();
    assert_eq!(engines, vec![engine.to_string()], "{name}");
}

/// The whole flow with the embedded runtime: the batch's seconds, and the process's.
fn run_embedded(sandbox: &Sandbox, silver: &Path, run: usize, rows: i64) -> (f64, f64) {
    let name = format!("local{run}");
    sandbox.write(&format!("{name}.yaml"), gold(&name, "local", silver));
    let started = Instant::now();
    let output = sandbox.command(&["run", &format!("{name}.yaml")]).output().expect("sluice starts");
    let seconds = started.elapsed().as_secs_f64();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    check(sandbox, &name, rows, "local");
    (batch_seconds(sandbox, &name), seconds)
}

/// The whole flow on Ballista: the batch's seconds, and submission to completion
/// (which counts the CLI's status polls, every 250 ms).
fn run_cluster(cluster: &Cluster, sandbox: &Sandbox, silver: &Path, label: &str, run: usize, rows: i64) -> (f64, f64) {
    let name = format!("{label}{run}");
    sandbox.write(&format!("{name}.yaml"), gold(&name, "ballista", silver));
    let started = Instant::now();
    let output = cluster.cli(sandbox, &["submit", &format!("{name}.yaml")]);
    assert_eq!(output.code, Some(0), "{output:?}");
    cluster.wait_for_state(sandbox, &name, "completed", Duration::from_secs(1200));
    let seconds = started.elapsed().as_secs_f64();
    check(sandbox, &name, rows, "ballista");
    (batch_seconds(sandbox, &name), seconds)
}

fn report(label: &str, mut seconds: Vec<f64>, rows: i64) {
    seconds.sort_by(f64::total_cmp);
    let best = seconds[0];
    let median = seconds[seconds.len() / 2];
    println!(
        "{label:<58} best {best:>6.2} s  median {median:>6.2} s  ({:.1} M rows/s at best)",
        rows as f64 / best / 1e6
    );
}

/// Reports a flow's measurements: the batch's seconds, and the wall time around it.
fn report_flow(label: &str, runs: Vec<(f64, f64)>, rows: i64) {
    let (batch, wall): (Vec<f64>, Vec<f64>) = runs.into_iter().unzip();
    report(&format!("{label}, the batch"), batch, rows);
    report(&format!("{label}, wall"), wall, rows);
}

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a runtime");
    let sandbox = Sandbox::new();
    let silver = match &args.dir {
        Some(dir) => dir.join(format!("silver-{}-{}", args.rows, args.files)),
        None => sandbox.path("silver"),
    };
    let silver = std::path::absolute(&silver).expect("an absolute path");
    let rows = args.files * (args.rows / args.files);
    if table_version(&silver).is_none() {
        let started = Instant::now();
        runtime.block_on(build_silver(&silver, args.rows, args.files));
        eprintln!(
            "built the silver table ({rows} rows, {} files) in {:.1} s",
            args.files,
            started.elapsed().as_secs_f64()
        );
    }
    let bytes: u64 = std::fs::read_dir(&silver)
        .expect("the table")
        .filter_map(|e| e.ok()?.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum();
    println!("daily sales per store over {rows} rows ({} files, {:.0} MB of Parquet)", args.files, bytes as f64 / 1e6);

    let local: Vec<f64> = (0..args.runs).map(|_| runtime.block_on(query_locally(&silver))).collect();
    report("DataFusion in one process (query only)", local, rows);
    let embedded: Vec<(f64, f64)> = (0..args.runs).map(|run| run_embedded(&sandbox, &silver, run, rows)).collect();
    report_flow("sluice run, engine local", embedded, rows);

    for (workers, slots) in [(1, 2), (2, 1), (2, 2)] {
        let mut cluster = Cluster::new("5s");
        cluster.start_coordinator("");
        for _ in 0..workers {
            cluster.start_worker(slots, "");
        }
        let label = format!("w{workers}s{slots}r");
        let runs: Vec<(f64, f64)> =
            (0..args.runs).map(|run| run_cluster(&cluster, &sandbox, &silver, &label, run, rows)).collect();
        report_flow(&format!("Ballista, {workers} worker(s) x {slots} slot(s)"), runs, rows);
    }
}
