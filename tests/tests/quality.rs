//! Bad input never stops a pipeline and no row is lost: every input line ends
//! up in the table or in the quarantine table, which says where it came from;
//! expectations warn, drop, quarantine or fail, and are counted; a batch run
//! again after a crash adds nothing twice to either table.

use std::time::Duration;

use sluice_tests::harness::{
    Sandbox, commit_infos, kill_hard, query_i64, query_string, table_version, txn_versions, write_parquet,
};

const JSON_PIPELINE: &str = r#"
pipeline: quality
checkpoint: ./cp
flows:
  - name: events
    source:
      files: { path: ./in, format: json, schema: "id BIGINT, name STRING, amount DOUBLE" }
    sink:
      table: ./lake/events
"#;

/// Non-blank lines of a file.
fn lines(bytes: &[u8]) -> i64 {
    bytes.split(|b| *b == b'\n').filter(|l| l.iter().any(|b| !b.is_ascii_whitespace())).count() as i64
}

fn good(id: i64) -> String {
    format!(r#"{{"id": {id}, "name": "n{id}", "amount": {id}.5}}"#)
}

#[test]
fn every_bad_json_line_is_quarantined_with_its_file_line_and_text() {
    let sandbox = Sandbox::new();
    let mut files: Vec<(&str, Vec<u8>)> = vec![
        ("good.json", (1..=5).map(|i| good(i) + "\n").collect::<String>().into_bytes()),
        ("truncated.json", format!("{}\n{{\"id\": 7, \"name\": \"tr\n{}\n", good(6), good(8)).into_bytes()),
        ("not-json.json", format!("hello world\n{}\n", good(9)).into_bytes()),
        ("wrong-type.json", format!("{{\"id\": \"ten\", \"amount\": 1}}\n\n{}\n", good(11)).into_bytes()),
        ("array.json", format!("[12, 13]\n{}", good(14)).into_bytes()),
        // A fraction in an integer column is not truncated into it.
        ("fraction.json", format!("{{\"id\": 17.5, \"name\": \"half\"}}\n{}\n", good(18)).into_bytes()),
        ("empty.json", Vec::new()),
    ];
    let mut not_utf8 = format!("{}\n", good(15)).into_bytes();
    not_utf8.extend_from_slice(b"{\"id\": 16, \"name\": \"\xff\xfe\"}\n");
    files.push(("not-utf8.json", not_utf8));
    for (name, bytes) in &files {
        sandbox.write(&format!("in/{name}"), bytes);
    }
    sandbox.pipeline(JSON_PIPELINE);
    let summary = sandbox.run_ok();
    let table = sandbox.path("lake/events");
    let quarantine = sandbox.path("lake/events_quarantine");
    assert_eq!(summary["files"].as_u64(), Some(files.len() as u64), "{summary}");
    assert_eq!(summary["flows"][0]["quality"]["malformed_rows"].as_u64(), Some(6), "{summary}");

    // Per file: rows in the table + rows in quarantine = the file's lines.
    for (name, bytes) in &files {
        let kept = query_i64(&table, &format!("SELECT COUNT(*) FROM t WHERE id IN ({})", ids_of(bytes)));
        let set_aside = query_i64(&quarantine, &format!("SELECT COUNT(*) FROM t WHERE file_path LIKE '%/{name}'"));
        assert_eq!(kept + set_aside, lines(bytes), "{name}: {kept} in the table, {set_aside} in quarantine");
    }
    let entry = |file: &str| {
        query_string(
            &quarantine,
            &format!("SELECT concat_ws('|', kind, line, raw_encoding, raw) FROM t WHERE file_path LIKE '%/{file}'"),
        )
    };
    assert_eq!(entry("truncated.json"), "record|2|text|{\"id\": 7, \"name\": \"tr");
    assert_eq!(entry("not-json.json"), "record|1|text|hello world");
    assert_eq!(entry("wrong-type.json"), "record|1|text|{\"id\": \"ten\", \"amount\": 1}");
    assert_eq!(entry("array.json"), "record|1|text|[12, 13]");
    assert_eq!(entry("fraction.json"), "record|1|text|{\"id\": 17.5, \"name\": \"half\"}");
    // Bytes that are not UTF-8 are kept exactly, base64-encoded.
    assert_eq!(entry("not-utf8.json"), "record|2|base64|eyJpZCI6IDE2LCAibmFtZSI6ICL//iJ9");
    let error = query_string(&quarantine, "SELECT error FROM t WHERE file_path LIKE '%/wrong-type.json'");
    assert!(error.contains("ten"), "the error says what did not fit: {error}");
    assert_eq!(query_i64(&quarantine, "SELECT COUNT(*) FROM t WHERE batch = 1 AND flow = 'events'"), 6);
    assert_eq!(query_i64(&table, "SELECT COUNT(*) FROM t"), 12);
}

/// A Parquet file whose `id` is DOUBLE and `amount` STRING, for a table of
/// `id BIGINT, amount DOUBLE`: rows 2 and 3 each hold a value that does not fit.
fn write_misfit_parquet(sandbox: &Sandbox) {
    use arrow::array::{Float64Array, RecordBatch, StringArray};
    use std::sync::Arc;
    let batch = RecordBatch::try_from_iter([
        ("id", Arc::new(Float64Array::from(vec![1.0, 2.5, 3.0, 4.0])) as arrow::array::ArrayRef),
        ("name", Arc::new(StringArray::from(vec!["a", "b", "c", "d"]))),
        ("amount", Arc::new(StringArray::from(vec![Some("1.5"), Some("2"), Some("lots"), None]))),
    ])
    .expect("a batch");
    write_parquet(&sandbox.path("in/mixed.parquet"), &batch);
}

#[test]
fn parquet_values_that_do_not_fit_are_quarantined_by_row_or_rescued() {
    let sandbox = Sandbox::new();
    write_misfit_parquet(&sandbox);
    sandbox.pipeline(&JSON_PIPELINE.replace("format: json", "format: parquet"));
    let summary = sandbox.run_ok();
    assert_eq!(summary["flows"][0]["quality"]["malformed_rows"].as_u64(), Some(2), "{summary}");
    let table = sandbox.path("lake/events");
    assert_eq!(
        query_string(&table, "SELECT string_agg(concat_ws(':', id, amount), ',' ORDER BY id) FROM t"),
        "1:1.5,4"
    );
    let quarantine = sandbox.path("lake/events_quarantine");
    let entries = query_string(
        &quarantine,
        "SELECT string_agg(concat_ws('|', kind, line, raw, error), '\n' ORDER BY line) FROM t",
    );
    let entries: Vec<&str> = entries.lines().collect();
    assert_eq!(entries.len(), 2, "{entries:?}");
    // The 2.5 is not truncated into the BIGINT column, and "lots" is not a number.
    assert!(
        entries[0]
            .starts_with("record|2|{\"id\":2.5,\"name\":\"b\",\"amount\":\"2\"}|column `id`: 2.5 does not fit Int64"),
        "{entries:?}"
    );
    assert!(
        entries[1].starts_with("record|3|") && entries[1].contains("column `amount`: lots does not fit Float64"),
        "{entries:?}"
    );

    // In rescue mode the rows stay, with what did not fit in `_rescued_data`.
    let sandbox = Sandbox::new();
    write_misfit_parquet(&sandbox);
    sandbox.pipeline(&JSON_PIPELINE.replace("format: json,", "format: parquet, schema_evolution: rescue,"));
    sandbox.run_ok();
    let table = sandbox.path("lake/events");
    let rows = query_string(
        &table,
        "SELECT string_agg(concat_ws('|', name, coalesce(CAST(id AS VARCHAR), '-'), coalesce(CAST(amount AS VARCHAR), '-'), \
         coalesce(_rescued_data, '-')), '\n' ORDER BY name) FROM t",
    );
    let rows: Vec<&str> = rows.lines().collect();
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert_eq!(rows[0], "a|1|1.5|-");
    assert!(rows[1].starts_with("b|-|2.0|{\"_file_path\":\"file://") && rows[1].contains("\"id\":2.5"), "{rows:?}");
    assert!(rows[2].starts_with("c|3|-|") && rows[2].contains("\"amount\":\"lots\""), "{rows:?}");
    assert_eq!(rows[3], "d|4|-|-");
}

/// The ids of the good lines of a file, as a SQL list.
fn ids_of(bytes: &[u8]) -> String {
    let ids: Vec<String> = String::from_utf8_lossy(bytes)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|value| value.get("id").and_then(serde_json::Value::as_i64))
        .map(|id| id.to_string())
        .collect();
    if ids.is_empty() { "-1".to_string() } else { ids.join(", ") }
}

#[test]
fn bad_csv_rows_are_quarantined_and_header_only_files_are_fine() {
    let sandbox = Sandbox::new();
    sandbox.write("in/a.csv", "id,name,amount\n1,a,1.5\n2,b,2.5,extra\n3,c,not-a-number\n4,d,4\n");
    sandbox.write("in/header-only.csv", "id,name,amount\n");
    sandbox.write("in/empty.csv", "");
    sandbox.pipeline(&JSON_PIPELINE.replace("format: json", "format: csv"));
    let summary = sandbox.run_ok();
    assert_eq!((summary["files"].as_u64(), summary["rows"].as_u64()), (Some(3), Some(2)), "{summary}");
    let quarantine = sandbox.path("lake/events_quarantine");
    let entries =
        query_string(&quarantine, "SELECT string_agg(concat_ws('|', line, raw, error), '\n' ORDER BY line) FROM t");
    let entries: Vec<&str> = entries.lines().collect();
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert!(entries[0].starts_with("3|2,b,2.5,extra|") && entries[0].contains("expected 3 got 4"), "{entries:?}");
    assert!(entries[1].starts_with("4|3,c,not-a-number|") && entries[1].contains("column `amount`"), "{entries:?}");
}

const EXPECTATIONS_PIPELINE: &str = r#"
pipeline: quality
checkpoint: ./cp
flows:
  - name: events
    source:
      files: { path: ./in, format: json, schema: "id BIGINT, name STRING, amount DOUBLE" }
    transform: SELECT id, name, amount, _metadata.file_path AS source_file FROM source
    sink:
      table: ./lake/events
    expectations:
      - { name: has_name, expr: "name IS NOT NULL", on_violation: warn }
      - { name: positive, expr: "amount >= 0", on_violation: drop }
      - { name: has_id, expr: "id IS NOT NULL", on_violation: quarantine }
"#;

#[test]
fn expectations_warn_drop_and_quarantine_rows_and_count_them() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "in/a.json",
        [
            good(1),
            r#"{"id": 2, "amount": 2}"#.to_string(),
            r#"{"id": 3, "name": "c", "amount": -3}"#.to_string(),
            r#"{"name": "no id", "amount": 4}"#.to_string(),
            r#"{"name": "no id, negative", "amount": -5}"#.to_string(),
            r#"{"id": 6, "name": "f"}"#.to_string(),
        ]
        .join("\n"),
    );
    sandbox.pipeline(EXPECTATIONS_PIPELINE);
    let summary = sandbox.run_ok();
    let table = sandbox.path("lake/events");
    let quarantine = sandbox.path("lake/events_quarantine");
    // Kept: 1, 2 (warned: no name) and 6 (NULL amount passes `amount >= 0`).
    assert_eq!(query_string(&table, "SELECT string_agg(CAST(id AS VARCHAR), ',' ORDER BY id) FROM t"), "1,2,6");
    // Quarantined, with the names of every expectation failed; dropped: 3.
    let moved = query_string(
        &quarantine,
        "SELECT string_agg(concat_ws('|', kind, array_to_string(expectations, '+'), raw), '\n' ORDER BY raw) FROM t",
    );
    let moved: Vec<&str> = moved.lines().collect();
    assert_eq!(moved.len(), 2, "{moved:?}");
    assert!(moved[0].starts_with("expectation|has_id|{") && moved[0].contains(r#""name":"no id""#), "{moved:?}");
    assert!(moved[1].starts_with("expectation|positive+has_id|"), "{moved:?}");
    // The row as JSON says where it came from when the output carries it
    // (`file_path` is filled when the output keeps `_metadata`).
    assert_eq!(
        query_i64(&quarantine, r#"SELECT COUNT(*) FROM t WHERE raw LIKE '%"source_file":"file://%/in/a.json"%'"#),
        2
    );

    let expected = serde_json::json!({
        "has_id": { "action": "quarantine", "failed": 2 },
        "has_name": { "action": "warn", "failed": 1 },
        "positive": { "action": "drop", "failed": 2 },
    });
    assert_eq!(summary["flows"][0]["quality"]["expectations"], expected, "{summary}");
    let info = commit_infos(&table).remove(0);
    assert_eq!(info["sluice.expectations"], expected, "{info}");
    assert_eq!(info["sluice.quarantined_rows"].as_u64(), Some(2), "{info}");
}

#[test]
fn a_failing_fail_expectation_commits_nothing_and_shows_failing_rows() {
    let sandbox = Sandbox::new();
    sandbox.write("in/a.json", format!("{}\n{}\n", good(1), r#"{"id": 2, "name": "b", "amount": -2}"#));
    sandbox.pipeline(&EXPECTATIONS_PIPELINE.replace("on_violation: drop", "on_violation: fail"));
    let output = sandbox.run();
    assert_eq!(output.code, Some(1), "{output:?}");
    assert!(output.stderr.contains("expectation `positive` (`amount >= 0`) failed on 1 row"), "{}", output.stderr);
    assert!(output.stderr.contains(r#""amount":-2.0"#), "a sample of the failing rows: {}", output.stderr);
    assert_eq!(table_version(&sandbox.path("lake/events")), None);
    assert_eq!(table_version(&sandbox.path("lake/events_quarantine")), None);
}

#[test]
fn an_expectation_that_does_not_compile_is_refused_before_anything_runs() {
    let sandbox = Sandbox::new();
    sandbox.write("in/a.json", good(1));
    sandbox.pipeline(&EXPECTATIONS_PIPELINE.replace("amount >= 0", "amont >= 0"));
    let output = sandbox.run();
    assert_eq!(output.code, Some(1), "{output:?}");
    assert!(output.stderr.contains("expectation `positive` (`amont >= 0`)"), "{}", output.stderr);
    assert_eq!(table_version(&sandbox.path("lake/events")), None);
}

#[test]
fn a_batch_run_again_after_a_crash_adds_nothing_twice_to_the_table_or_the_quarantine() {
    let sandbox = Sandbox::new();
    let text: String = (1..=20).map(|i| if i % 5 == 0 { "broken {\n".to_string() } else { good(i) + "\n" }).collect();
    sandbox.write("in/a.json", &text);
    sandbox.pipeline(JSON_PIPELINE);
    let table = sandbox.path("lake/events");
    let quarantine = sandbox.path("lake/events_quarantine");
    // Killed after the quarantine's commit, before the table's.
    kill_hard(sandbox.run_until_failpoint("before_commit", Duration::from_secs(120)));
    assert_eq!(table_version(&table), None);
    assert_eq!(query_i64(&quarantine, "SELECT COUNT(*) FROM t"), 4);

    let output = sandbox.run();
    assert_eq!(output.code, Some(0), "{output:?}");
    assert_eq!(query_i64(&table, "SELECT COUNT(*) FROM t"), 16);
    assert_eq!(query_i64(&quarantine, "SELECT COUNT(*) FROM t"), 4, "the quarantine is not added twice");
    assert_eq!(txn_versions(&table), vec![1]);
    assert_eq!(txn_versions(&quarantine), vec![1]);
    assert_eq!(sandbox.run_ok()["batches"].as_u64(), Some(0));
}

#[test]
fn a_file_deleted_between_discovery_and_reading_is_a_file_entry_in_quarantine() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    let sandbox = Sandbox::new();
    sandbox.write("in/a.json", (1..=3).map(|i| good(i) + "\n").collect::<String>());
    sandbox.write("in/b.json", (4..=6).map(|i| good(i) + "\n").collect::<String>());
    sandbox.pipeline(JSON_PIPELINE);
    // One slot: one task reads a.json, then b.json. It pauses after a.json's first rows.
    let mut child = sandbox
        .command(&["run", "pipeline.yaml", "--json", "--slots", "1"])
        .env("SLUICE_FAILPOINTS", "during_read=2s")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sluice starts");
    let stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut seen = Vec::new();
    for line in stderr.lines().map_while(Result::ok) {
        let reached = line.contains("failpoint during_read reached");
        seen.push(line);
        if reached {
            std::fs::remove_file(sandbox.path("in/b.json")).expect("delete b.json");
            break;
        }
    }
    let output = child.wait_with_output().expect("sluice ends");
    assert_eq!(output.status.code(), Some(0), "{}", seen.join("\n"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or_default()).expect("summary");
    assert_eq!(summary["flows"][0]["quality"]["unreadable_files"].as_u64(), Some(1), "{summary}");
    assert_eq!(query_i64(&sandbox.path("lake/events"), "SELECT COUNT(*) FROM t"), 3);
    let entry =
        query_string(&sandbox.path("lake/events_quarantine"), "SELECT concat_ws('|', kind, file_path, error) FROM t");
    assert!(entry.starts_with("file|") && entry.contains("b.json|") && entry.contains("disappeared"), "{entry}");
}
