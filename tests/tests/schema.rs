//! Schemas: inference with hints, and a column appearing in the middle of a run
//! under each `schema_evolution` mode. The table, its Delta log and the
//! checkpoint's schema versions are read back.

use std::sync::Arc;

use arrow::array::{Int32Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use sluice_tests::harness::{self, Sandbox, log_entries, query_i64, query_string, query_text, table_version};

fn pipeline(source_extra: &str) -> String {
    format!(
        r#"
pipeline: schemas
checkpoint: ./cp
flows:
  - name: events
    source:
      files:
        path: ./in
        format: json
{source_extra}
    sink:
      table: ./lake/events
"#
    )
}

fn json_lines(range: std::ops::Range<i64>, extra: impl Fn(i64) -> String) -> String {
    range.map(|i| format!("{{\"id\": {i}, \"name\": \"n{i}\"{}}}\n", extra(i))).collect()
}

/// The columns of the table's current schema (but `_metadata`), from its Delta log.
fn table_columns(sandbox: &Sandbox, table: &str) -> Vec<String> {
    let metadata = harness::table_metadata(&sandbox.path(table));
    let schema: serde_json::Value =
        serde_json::from_str(metadata["schemaString"].as_str().expect("a schema string")).expect("a JSON schema");
    let names = schema["fields"].as_array().expect("fields").iter().map(|f| f["name"].as_str().unwrap_or_default());
    names.filter(|name| *name != "_metadata").map(str::to_string).collect()
}

#[test]
fn add_new_columns_adds_a_column_in_the_commit_of_the_batch_that_brought_it() {
    let sandbox = Sandbox::new();
    sandbox.write("in/1.json", json_lines(0..50, |_| String::new()));
    sandbox.pipeline(&pipeline("        schema: infer"));
    let first = sandbox.run_ok();
    assert_eq!(first["flows"][0]["schema_version"].as_u64(), Some(1), "{first}");

    // The new column appears half way through a file, in a batch with a file that lacks it.
    let mut second = json_lines(50..100, |_| String::new());
    second.push_str(&json_lines(100..150, |i| format!(", \"color\": \"c{i}\"")));
    sandbox.write("in/2.json", second);
    sandbox.write("in/3.json", json_lines(150..200, |_| String::new()));
    let output = sandbox.run();
    assert_eq!(output.code, Some(0), "{output:?}");
    assert!(output.stderr.contains("new column(s) color"), "the run says what it added:\n{}", output.stderr);
    let summary = output.summary();
    assert_eq!(summary["flows"][0]["schema_version"].as_u64(), Some(2), "{summary}");
    assert_eq!(summary["flows"][0]["schema_added"], serde_json::json!(["color"]), "{summary}");

    let table = sandbox.path("lake/events");
    assert_eq!(query_i64(&table, "SELECT COUNT(*) FROM t"), 200);
    assert_eq!(query_i64(&table, "SELECT COUNT(DISTINCT id) FROM t"), 200);
    assert_eq!(query_i64(&table, "SELECT COUNT(*) FROM t WHERE color IS NOT NULL"), 50);
    assert_eq!(query_string(&table, "SELECT color FROM t WHERE id = 120"), "c120");
    // One commit per batch: the second holds both the new schema and the batch's rows.
    let log = log_entries(&table);
    assert_eq!(log.len(), 2);
    assert!(log[1].iter().any(|a| a.get("metaData").is_some()), "the schema changes in the batch's commit");
    assert!(log[1].iter().any(|a| a["txn"]["version"] == 2), "with the batch's txn");
    assert!(table_columns(&sandbox, "lake/events").contains(&"color".to_string()));
    // The versions are kept in the checkpoint, the second naming what it added and where.
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(sandbox.path("cp/flows/events/schemas/00000000000000000002.json")).expect("schema version 2"),
    )
    .expect("JSON");
    assert_eq!(record["added"], serde_json::json!(["color"]));
    assert!(record["file"].as_str().is_some_and(|f| f.ends_with("/2.json")), "{record}");

    // Later runs use the evolved schema from the checkpoint.
    sandbox.write("in/4.json", json_lines(200..210, |i| format!(", \"color\": \"c{i}\"")));
    let third = sandbox.run_ok();
    assert_eq!(third["flows"][0]["schema_version"].as_u64(), Some(2), "{third}");
    assert_eq!(query_i64(&table, "SELECT COUNT(*) FROM t WHERE color IS NOT NULL"), 60);
}

#[test]
fn fail_on_new_columns_names_the_column_and_file_and_commits_nothing() {
    let sandbox = Sandbox::new();
    sandbox.write("in/1.json", json_lines(0..10, |_| String::new()));
    sandbox.pipeline(&pipeline("        schema: infer\n        schema_evolution: fail_on_new_columns"));
    sandbox.run_ok();
    let table = sandbox.path("lake/events");
    let version = table_version(&table);

    sandbox.write(
        "in/2.json",
        json_lines(10..20, |i| if i == 15 { ", \"color\": \"red\"".to_string() } else { String::new() }),
    );
    let output = sandbox.run();
    assert_ne!(output.code, Some(0));
    let error = format!("{}{}", output.stdout, output.stderr);
    assert!(error.contains("`color`") && error.contains("2.json") && error.contains("line 6"), "{error}");
    assert!(error.contains("fail_on_new_columns"), "{error}");
    assert_eq!(table_version(&table), version, "nothing was committed");
    assert_eq!(query_i64(&table, "SELECT COUNT(*) FROM t"), 10);

    // Fixed at the source, the batch goes through.
    sandbox.write("in/2.json", json_lines(10..20, |_| String::new()));
    sandbox.run_ok();
    assert_eq!(query_i64(&table, "SELECT COUNT(*) FROM t"), 20);
}

#[test]
fn none_ignores_new_columns() {
    let sandbox = Sandbox::new();
    sandbox.write("in/1.json", json_lines(0..10, |_| String::new()));
    sandbox.pipeline(&pipeline("        schema: \"id BIGINT, name STRING\""));
    sandbox.run_ok();
    sandbox.write("in/2.json", json_lines(10..20, |_| ", \"color\": \"red\"".to_string()));
    sandbox.run_ok();
    let table = sandbox.path("lake/events");
    assert_eq!(query_i64(&table, "SELECT COUNT(*) FROM t"), 20);
    assert_eq!(table_columns(&sandbox, "lake/events"), vec!["id", "name"]);
}

#[test]
fn rescue_keeps_the_schema_and_puts_unknown_fields_and_misfits_in_rescued_data() {
    let sandbox = Sandbox::new();
    sandbox.write("in/1.json", json_lines(0..10, |_| String::new()));
    sandbox.pipeline(&pipeline("        schema: \"id BIGINT, name STRING\"\n        schema_evolution: rescue"));
    sandbox.run_ok();
    let mut second = json_lines(10..20, |i| if i == 12 { ", \"color\": \"red\"".to_string() } else { String::new() });
    second.push_str("{\"id\": \"twenty\", \"name\": \"n20\"}\nnot json\n");
    sandbox.write("in/2.json", second);
    let summary = sandbox.run_ok();
    assert_eq!(summary["flows"][0]["quality"]["malformed_rows"].as_u64(), Some(1), "{summary}");

    let table = sandbox.path("lake/events");
    assert_eq!(table_columns(&sandbox, "lake/events"), vec!["id", "name", "_rescued_data"]);
    assert_eq!(query_i64(&table, "SELECT COUNT(*) FROM t"), 21, "every record is in the table");
    assert_eq!(query_i64(&table, "SELECT COUNT(*) FROM t WHERE _rescued_data IS NOT NULL"), 2);
    let rescued: serde_json::Value =
        serde_json::from_str(&query_string(&table, "SELECT _rescued_data FROM t WHERE id = 12")).expect("JSON");
    assert_eq!(rescued["color"], "red");
    assert!(rescued["_file_path"].as_str().is_some_and(|f| f.ends_with("/2.json")), "{rescued}");
    let misfit: serde_json::Value =
        serde_json::from_str(&query_string(&table, "SELECT _rescued_data FROM t WHERE name = 'n20'")).expect("JSON");
    assert_eq!(misfit["id"], "twenty", "the value that did not fit is kept as it was");
    assert_eq!(query_i64(&table, "SELECT COUNT(*) FROM t WHERE name = 'n20' AND id IS NULL"), 1);
    // What is not a record at all still goes to quarantine.
    let quarantine = sandbox.path("lake/events_quarantine");
    assert_eq!(query_string(&quarantine, "SELECT raw FROM t"), "not json");
}

#[test]
fn csv_columns_are_matched_by_header_and_evolve_or_are_rescued() {
    let sandbox = Sandbox::new();
    let flow = |name: &str, path: &str, extra: &str| {
        format!(
            r#"
  - name: {name}
    source:
      files: {{ path: {path}, format: csv{extra} }}
    sink:
      table: ./lake/{name}
"#
        )
    };
    sandbox.pipeline(&format!(
        "pipeline: csvs\ncheckpoint: ./cp\nflows:{}{}",
        flow("evolving", "./in", ""),
        flow("rescuing", "./in", ", schema: \"id BIGINT, qty BIGINT\", schema_evolution: rescue")
    ));
    sandbox.write("in/1.csv", "id,qty\n1,10\n2,20\n");
    sandbox.run_ok();
    // A new column, in another position, and a value that does not fit.
    sandbox.write("in/2.csv", "qty,shop,id\n30,north,3\nmany,south,4\n");
    let summary = sandbox.run_ok();

    let evolving = sandbox.path("lake/evolving");
    assert_eq!(table_columns(&sandbox, "lake/evolving"), vec!["id", "qty", "shop"]);
    assert_eq!(query_text(&evolving, "SELECT id, qty, shop FROM t WHERE id = 3").matches("north").count(), 1);
    assert_eq!(query_i64(&evolving, "SELECT qty FROM t WHERE id = 3"), 30, "columns are matched by name");
    // In the evolving flow `qty` is BIGINT: "many" goes to quarantine.
    assert_eq!(query_i64(&evolving, "SELECT COUNT(*) FROM t"), 3, "{summary}");

    let rescuing = sandbox.path("lake/rescuing");
    assert_eq!(table_columns(&sandbox, "lake/rescuing"), vec!["id", "qty", "_rescued_data"]);
    assert_eq!(query_i64(&rescuing, "SELECT COUNT(*) FROM t"), 4);
    let rescued: serde_json::Value =
        serde_json::from_str(&query_string(&rescuing, "SELECT _rescued_data FROM t WHERE id = 4")).expect("JSON");
    assert_eq!((rescued["qty"].as_str(), rescued["shop"].as_str()), (Some("many"), Some("south")), "{rescued}");
}

fn write_parquet(path: &std::path::Path, with_code: bool) {
    let mut fields = vec![Field::new("id", DataType::Int64, true)];
    let mut columns: Vec<Arc<dyn arrow::array::Array>> = vec![Arc::new(Int64Array::from(vec![1, 2]))];
    if with_code {
        fields.push(Field::new("code", DataType::Int32, true));
        columns.push(Arc::new(Int32Array::from(vec![7, 8])));
    } else {
        fields.push(Field::new("label", DataType::Utf8, true));
        columns.push(Arc::new(StringArray::from(vec!["a", "b"])));
    }
    let schema = Arc::new(Schema::new(fields));
    let batch = RecordBatch::try_new(schema, columns).expect("a batch");
    harness::write_parquet(path, &batch);
}

#[test]
fn parquet_files_with_a_new_column_evolve_the_table() {
    let sandbox = Sandbox::new();
    write_parquet(&sandbox.path("in/a.parquet"), false);
    sandbox.pipeline(
        "pipeline: pq\ncheckpoint: ./cp\nflows:\n  - name: items\n    source:\n      files: { path: ./in, format: parquet }\n    sink:\n      table: ./lake/items\n",
    );
    sandbox.run_ok();
    write_parquet(&sandbox.path("in/b.parquet"), true);
    sandbox.run_ok();
    let table = sandbox.path("lake/items");
    assert_eq!(table_columns(&sandbox, "lake/items"), vec!["id", "label", "code"]);
    assert_eq!(query_i64(&table, "SELECT SUM(code) FROM t"), 15);
    assert_eq!(query_i64(&table, "SELECT COUNT(*) FROM t WHERE label IS NULL"), 2);
}

#[test]
fn schema_hints_override_inferred_types() {
    let sandbox = Sandbox::new();
    sandbox.write("in/1.json", "{\"id\": 1, \"amount\": 3}\n{\"id\": 2, \"amount\": 4}\n");
    sandbox.pipeline(&pipeline("        schema: infer\n        schema_hints: \"amount DOUBLE, note STRING\""));
    sandbox.run_ok();
    let table = sandbox.path("lake/events");
    assert_eq!(table_columns(&sandbox, "lake/events"), vec!["id", "amount", "note"]);
    assert_eq!(query_string(&table, "SELECT arrow_typeof(amount) FROM t LIMIT 1"), "Float64");

    // Hints need an inferred schema.
    sandbox.pipeline(&pipeline("        schema: \"id BIGINT\"\n        schema_hints: \"amount DOUBLE\""));
    let output = sandbox.run();
    assert_ne!(output.code, Some(0));
    assert!(output.stderr.contains("schema_hints"), "{}", output.stderr);
}

#[test]
fn add_new_columns_evolves_a_merge_sink_too() {
    let sandbox = Sandbox::new();
    sandbox.write("in/1.json", "{\"id\": 1, \"v\": \"a\", \"seq\": 1}\n{\"id\": 2, \"v\": \"b\", \"seq\": 1}\n");
    sandbox.pipeline(
        r#"
pipeline: schemas
checkpoint: ./cp
flows:
  - name: events
    source:
      files: { path: ./in, format: json, schema: infer }
    transform: SELECT * EXCEPT (_metadata) FROM source
    sink:
      table: ./lake/events
      mode: merge
      keys: [id]
      sequence_by: seq
"#,
    );
    sandbox.run_ok();
    // An update of a key that exists and a new key, both with a new column.
    sandbox.write(
        "in/2.json",
        "{\"id\": 2, \"v\": \"b2\", \"seq\": 2, \"color\": \"red\"}\n{\"id\": 3, \"v\": \"c\", \"seq\": 1, \"color\": \"blue\"}\n",
    );
    let summary = sandbox.run_ok();
    assert_eq!(summary["flows"][0]["schema_added"], serde_json::json!(["color"]), "{summary}");
    let table = sandbox.path("lake/events");
    let rows = query_text(&table, "SELECT id, v, color FROM t ORDER BY id");
    assert!(rows.contains("| 1  | a  |       |"), "{rows}");
    assert!(rows.contains("| 2  | b2 | red   |"), "{rows}");
    assert!(rows.contains("| 3  | c  | blue  |"), "{rows}");
    assert!(table_columns(&sandbox, "lake/events").contains(&"color".to_string()));
}
