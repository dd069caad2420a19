//! Sales and stores for the shuffle-stage tests and benchmark: a silver table
//! of sales (one row per invoice: store, day, amount in cents) and a store
//! dimension table, loaded with the embedded runtime from JSON files.

use std::fmt::Write as _;
use std::path::Path;

use crate::harness::Sandbox;

/// Stores in the dimension table; sales name stores `0..STORES`.
pub const STORES: u64 = 40;
/// Days the sales spread over.
pub const DAYS: u64 = 30;

/// One sale, deterministic in `index`.
pub fn sale_line(index: u64) -> String {
    let mix = index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let store = (mix >> 7) % STORES;
    let day = 1 + (mix >> 19) % DAYS;
    let amount = 100 + (mix >> 31) % 100_000;
    format!(r#"{{"invoice_id":{index},"store_id":{store},"day":"2026-11-{day:02}","amount_cents":{amount}}}"#)
}

/// Writes `files` files of `rows_per_file` sales each below `folder`.
pub fn write_sales(folder: &Path, files: u64, rows_per_file: u64) {
    std::fs::create_dir_all(folder).expect("create the landing folder");
    for file in 0..files {
        let mut text = String::with_capacity(rows_per_file as usize * 80);
        for row in 0..rows_per_file {
            let _ = writeln!(text, "{}", sale_line(file * rows_per_file + row));
        }
        std::fs::write(folder.join(format!("sales-{file:04}.json")), text).expect("write sales");
    }
}

/// The store dimension: id, name, region.
pub fn stores_json() -> String {
    let regions = ["north", "south", "east", "west", "central"];
    (0..STORES)
        .map(|id| format!(r#"{{"store_id":{id},"name":"store {id}","region":"{}"}}"#, regions[id as usize % 5]))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The pipeline that loads `landing/sales` and `landing/stores` into
/// `lake/silver/sales` and `lake/silver/stores`, one file per batch, so the
/// sales table has a data file per landed file.
pub fn silver_pipeline() -> String {
    r#"pipeline: sales_silver
checkpoint: ./lake/_checkpoints/silver
flows:
  - name: sales
    source:
      files:
        path: ./landing/sales
        format: json
        schema: "invoice_id BIGINT, store_id BIGINT, day STRING, amount_cents BIGINT"
        max_files_per_batch: 1
    sink: { table: ./lake/silver/sales }
  - name: stores
    source:
      files:
        path: ./landing/stores
        format: json
        schema: "store_id BIGINT, name STRING, region STRING"
    sink: { table: ./lake/silver/stores }
"#
    .to_string()
}

/// Daily sales per store.
pub const DAILY_SALES: &str = "SELECT store_id, day, SUM(amount_cents) AS sales_cents, COUNT(*) AS invoices \
     FROM source GROUP BY store_id, day";

/// Sales per region and day, joining the store dimension.
pub const REGION_SALES: &str = "SELECT s.region, i.day, SUM(i.amount_cents) AS sales_cents, COUNT(*) AS invoices \
     FROM source i JOIN stores s ON i.store_id = s.store_id GROUP BY s.region, i.day";

/// The daily-sales flow over the sales table at `silver`, running on
/// `engine`, into `lake/<gold>/daily_sales`.
pub fn daily_sales_flow(engine: &str, silver: &str, gold: &str) -> String {
    format!(
        r#"  - name: daily_sales
    engine: {engine}
    source: {{ delta: {{ table: {silver} }} }}
    transform: "{DAILY_SALES}"
    sink: {{ table: ./lake/{gold}/daily_sales, mode: overwrite }}
"#
    )
}

/// A pipeline named `name` of `flows` (each as [`daily_sales_flow`] writes one).
pub fn pipeline_of(name: &str, flows: &[String]) -> String {
    format!("pipeline: {name}\ncheckpoint: ./lake/_checkpoints/{name}\nflows:\n{}", flows.concat())
}

/// A pipeline of the two gold flows over the silver tables, each running on
/// `engine`, writing below `lake/<gold>/`.
pub fn gold_pipeline(name: &str, gold: &str, engine: &str) -> String {
    let region = format!(
        r#"  - name: region_sales
    engine: {engine}
    source: {{ delta: {{ table: ./lake/silver/sales }} }}
    tables: {{ stores: ./lake/silver/stores }}
    transform: "{REGION_SALES}"
    sink: {{ table: ./lake/{gold}/region_sales, mode: overwrite }}
"#
    );
    pipeline_of(name, &[daily_sales_flow(engine, "./lake/silver/sales", gold), region])
}

/// Lands `files` files of sales and the stores, and loads them into the
/// silver tables with the embedded runtime.
pub fn load_silver(sandbox: &Sandbox, files: u64, rows_per_file: u64) {
    write_sales(&sandbox.path("landing/sales"), files, rows_per_file);
    sandbox.write("landing/stores/stores.json", stores_json());
    sandbox.write("silver.yaml", silver_pipeline());
    let output = sandbox.command(&["run", "silver.yaml"]).output().expect("sluice starts");
    assert!(output.status.success(), "loading silver failed: {}", String::from_utf8_lossy(&output.stderr));
}
