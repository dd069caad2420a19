//! Bronze ingest through the real `sluice` binary, checked by reading the
//! Delta table back: first run, idempotent rerun, new files only, rewritten
//! files, nested JSON, CSV, Parquet, a partitioned sink, broken input.

use std::sync::Arc;

use arrow::array::{Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use sluice_tests::harness::{
    self, Sandbox, commit_infos, log_entries, query_i64, query_string, query_text, table_version,
};
use sluice_tests::invoices::{INVOICE_SCHEMA, invoice, write_invoice_file};

const PIPELINE: &str = r#"
pipeline: retail
checkpoint: ./lake/_checkpoints/retail
trigger: available_now
flows:
  - name: invoices_bronze
    source:
      files:
        path: ./landing/invoices
        format: json
        glob: "*.json"
        schema: "SCHEMA"
        max_files_per_batch: 2
    transform: |
      SELECT *, _metadata.file_path AS source_file FROM source
    sink:
      table: ./lake/bronze/invoices
"#;

fn pipeline() -> String {
    PIPELINE.replace("SCHEMA", INVOICE_SCHEMA)
}

fn write_invoices(sandbox: &Sandbox, name: &str, seed: u64, first: u64, count: u64) {
    write_invoice_file(&sandbox.path(&format!("landing/invoices/{name}")), seed, first, count).expect("write invoices");
}

/// The txn versions committed for the flow, in log order.
fn txn_versions(table: &std::path::Path) -> Vec<i64> {
    log_entries(table)
        .iter()
        .flatten()
        .filter_map(|action| action.get("txn"))
        .filter(|txn| txn["appId"] == "sluice:retail/invoices_bronze")
        .map(|txn| txn["version"].as_i64().expect("a txn version"))
        .collect()
}

#[test]
fn first_run_ingests_every_file_once_and_reruns_add_only_new_files() {
    let sandbox = Sandbox::new();
    for (n, name) in ["a.json", "b.json", "c.json"].iter().enumerate() {
        write_invoices(&sandbox, name, 1, n as u64 * 40, 40);
    }
    sandbox.write("landing/invoices/notes.txt", "not matched by the glob");
    sandbox.write("landing/invoices/_SUCCESS", "");
    sandbox.pipeline(&pipeline());
    let table = sandbox.path("lake/bronze/invoices");

    let summary = sandbox.run_ok();
    assert_eq!(
        (summary["batches"].as_u64(), summary["files"].as_u64(), summary["rows"].as_u64()),
        (Some(2), Some(3), Some(120)),
        "{summary}"
    );
    assert_eq!(query_i64(&table, "SELECT COUNT(*) FROM t"), 120);
    assert_eq!(query_i64(&table, r#"SELECT COUNT(DISTINCT "InvoiceNumber") FROM t"#), 120);
    assert_eq!(query_i64(&table, "SELECT COUNT(DISTINCT source_file) FROM t"), 3);
    assert_eq!(
        query_i64(
            &table,
            r#"SELECT COUNT(*) FROM t WHERE _metadata['file_name'] = 'b.json' AND _metadata['file_size'] > 0"#
        ),
        40
    );
    assert_eq!(txn_versions(&table), vec![1, 2], "one commit per batch, each with its txn");
    assert_eq!(table_version(&table), Some(1));

    // Nested columns load as nested Delta columns.
    let expected_items: i64 = (0..120).map(|i| invoice(1, i).invoice_line_items.len() as i64).sum();
    assert_eq!(query_i64(&table, r#"SELECT SUM(array_length("InvoiceLineItems")) FROM t"#), expected_items);
    let expected_cities = (0..120).filter(|i| invoice(1, *i).delivery_address.is_some()).count() as i64;
    assert_eq!(query_i64(&table, r#"SELECT COUNT("DeliveryAddress"['City']) FROM t"#), expected_cities);
    let first = invoice(1, 7);
    let text =
        query_text(&table, r#"SELECT "InvoiceLineItems"[1]['ItemCode'] AS code FROM t WHERE "InvoiceNumber" = '1-7'"#);
    assert!(text.contains(&first.invoice_line_items[0].item_code), "{text}");

    // commitInfo names the batch.
    let infos = commit_infos(&table);
    assert_eq!(infos[1]["sluice.batch"], 2, "{:?}", infos[1]);

    // The event log: one row per committed batch.
    let events = sandbox.path("lake/_checkpoints/retail/_event_log");
    assert_eq!(query_i64(&events, "SELECT SUM(rows) FROM t WHERE kind = 'batch' AND flow = 'invoices_bronze'"), 120);
    assert_eq!(query_text(&events, "SELECT batch, delta_version, files FROM t ORDER BY batch").lines().count(), 6);

    // A second run with nothing new commits nothing.
    let summary = sandbox.run_ok();
    assert_eq!(summary["batches"].as_u64(), Some(0), "{summary}");
    assert_eq!(table_version(&table), Some(1));
    assert_eq!(query_i64(&events, "SELECT COUNT(*) FROM t"), 2, "nothing to log");

    // A third run ingests only the new file.
    write_invoices(&sandbox, "d.json", 1, 120, 25);
    let summary = sandbox.run_ok();
    assert_eq!((summary["batches"].as_u64(), summary["rows"].as_u64()), (Some(1), Some(25)), "{summary}");
    assert_eq!(query_i64(&table, "SELECT COUNT(*) FROM t"), 145);
    assert_eq!(query_i64(&table, r#"SELECT COUNT(DISTINCT "InvoiceNumber") FROM t"#), 145);
    assert_eq!(txn_versions(&table), vec![1, 2, 3]);
}

#[test]
fn a_rewritten_file_is_skipped_with_a_warning_unless_overwrites_are_allowed() {
    let sandbox = Sandbox::new();
    write_invoices(&sandbox, "a.json", 1, 0, 10);
    sandbox.pipeline(&pipeline());
    let table = sandbox.path("lake/bronze/invoices");
    sandbox.run_ok();

    write_invoices(&sandbox, "a.json", 2, 0, 6);
    let output = sandbox.run();
    assert_eq!(output.code, Some(0), "{output:?}");
    assert!(output.stderr.contains("a.json changed after it was ingested"), "{}", output.stderr);
    assert_eq!(query_i64(&table, "SELECT COUNT(*) FROM t"), 10);

    sandbox.pipeline(
        &pipeline().replace("max_files_per_batch: 2", "max_files_per_batch: 2\n        allow_overwrites: true"),
    );
    let summary = sandbox.run_ok();
    assert_eq!(summary["rows"].as_u64(), Some(6), "{summary}");
    assert_eq!(query_i64(&table, "SELECT COUNT(*) FROM t WHERE \"InvoiceNumber\" LIKE '2-%'"), 6);
    assert_eq!(sandbox.run_ok()["batches"].as_u64(), Some(0), "the new content is ingested once");
}

#[test]
fn with_on_malformed_fail_a_broken_json_line_fails_the_batch_naming_file_and_line_and_a_fixed_file_is_ingested() {
    let sandbox = Sandbox::new();
    write_invoices(&sandbox, "a.json", 1, 0, 5);
    let good = |i| serde_json::to_string(&invoice(3, i)).expect("json");
    let broken = format!(
        "{}\n{}\n{{\"InvoiceNumber\": \"x\", \"CreatedTime\": \"yesterday\"}}\n{}\n",
        good(0),
        good(1),
        good(2)
    );
    sandbox.write("landing/invoices/b.json", &broken);
    sandbox
        .pipeline(&pipeline().replace("max_files_per_batch: 2", "max_files_per_batch: 2\n        on_malformed: fail"));
    let table = sandbox.path("lake/bronze/invoices");

    let output = sandbox.run();
    assert_eq!(output.code, Some(1), "{output:?}");
    assert!(output.stderr.contains("b.json: line 3:"), "{}", output.stderr);
    assert!(output.stderr.contains("nothing of it was committed"), "{}", output.stderr);
    assert_eq!(table_version(&table), None, "nothing of the failed batch is in the table");

    // A truncated line is reported the same way.
    sandbox.write("landing/invoices/b.json", format!("{}\n{{\"InvoiceNumber\": \"y\"\n", good(0)));
    let output = sandbox.run();
    assert_eq!(output.code, Some(1), "{output:?}");
    assert!(output.stderr.contains("b.json: line 2:"), "{}", output.stderr);

    let fixed = format!("{}\n{}\n{}\n", good(0), good(1), good(2));
    sandbox.write("landing/invoices/b.json", &fixed);
    let output = sandbox.run();
    assert_eq!(output.code, Some(0), "{output:?}");
    assert!(output.stderr.contains("resuming batch 1"), "the failed batch is finished: {}", output.stderr);
    assert!(
        !output.stderr.contains("changed after it was ingested"),
        "a fixed file is not a rewrite: {}",
        output.stderr
    );
    assert_eq!(output.summary()["rows"].as_u64(), Some(8), "{output:?}");
    assert_eq!(query_i64(&table, "SELECT COUNT(*) FROM t"), 8);

    // The event log in the checkpoint holds both failures and the batch.
    let events = sandbox.path("lake/_checkpoints/retail/_event_log");
    assert_eq!(query_i64(&events, "SELECT COUNT(*) FROM t WHERE kind = 'error' AND error LIKE '%b.json: line%'"), 2);
    let batch = query_text(
        &events,
        "SELECT pipeline, flow, batch, delta_version, files, rows, quarantined_rows FROM t WHERE kind = 'batch'",
    );
    assert!(
        batch.contains("| retail   | invoices_bronze | 1     | 0             | 2     | 8    | 0                |"),
        "{batch}"
    );
}

#[test]
fn csv_files_with_options_and_a_bad_row() {
    let sandbox = Sandbox::new();
    sandbox.write("in/a.csv", "id;name;amount\n1;apple;1.5\n2;pear;2.25\n");
    sandbox.write("in/b.csv", "id;name;amount\n3;plum;4\n");
    sandbox.write("in/empty.csv", "id;name;amount\n");
    sandbox.pipeline(
        r#"
pipeline: shop
checkpoint: ./cp
flows:
  - name: sales
    source:
      files:
        path: ./in
        format: csv
        schema: "id BIGINT, name STRING, amount DOUBLE"
        csv: { header: true, delimiter: ";" }
    sink:
      table: ./lake/sales
"#,
    );
    let table = sandbox.path("lake/sales");
    let summary = sandbox.run_ok();
    assert_eq!((summary["files"].as_u64(), summary["rows"].as_u64()), (Some(3), Some(3)), "{summary}");
    assert_eq!(query_i64(&table, "SELECT CAST(SUM(amount) * 100 AS BIGINT) FROM t"), 775);
    assert_eq!(query_i64(&table, "SELECT id FROM t WHERE name = 'pear'"), 2);

    // A row with too few fields goes to the quarantine table; the rest of the file is ingested.
    sandbox.write("in/c.csv", "id;name;amount\n4;fig;1\n5;kiwi\n6;lime;3\n");
    let summary = sandbox.run_ok();
    assert_eq!(summary["rows"].as_u64(), Some(2), "{summary}");
    assert_eq!(query_i64(&table, "SELECT COUNT(*) FROM t"), 5);
    let quarantine = sandbox.path("lake/sales_quarantine");
    let entry = query_string(&quarantine, "SELECT concat_ws('|', kind, file_path, line, raw, error) FROM t");
    assert!(entry.starts_with("record|file://") && entry.contains("c.csv|3|5;kiwi|"), "{entry}");
    assert!(entry.ends_with("incorrect number of fields, expected 3 got 2"), "{entry}");
}

fn write_parquet(path: &std::path::Path, ids: &[i64]) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("label", DataType::Utf8, true),
    ]));
    let labels: Vec<String> = ids.iter().map(|i| format!("label-{i}")).collect();
    let batch = RecordBatch::try_new(
        schema,
        vec![Arc::new(Int64Array::from(ids.to_vec())), Arc::new(StringArray::from(labels))],
    )
    .expect("a batch");
    harness::write_parquet(path, &batch);
}

#[test]
fn parquet_files_with_an_inferred_schema_and_a_corrupt_file() {
    let sandbox = Sandbox::new();
    write_parquet(&sandbox.path("in/a.parquet"), &[1, 2, 3]);
    write_parquet(&sandbox.path("in/b.parquet"), &[4, 5]);
    sandbox.pipeline(
        r#"
pipeline: p
checkpoint: ./cp
flows:
  - name: things
    source:
      files: { path: ./in, format: parquet, schema: infer }
    transform: SELECT id, upper(label) AS label, _metadata.file_name AS file FROM source
    sink:
      table: ./lake/things
"#,
    );
    let table = sandbox.path("lake/things");
    let summary = sandbox.run_ok();
    assert_eq!(summary["rows"].as_u64(), Some(5), "{summary}");
    assert_eq!(query_i64(&table, "SELECT SUM(id) FROM t WHERE file = 'b.parquet'"), 9);
    assert_eq!(query_i64(&table, "SELECT COUNT(*) FROM t WHERE label = 'LABEL-3'"), 1);
    assert!(
        sandbox.path("cp/flows/things/schemas/00000000000000000001.json").exists(),
        "the inferred schema is kept in the checkpoint"
    );

    // A file that cannot be read is a file-level quarantine entry; the batch goes on.
    sandbox.write("in/c.parquet", b"PAR1 this is not a parquet file");
    write_parquet(&sandbox.path("in/d.parquet"), &[6]);
    let summary = sandbox.run_ok();
    assert_eq!((summary["files"].as_u64(), summary["rows"].as_u64()), (Some(2), Some(1)), "{summary}");
    assert_eq!(summary["flows"][0]["quality"]["unreadable_files"].as_u64(), Some(1), "{summary}");
    assert_eq!(query_i64(&table, "SELECT COUNT(*) FROM t"), 6);
    let quarantine = sandbox.path("lake/things_quarantine");
    let entry = query_string(&quarantine, "SELECT concat_ws('|', kind, file_path, error) FROM t WHERE line IS NULL");
    assert!(entry.starts_with("file|file://") && entry.contains("c.parquet|not a readable Parquet file"), "{entry}");
}

#[test]
fn inferred_json_schema_keeps_nested_types() {
    let sandbox = Sandbox::new();
    write_invoices(&sandbox, "a.json", 5, 0, 30);
    sandbox.pipeline(&pipeline().replace(&format!("\"{INVOICE_SCHEMA}\""), "infer"));
    let table = sandbox.path("lake/bronze/invoices");
    let summary = sandbox.run_ok();
    assert_eq!(summary["rows"].as_u64(), Some(30), "{summary}");
    let expected_items: i64 = (0..30).map(|i| invoice(5, i).invoice_line_items.len() as i64).sum();
    assert_eq!(query_i64(&table, r#"SELECT SUM(array_length("InvoiceLineItems")) FROM t"#), expected_items);
    assert_eq!(query_i64(&table, r#"SELECT SUM("NumberOfItems") FROM t"#), expected_items);
}

#[test]
fn a_partitioned_sink_writes_partition_folders() {
    let sandbox = Sandbox::new();
    write_invoices(&sandbox, "a.json", 1, 0, 50);
    write_invoices(&sandbox, "b.json", 1, 50, 50);
    sandbox.pipeline(&pipeline().replace(
        "      table: ./lake/bronze/invoices",
        "      table: ./lake/bronze/invoices\n      partition_by: [StoreID]",
    ));
    let table = sandbox.path("lake/bronze/invoices");
    sandbox.run_ok();
    assert_eq!(query_i64(&table, "SELECT COUNT(*) FROM t"), 100);
    let stores: std::collections::BTreeSet<String> = (0..100).map(|i| invoice(1, i).store_id).collect();
    assert_eq!(query_i64(&table, r#"SELECT COUNT(DISTINCT "StoreID") FROM t"#), stores.len() as i64);
    for store in &stores {
        assert!(table.join(format!("StoreID={store}")).is_dir(), "no folder for partition {store}");
    }
    let expected = (0..100).filter(|i| invoice(1, *i).store_id == "STR7188").count() as i64;
    assert_eq!(query_i64(&table, r#"SELECT COUNT(*) FROM t WHERE "StoreID" = 'STR7188'"#), expected);
}

#[test]
fn a_missing_source_folder_is_a_clear_error() {
    let sandbox = Sandbox::new();
    sandbox.pipeline(&pipeline());
    let output = sandbox.run();
    assert_eq!(output.code, Some(1), "{output:?}");
    assert!(
        output.stderr.contains("the source folder") && output.stderr.contains("landing/invoices/ does not exist"),
        "{}",
        output.stderr
    );
}

#[test]
fn empty_files_are_counted_and_change_nothing() {
    let sandbox = Sandbox::new();
    sandbox.write("landing/invoices/empty.json", "");
    write_invoices(&sandbox, "a.json", 1, 0, 3);
    sandbox.pipeline(&pipeline());
    let summary = sandbox.run_ok();
    assert_eq!((summary["files"].as_u64(), summary["rows"].as_u64()), (Some(2), Some(3)), "{summary}");
}

/// The table's configuration.
fn table_configuration(table: &std::path::Path) -> serde_json::Value {
    harness::table_metadata(table)["configuration"].clone()
}

#[test]
fn sink_tables_get_change_data_feed_unless_properties_say_otherwise() {
    let sandbox = Sandbox::new();
    write_invoices(&sandbox, "a.json", 1, 0, 3);
    sandbox.pipeline(&pipeline());
    sandbox.run_ok();
    let config = table_configuration(&sandbox.path("lake/bronze/invoices"));
    assert_eq!(config["delta.enableChangeDataFeed"], "true", "{config}");

    let sandbox = Sandbox::new();
    write_invoices(&sandbox, "a.json", 1, 0, 3);
    let with_properties = pipeline().replace(
        "      table: ./lake/bronze/invoices",
        "      table: ./lake/bronze/invoices\n      properties: { delta.enableChangeDataFeed: false, delta.appendOnly: true }",
    );
    sandbox.pipeline(&with_properties);
    sandbox.run_ok();
    let config = table_configuration(&sandbox.path("lake/bronze/invoices"));
    assert_eq!(
        (config["delta.enableChangeDataFeed"].as_str(), config["delta.appendOnly"].as_str()),
        (Some("false"), Some("true")),
        "{config}"
    );
}

/// Time-prefixed names: once full listings have shown keys arriving in
/// lexical order (three in a row whose new files all lay above the greatest
/// key ingested), each run lists only after that key. A file that lands
/// under a smaller key is then not seen until a backfill (a full listing,
/// every `backfill_interval`) finds it; from then on `listing: auto` lists in
/// full, as the history is out of order.
#[test]
fn listing_starts_after_the_last_key_until_a_backfill_finds_a_late_one() {
    let sandbox = Sandbox::new();
    let pipeline = |backfill: &str| {
        pipeline().replace(
            "max_files_per_batch: 2",
            &format!("max_files_per_batch: 2\n        backfill_interval: {backfill}"),
        )
    };
    sandbox.pipeline(&pipeline("1d"));
    let table = sandbox.path("lake/bronze/invoices");
    let run = || {
        let output: harness::RunOutput = sandbox
            .command(&["run", "pipeline.yaml", "--json"])
            .env("SLUICE_LOG", "warn,sluice_coordinator=debug")
            .output()
            .expect("sluice starts")
            .into();
        assert_eq!(output.code, Some(0), "{output:?}");
        output.stderr
    };
    let (full, incremental) = (r#"listing="full""#, r#"listing="incremental""#);
    write_invoices(&sandbox, "2026-01-01.json", 1, 0, 40);
    write_invoices(&sandbox, "2026-01-02.json", 1, 40, 40);
    assert!(run().contains(full), "the first listing is a full one");
    for day in 3..=5 {
        write_invoices(&sandbox, &format!("2026-01-0{day}.json"), 1, (day - 1) * 40, 40);
        let stderr = run();
        assert!(stderr.contains(full) && !stderr.contains(incremental), "day {day}: {stderr}");
    }
    write_invoices(&sandbox, "2026-01-06.json", 1, 200, 40);
    let stderr = run();
    assert!(stderr.contains(incremental) && !stderr.contains(full), "{stderr}");
    assert_eq!(query_i64(&table, "SELECT COUNT(*) FROM t"), 240);

    // Late: below the greatest key. An incremental listing does not reach it.
    write_invoices(&sandbox, "2026-01-02-late.json", 1, 240, 40);
    assert!(run().contains(incremental));
    assert_eq!(query_i64(&table, "SELECT COUNT(*) FROM t"), 240);

    // A backfill is due: the full listing finds it.
    sandbox.pipeline(&pipeline("1ms"));
    let stderr = run();
    assert!(stderr.contains("backfill") && stderr.contains(full), "{stderr}");
    assert_eq!(query_i64(&table, "SELECT COUNT(*) FROM t"), 280);

    // The history is out of order now: every listing is full, and late keys are found at once.
    sandbox.pipeline(&pipeline("1d"));
    write_invoices(&sandbox, "2026-01-01-late.json", 1, 280, 40);
    let stderr = run();
    assert!(stderr.contains(full) && !stderr.contains(incremental) && !stderr.contains("backfill:"), "{stderr}");
    assert_eq!(query_i64(&table, "SELECT COUNT(*) FROM t"), 320);
    assert_eq!(query_i64(&table, r#"SELECT COUNT(DISTINCT "InvoiceNumber") FROM t"#), 320);
}
