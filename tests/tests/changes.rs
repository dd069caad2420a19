//! Silver and gold flows: a `merge` flow applying a real change data feed
//! (written with deltalake's own operations) must leave the target equal to
//! the source's latest snapshot, across micro-batches and SIGKILLs; a gold
//! `overwrite` flow over a `delta` snapshot; a merge target's own change
//! feed read by the next merge; errors for broken sources.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use sluice_tests::changes::{Change, Model, apply, create_source};
use sluice_tests::harness::{Sandbox, commit_infos, kill_hard, log_entries, query_text, txn_versions};

const FAILPOINT_TIMEOUT: Duration = Duration::from_secs(120);

fn merge_pipeline(max_versions: u32) -> String {
    merge_pipeline_scd(max_versions, 1)
}

fn merge_pipeline_scd(max_versions: u32, scd: u8) -> String {
    merge_pipeline_with(max_versions, scd, false)
}

/// `partitioned`: the sink is partitioned by `amount % 3`, so updates move keys between partitions.
fn merge_pipeline_with(max_versions: u32, scd: u8, partitioned: bool) -> String {
    let (transform, partition_by) = if partitioned {
        ("    transform: SELECT *, amount % 3 AS bucket FROM source\n", "      partition_by: [bucket]\n")
    } else {
        ("", "")
    };
    format!(
        r#"
pipeline: silver
checkpoint: ./lake/_checkpoints/silver
flows:
  - name: customers_silver
    source:
      delta_changes:
        table: ./lake/source
        max_versions_per_batch: {max_versions}
{transform}    sink:
      table: ./lake/silver
      mode: merge
      keys: [id]
      sequence_by: _commit_version
      except_columns: [_change_type, _commit_timestamp]
      scd: {scd}
{partition_by}"#
    )
}

/// Newline-delimited JSON: one line per row.
fn jsonl(rows: &[&str]) -> String {
    rows.iter().map(|row| format!("{row}\n")).collect()
}

fn model_rows(model: &Model) -> String {
    model.rows.iter().map(|(id, amount)| format!("{id}:{amount}")).collect::<Vec<_>>().join(",")
}

/// The one value of a one-row, one-column query.
fn single_value(table: &Path, sql: &str) -> String {
    let text = query_text(table, sql);
    text.lines().nth(3).unwrap_or_default().trim_matches(|c| c == '|' || c == ' ').to_string()
}

fn target_rows(table: &Path) -> String {
    single_value(
        table,
        r#"SELECT string_agg(CAST(id AS VARCHAR) || ':' || CAST(amount AS VARCHAR), ',' ORDER BY id) AS r FROM t"#,
    )
}

fn target_history(table: &Path) -> String {
    single_value(
        table,
        r#"SELECT string_agg(CAST(id AS VARCHAR) || ':' || CAST(amount AS VARCHAR) || ':' || CAST(__start_at AS VARCHAR)
             || ':' || COALESCE(CAST(__end_at AS VARCHAR), '-'), ',' ORDER BY id, __start_at) AS r FROM t"#,
    )
}

/// Random inserts, updates and deletes committed to a source table, consumed
/// by a merge flow three versions at a time, with a SIGKILL at each failpoint.
fn random_feed_across_batches_and_crashes(scd: u8, partitioned: bool) {
    let sandbox = Sandbox::new();
    let source = sandbox.path("lake/source");
    let silver = sandbox.path("lake/silver");
    create_source(&source, true);
    sandbox.pipeline(&merge_pipeline_with(3, scd, partitioned));
    let mut model = Model::default();
    let mut rng = fastrand::Rng::with_seed(42 + u64::from(scd));
    let failpoints = ["before_commit", "after_commit", "during_read", ""];
    for (round, failpoint) in failpoints.iter().enumerate() {
        let changes: Vec<Change> = (0..8).map(|_| model.random_change(&mut rng)).collect();
        apply(&source, &changes);
        if !failpoint.is_empty() {
            kill_hard(sandbox.run_until_failpoint(failpoint, FAILPOINT_TIMEOUT));
        }
        let summary = sandbox.run_ok();
        assert!(summary["flows"][0]["batches"].as_u64().unwrap() >= 1, "round {round}: {summary}");
        if scd == 1 {
            assert_eq!(target_rows(&silver), model_rows(&model), "round {round} (after a kill at {failpoint:?})");
        } else {
            assert_eq!(target_history(&silver), model.history_text(), "round {round} (after a kill at {failpoint:?})");
            let current = single_value(
                &silver,
                r#"SELECT string_agg(CAST(id AS VARCHAR) || ':' || CAST(amount AS VARCHAR), ',' ORDER BY id) AS r
                   FROM t WHERE __end_at IS NULL"#,
            );
            assert_eq!(current, model_rows(&model), "round {round}: the current versions are the source's rows");
        }
    }
    if partitioned {
        let folders: Vec<String> = std::fs::read_dir(&silver)
            .expect("the table folder")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with("bucket="))
            .collect();
        assert!(folders.len() >= 2, "partition folders: {folders:?}");
    }
    // Every batch's txn is the last source version it consumed, each exactly once.
    let txns = txn_versions(&silver);
    let mut sorted = txns.clone();
    sorted.dedup();
    assert_eq!(txns, sorted, "no batch committed twice: {txns:?}");
    assert_eq!(*txns.last().unwrap(), 32, "the source's last version was consumed: {txns:?}");
    // Nothing new: a run commits nothing.
    let before = log_entries(&silver).len();
    sandbox.run_ok();
    assert_eq!(log_entries(&silver).len(), before);
}

#[test]
fn merge_of_a_random_change_feed_equals_the_source_across_batches_and_crashes() {
    random_feed_across_batches_and_crashes(1, false);
}

#[test]
fn scd2_history_of_a_random_change_feed_holds_every_version_across_batches_and_crashes() {
    random_feed_across_batches_and_crashes(2, false);
}

/// The same with the sink partitioned by a column that updates change, so
/// keys keep moving between partitions.
#[test]
fn partitioned_merges_of_a_random_change_feed_equal_the_source_across_batches_and_crashes() {
    random_feed_across_batches_and_crashes(1, true);
    random_feed_across_batches_and_crashes(2, true);
}

#[test]
fn out_of_order_and_duplicate_changes_keep_the_newest() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "landing/a.json",
        jsonl(&[
            r#"{"id": 1, "v": "first", "seq": 1, "op": "upsert"}"#,
            r#"{"id": 1, "v": "third", "seq": 3, "op": "upsert"}"#,
            r#"{"id": 1, "v": "second", "seq": 2, "op": "upsert"}"#,
            r#"{"id": 2, "v": "kept", "seq": 5, "op": "upsert"}"#,
            r#"{"id": 2, "v": "kept", "seq": 5, "op": "upsert"}"#,
            r#"{"id": 3, "v": "gone", "seq": 1, "op": "upsert"}"#,
            r#"{"id": 3, "v": "gone", "seq": 2, "op": "delete"}"#,
        ]),
    );
    sandbox.pipeline(
        r#"
pipeline: cdc
checkpoint: ./lake/_checkpoints/cdc
flows:
  - name: silver
    source:
      files: { path: ./landing, format: json, schema: "id BIGINT, v STRING, seq BIGINT, op STRING" }
    transform: SELECT id, v, seq, op FROM source
    sink:
      table: ./lake/silver
      mode: merge
      keys: [id]
      sequence_by: seq
      delete_when: "op = 'delete'"
      except_columns: [op]
"#,
    );
    sandbox.run_ok();
    let silver = sandbox.path("lake/silver");
    let rows = |table: &Path| query_text(table, "SELECT id, v, seq FROM t ORDER BY id");
    let first = rows(&silver);
    assert!(first.contains("| 1  | third | 3   |") && first.contains("| 2  | kept  | 5   |"), "{first}");
    assert!(!first.contains("gone"), "{first}");
    // A later batch with a stale change (older than the table's) and a newer one.
    sandbox.write(
        "landing/b.json",
        jsonl(&[
            r#"{"id": 1, "v": "stale", "seq": 2, "op": "upsert"}"#,
            r#"{"id": 2, "v": "newer", "seq": 6, "op": "upsert"}"#,
            r#"{"id": 4, "v": "new", "seq": 1, "op": "upsert"}"#,
            r#"{"id": 9, "v": "never", "seq": 1, "op": "delete"}"#,
        ]),
    );
    sandbox.run_ok();
    let second = rows(&silver);
    assert!(second.contains("| 1  | third | 3   |"), "a stale change is ignored:\n{second}");
    assert!(second.contains("| 2  | newer | 6   |") && second.contains("| 4  | new   | 1   |"), "{second}");
    assert_eq!(second.lines().filter(|l| l.starts_with("| ")).count(), 4, "{second}");
    let info = commit_infos(&silver).pop().expect("a commit");
    assert_eq!(info["sluice.merge.ignored"], 2, "{info}");
    assert_eq!(info["sluice.merge.inserted"], 1, "{info}");
    assert_eq!(info["sluice.merge.updated"], 1, "{info}");
}

#[test]
fn scd2_places_late_changes_in_history_and_updates_untracked_columns_in_place() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "landing/a.json",
        jsonl(&[
            r#"{"id": 1, "v": "a", "note": "x", "seq": 1, "op": "upsert"}"#,
            r#"{"id": 1, "v": "c", "note": "x", "seq": 3, "op": "upsert"}"#,
            r#"{"id": 2, "v": "p", "note": "x", "seq": 1, "op": "upsert"}"#,
            r#"{"id": 2, "seq": 4, "op": "delete"}"#,
            r#"{"id": 2, "v": "q", "note": "x", "seq": 6, "op": "upsert"}"#,
        ]),
    );
    sandbox.pipeline(
        r#"
pipeline: history
checkpoint: ./lake/_checkpoints/history
flows:
  - name: silver
    source:
      files: { path: ./landing, format: json, schema: "id BIGINT, v STRING, note STRING, seq BIGINT, op STRING" }
    sink:
      table: ./lake/silver
      mode: merge
      keys: [id]
      sequence_by: seq
      delete_when: "op = 'delete'"
      except_columns: [op]
      scd: 2
      track_history_columns: [v]
"#,
    );
    sandbox.run_ok();
    let silver = sandbox.path("lake/silver");
    let history = |table: &Path| {
        single_value(
            table,
            r#"SELECT string_agg(CAST(id AS VARCHAR) || ':' || v || ':' || note || ':' || CAST(seq AS VARCHAR) || ':'
                 || CAST(__start_at AS VARCHAR) || '-' || COALESCE(CAST(__end_at AS VARCHAR), ''), ' '
                 ORDER BY id, __start_at) AS r FROM t"#,
        )
    };
    // A delete closes the version; a later insert opens a new one.
    assert_eq!(history(&silver), "1:a:x:1:1-3 1:c:x:3:3- 2:p:x:1:1-4 2:q:x:6:6-");

    sandbox.write(
        "landing/b.json",
        jsonl(&[
            // Late: lands between the versions it falls between.
            r#"{"id": 1, "v": "b", "note": "x", "seq": 2, "op": "upsert"}"#,
            // Only an untracked column changes: the current version is updated in place.
            r#"{"id": 1, "v": "c", "note": "y", "seq": 5, "op": "upsert"}"#,
            // Already in the history: changes nothing.
            r#"{"id": 2, "v": "p", "note": "x", "seq": 1, "op": "upsert"}"#,
            // A delete of a key never seen.
            r#"{"id": 3, "seq": 1, "op": "delete"}"#,
        ]),
    );
    sandbox.run_ok();
    assert_eq!(history(&silver), "1:a:x:1:1-2 1:b:x:2:2-3 1:c:y:5:3- 2:p:x:1:1-4 2:q:x:6:6-");
    let info = commit_infos(&silver).pop().expect("a commit");
    assert_eq!(info["sluice.merge.ignored"], 1, "{info}");
    assert_eq!(info["sluice.merge.files_rewritten"], 1, "{info}");
}

#[test]
fn ignore_null_updates_keeps_the_values_an_update_leaves_out() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "landing/a.json",
        jsonl(&[r#"{"id": 1, "v": "a", "w": "x", "seq": 1}"#, r#"{"id": 2, "v": "b", "w": "x", "seq": 1}"#]),
    );
    sandbox.pipeline(
        r#"
pipeline: partial
checkpoint: ./lake/_checkpoints/partial
flows:
  - name: silver
    source:
      files: { path: ./landing, format: json, schema: "id BIGINT, v STRING, w STRING, seq BIGINT" }
    sink:
      table: ./lake/silver
      mode: merge
      keys: [id]
      sequence_by: seq
      ignore_null_updates: true
"#,
    );
    sandbox.run_ok();
    // Updates that carry only some columns, and a new key with a NULL.
    sandbox.write(
        "landing/b.json",
        jsonl(&[
            r#"{"id": 1, "w": "y", "seq": 2}"#,
            r#"{"id": 2, "v": "c", "seq": 2}"#,
            r#"{"id": 3, "v": "n", "seq": 1}"#,
        ]),
    );
    sandbox.run_ok();
    let rows = single_value(
        &sandbox.path("lake/silver"),
        r#"SELECT string_agg(CAST(id AS VARCHAR) || ':' || COALESCE(v, '-') || ':' || COALESCE(w, '-') || ':'
             || CAST(seq AS VARCHAR), ' ' ORDER BY id) AS r FROM t"#,
    );
    assert_eq!(rows, "1:a:y:2 2:c:x:2 3:n:-:1");
}

#[test]
fn ignore_null_updates_with_scd2_carries_the_values_into_each_new_version() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "landing/a.json",
        jsonl(&[r#"{"id": 1, "v": "a", "w": "x", "seq": 1}"#, r#"{"id": 2, "v": "b", "w": "x", "seq": 1}"#]),
    );
    sandbox.pipeline(
        r#"
pipeline: partial
checkpoint: ./lake/_checkpoints/partial
flows:
  - name: history
    source:
      files: { path: ./landing, format: json, schema: "id BIGINT, v STRING, w STRING, seq BIGINT, op STRING" }
    transform: SELECT id, v, w, seq, op FROM source
    sink:
      table: ./lake/history
      mode: merge
      keys: [id]
      sequence_by: seq
      delete_when: "op = 'D'"
      except_columns: [op]
      scd: 2
      ignore_null_updates: true
"#,
    );
    sandbox.run_ok();
    // Two partial updates of key 1 in one batch, the second arriving first;
    // key 2 deleted and inserted again with a NULL, which nothing fills.
    sandbox.write(
        "landing/b.json",
        jsonl(&[
            r#"{"id": 1, "v": "z", "seq": 3}"#,
            r#"{"id": 1, "w": "y", "seq": 2}"#,
            r#"{"id": 2, "seq": 2, "op": "D"}"#,
            r#"{"id": 2, "v": "c", "seq": 3}"#,
        ]),
    );
    sandbox.run_ok();
    let rows = single_value(
        &sandbox.path("lake/history"),
        r#"SELECT string_agg(CAST(id AS VARCHAR) || ':' || COALESCE(v, '-') || ':' || COALESCE(w, '-') || ':'
             || CAST(__start_at AS VARCHAR) || ':' || COALESCE(CAST(__end_at AS VARCHAR), '-'), ' '
             ORDER BY id, __start_at) AS r FROM t"#,
    );
    assert_eq!(rows, "1:a:x:1:2 1:a:y:2:3 1:z:y:3:- 2:b:x:1:2 2:c:-:3:-");
}

#[test]
fn a_batch_that_changes_nothing_still_records_its_progress() {
    let sandbox = Sandbox::new();
    let source = sandbox.path("lake/source");
    create_source(&source, true);
    apply(&source, &[Change::Insert(vec![(1, 10)])]);
    sandbox.pipeline(&merge_pipeline(100));
    sandbox.run_ok();
    // Deleting an id that was never there changes nothing in the target.
    apply(&source, &[Change::Insert(vec![(2, 20)]), Change::Delete(vec![2])]);
    sandbox.run_ok();
    let silver = sandbox.path("lake/silver");
    assert_eq!(txn_versions(&silver), vec![1, 3], "the no-op batch's txn is committed");
    assert_eq!(target_rows(&silver), "1:10");
}

#[test]
fn gold_overwrite_follows_silver_in_one_pipeline() {
    let sandbox = Sandbox::new();
    let source = sandbox.path("lake/source");
    create_source(&source, true);
    apply(&source, &[Change::Insert(vec![(1, 10), (2, 20), (3, 30)]), Change::Update(vec![1], 15)]);
    let pipeline = merge_pipeline(100).replace("pipeline: silver", "pipeline: medallion")
        + r#"
  - name: totals_gold
    source:
      delta: { table: "flow:customers_silver" }
    transform: SELECT count(*) AS customers, sum(amount) AS total FROM source
    sink:
      table: ./lake/gold
      mode: overwrite
"#;
    sandbox.pipeline(&pipeline);
    sandbox.run_ok();
    let gold = sandbox.path("lake/gold");
    let text = query_text(&gold, "SELECT customers, total FROM t");
    assert!(text.contains("| 3         | 65    |"), "{text}");
    // Nothing new upstream: gold is not rewritten.
    let versions = log_entries(&gold).len();
    sandbox.run_ok();
    assert_eq!(log_entries(&gold).len(), versions);
    apply(&source, &[Change::Delete(vec![3])]);
    sandbox.run_ok();
    let text = query_text(&gold, "SELECT customers, total FROM t");
    assert!(text.contains("| 2         | 35    |"), "{text}");
}

const CHAIN_PIPELINE: &str = r#"
pipeline: chain
checkpoint: ./cp
flows:
  - name: bronze
    source:
      files: { path: ./in, format: json, schema: "id BIGINT, v STRING, seq BIGINT, op STRING" }
    transform: SELECT id, v, seq, op FROM source
    sink: { table: ./lake/bronze }
  - name: silver
    source: { delta_changes: { table: "flow:bronze" } }
    sink:
      table: ./lake/silver
      mode: merge
      keys: [id]
      sequence_by: seq
      delete_when: "op = 'D'"
      except_columns: [_change_type, _commit_version, _commit_timestamp]
  - name: gold
    source: { delta_changes: { table: "flow:silver" } }
    sink:
      table: ./lake/gold
      mode: merge
      keys: [id]
      sequence_by: seq
      except_columns: [_change_type, _commit_version, _commit_timestamp]
  - name: history
    source: { delta_changes: { table: "flow:bronze" } }
    sink:
      table: ./lake/history
      mode: merge
      keys: [id]
      sequence_by: seq
      delete_when: "op = 'D'"
      scd: 2
      except_columns: [_change_type, _commit_version, _commit_timestamp]
  - name: silver_feed
    source: { delta_changes: { table: "flow:silver" } }
    transform: SELECT id, v, _change_type, _commit_version FROM source
    sink: { table: ./lake/silver_feed }
  - name: history_feed
    source: { delta_changes: { table: "flow:history" } }
    transform: SELECT id, v, __start_at, __end_at, _change_type, _commit_version FROM source
    sink: { table: ./lake/history_feed }
"#;

#[test]
fn a_merge_target_feeds_the_rows_that_changed_to_the_next_merge() {
    let sandbox = Sandbox::new();
    let row =
        |id: i64, v: &str, seq: i64, op: &str| format!(r#"{{"id": {id}, "v": "{v}", "seq": {seq}, "op": "{op}"}}"#);
    let first: Vec<String> = (1..=5).map(|id| row(id, &format!("v{id}"), 1, "I")).collect();
    sandbox.write("in/1.json", jsonl(&first.iter().map(String::as_str).collect::<Vec<_>>()));
    sandbox.pipeline(CHAIN_PIPELINE);
    sandbox.run_ok();
    let second = [row(2, "v2b", 2, "U"), row(3, "", 2, "D"), row(6, "v6", 2, "I")];
    sandbox.write("in/2.json", jsonl(&second.iter().map(String::as_str).collect::<Vec<_>>()));
    sandbox.run_ok();

    let rows = "SELECT string_agg(CAST(id AS VARCHAR) || ':' || v, ',' ORDER BY id) AS r FROM t";
    let (silver, gold) = (sandbox.path("lake/silver"), sandbox.path("lake/gold"));
    assert_eq!(single_value(&silver, rows), "1:v1,2:v2b,4:v4,5:v5,6:v6");
    assert_eq!(single_value(&gold, rows), single_value(&silver, rows));
    // Silver's second commit rewrote the file of ids 1-5, but its feed holds
    // only what changed, so gold's merge saw three changes, not ten.
    let info = commit_infos(&gold).pop().unwrap();
    let counts: Vec<i64> = ["inserted", "updated", "deleted"]
        .iter()
        .map(|c| info[&format!("sluice.merge.{c}")].as_i64().unwrap_or(-1))
        .collect();
    assert_eq!(counts, vec![1, 1, 1], "{info}");
    let feed = "SELECT string_agg(CAST(id AS VARCHAR) || ':' || _change_type, ',' ORDER BY id, _change_type) AS r \
                FROM t WHERE _commit_version = 1";
    assert_eq!(
        single_value(&sandbox.path("lake/silver_feed"), feed),
        "2:update_postimage,2:update_preimage,3:delete,6:insert"
    );
    // SCD 2: the versions closed are updates, the versions opened inserts.
    let feed = "SELECT string_agg(CAST(id AS VARCHAR) || ':' || CAST(__start_at AS VARCHAR) || ':' || \
                COALESCE(CAST(__end_at AS VARCHAR), '-') || ':' || _change_type, ',' ORDER BY id, __start_at, _change_type) \
                AS r FROM t WHERE _commit_version = 1";
    assert_eq!(
        single_value(&sandbox.path("lake/history_feed"), feed),
        "2:1:2:update_postimage,2:1:-:update_preimage,2:2:-:insert,3:1:2:update_postimage,3:1:-:update_preimage,6:2:-:insert"
    );
}

#[test]
fn broken_sources_say_what_is_wrong_and_stop_their_dependents() {
    let sandbox = Sandbox::new();
    let source = sandbox.path("lake/source");
    create_source(&source, false);
    apply(&source, &[Change::Insert(vec![(1, 10)])]);
    let pipeline = merge_pipeline(100)
        + r#"
  - name: gold
    source:
      delta: { table: "flow:customers_silver" }
    sink: { table: ./lake/gold, mode: overwrite }
"#;
    sandbox.pipeline(&pipeline);
    let output = sandbox.run();
    assert_ne!(output.code, Some(0));
    assert!(
        output.stderr.contains("change data feed is not enabled")
            && output.stderr.contains("delta.enableChangeDataFeed"),
        "{}",
        output.stderr
    );
    assert!(output.stderr.contains("did not run: gold"), "{}", output.stderr);
}

#[test]
fn the_medallion_example_runs_and_a_second_run_does_only_the_new_work() {
    let sandbox = Sandbox::new();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/retail-medallion");
    sandbox.pipeline(&std::fs::read_to_string(example.join("pipeline.yaml")).unwrap());
    for name in ["invoices-00000.json", "invoices-00001.json"] {
        sandbox.write(
            &format!("landing/invoices/{name}"),
            std::fs::read(example.join("landing/invoices").join(name)).unwrap(),
        );
    }
    sandbox.run_ok();
    let silver = sandbox.path("lake/silver/invoices");
    let gold = sandbox.path("lake/gold/daily_sales");
    let lines = sandbox.path("lake/silver/line_items");
    let invoices = |t: &Path| query_text(t, "SELECT count(*) AS n, sum(TotalAmount) AS total FROM t");
    let before = invoices(&silver);
    assert!(before.contains("| 40 "), "{before}");
    // Gold agrees with silver.
    let gold_total = query_text(&gold, "SELECT sum(Invoices) AS n, sum(TotalSales) AS total FROM t");
    assert_eq!(gold_total, before);
    let line_count = query_text(&lines, "SELECT count(*) FROM t");

    // Nothing new: nothing committed anywhere.
    let versions = |t: &Path| log_entries(t).len();
    let counts = [versions(&silver), versions(&gold), versions(&lines)];
    sandbox.run_ok();
    assert_eq!([versions(&silver), versions(&gold), versions(&lines)], counts);

    // Five new invoices and two corrections.
    sandbox.write(
        "landing/invoices/invoices-corrections.json",
        std::fs::read(example.join("more/invoices-corrections.json")).unwrap(),
    );
    let summary = sandbox.run_ok();
    assert_eq!(summary["flows"][0]["files"], 1, "{summary}");
    let after = invoices(&silver);
    assert!(after.contains("| 45 "), "{after}");
    let cash = query_text(
        &silver,
        r#"SELECT count(*) FROM t WHERE "InvoiceNumber" IN ('1-0', '1-1') AND "PaymentMethod" = 'CASH'"#,
    );
    assert!(cash.contains("| 2 "), "the corrections replaced the invoices:\n{cash}");
    let info = commit_infos(&silver).pop().expect("a commit");
    assert_eq!(
        (info["sluice.merge.inserted"].as_u64(), info["sluice.merge.updated"].as_u64()),
        (Some(5), Some(2)),
        "{info}"
    );
    assert_eq!(versions(&gold), counts[1] + 1, "gold recomputed once");
    assert_ne!(query_text(&lines, "SELECT count(*) FROM t"), line_count);
    // A corrected invoice's lines replace all its earlier lines: 1-0 dropped a
    // line, 1-1 keeps both of its lines for the same item.
    let per_invoice = single_value(
        &lines,
        r#"SELECT string_agg("InvoiceNumber" || ':' || CAST(n AS VARCHAR), ' ' ORDER BY "InvoiceNumber")
           FROM (SELECT "InvoiceNumber", count(*) AS n FROM t WHERE "InvoiceNumber" IN ('1-0', '1-1') GROUP BY 1)"#,
    );
    assert_eq!(per_invoice, "1-0:4 1-1:2");
    let bronze_lines = single_value(
        &sandbox.path("lake/bronze/invoices"),
        r#"SELECT sum(n) FROM (SELECT "InvoiceNumber", last_value(cardinality("InvoiceLineItems") ORDER BY "CreatedTime") AS n
           FROM t GROUP BY 1)"#,
    );
    assert_eq!(
        single_value(&lines, "SELECT count(*) FROM t"),
        bronze_lines,
        "one row per line of each invoice's latest version"
    );
    // The history keeps both versions of each corrected invoice.
    let history = sandbox.path("lake/silver/invoice_history");
    let versions = single_value(
        &history,
        r#"SELECT string_agg("InvoiceNumber" || ':' || "PaymentMethod" || ':' || CASE WHEN __end_at IS NULL THEN 'current' ELSE 'closed' END, ' '
             ORDER BY "InvoiceNumber", __start_at) FROM t WHERE "InvoiceNumber" IN ('1-0', '1-1')"#,
    );
    assert!(versions.ends_with("1-1:CASH:current"), "{versions}");
    assert_eq!(versions.matches("closed").count(), 2, "{versions}");
    assert_eq!(single_value(&history, "SELECT count(*) FROM t WHERE __end_at IS NULL"), "45");
}

#[test]
fn watermark_loads_pick_up_late_rows_within_the_lag_and_move_only_with_a_commit() {
    let sandbox = Sandbox::new();
    let source = sandbox.path("lake/source");
    create_source(&source, false);
    // `amount` only grows here: it stands for an update time or a sequence number.
    sandbox.pipeline(
        r#"
pipeline: watermark
checkpoint: ./lake/_checkpoints/watermark
flows:
  - name: orders_silver
    source:
      watermark: { table: ./lake/source, column: amount, lag: 10 }
    sink: { table: ./lake/silver, mode: merge, keys: [id], sequence_by: amount }
  - name: orders_copy
    source:
      watermark: { table: ./lake/source, column: amount, initial_value: 15 }
    sink: { table: ./lake/copy }
"#,
    );
    let silver = sandbox.path("lake/silver");
    let copy = sandbox.path("lake/copy");
    let ids = |table: &Path| single_value(table, "SELECT string_agg(CAST(id AS VARCHAR), ',' ORDER BY id) FROM t");

    apply(&source, &[Change::Insert(vec![(1, 10), (2, 20)]), Change::Insert(vec![(3, 100)])]);
    sandbox.run_ok();
    assert_eq!(ids(&silver), "1,2,3");
    assert_eq!(ids(&copy), "2,3", "rows at or below initial_value are not read");
    assert_eq!(txn_versions(&silver), vec![100], "the watermark is the txn version");

    // Late rows: 95 is within the lag below the watermark (100), 85 is not.
    apply(&source, &[Change::Insert(vec![(4, 95), (5, 85), (6, 120)])]);
    sandbox.run_ok();
    assert_eq!(ids(&silver), "1,2,3,4,6");
    assert_eq!(ids(&copy), "2,3,6", "without a lag, late rows are not read");
    assert_eq!(txn_versions(&silver), vec![100, 120]);

    // A crash between writing and committing does not move the watermark.
    apply(&source, &[Change::Insert(vec![(7, 130)])]);
    kill_hard(sandbox.run_until_failpoint("before_commit", FAILPOINT_TIMEOUT));
    assert_eq!(txn_versions(&silver), vec![100, 120]);
    assert_eq!(ids(&silver), "1,2,3,4,6");
    sandbox.run_ok();
    assert_eq!(ids(&silver), "1,2,3,4,6,7");
    assert_eq!(ids(&copy), "2,3,6,7");
    assert_eq!(txn_versions(&silver), vec![100, 120, 130]);

    // Nothing beyond the watermark: nothing is read or committed.
    let versions = (log_entries(&silver).len(), log_entries(&copy).len());
    sandbox.run_ok();
    assert_eq!((log_entries(&silver).len(), log_entries(&copy).len()), versions);
}

#[test]
fn a_watermark_on_a_missing_or_unfit_column_says_what_is_wrong() {
    let sandbox = Sandbox::new();
    let source = sandbox.path("lake/source");
    create_source(&source, false);
    apply(&source, &[Change::Insert(vec![(1, 10)])]);
    let pipeline = |column: &str, initial: &str| {
        format!(
            "pipeline: w\ncheckpoint: ./lake/_checkpoints/w\nflows:\n  - name: f\n    source:\n      watermark: {{ table: ./lake/source, column: {column}{initial} }}\n    sink: {{ table: ./lake/t }}\n"
        )
    };
    sandbox.pipeline(&pipeline("updated", ""));
    let output = sandbox.run();
    assert!(
        output.stderr.contains("names `updated`, which the table does not have; it has: id, name, amount"),
        "{}",
        output.stderr
    );
    sandbox.pipeline(&pipeline("name", ""));
    let output = sandbox.run();
    assert!(output.stderr.contains("a watermark follows an integer, timestamp or date column"), "{}", output.stderr);
    sandbox.pipeline(&pipeline("amount", ", initial_value: 2026-01-01"));
    let output = sandbox.run();
    assert!(output.stderr.contains("`watermark.initial_value` does not fit column `amount`"), "{}", output.stderr);
}

/// A watermark over a folder of CSV exports that are rewritten in place and
/// added to: each round reads only the new and rewritten files, keeps the rows
/// beyond the watermark (less the lag), and moves the watermark with its
/// commit. A crash before the commit moves nothing; a malformed row goes to
/// the quarantine table once, not again every round; a late row alone waits
/// for the round that moves the watermark.
#[test]
fn a_watermark_over_a_folder_of_files_reads_only_what_changed_and_rows_beyond_it() {
    let sandbox = Sandbox::new();
    let header = "id,updated,amount\n";
    sandbox.write("exports/orders-1.csv", format!("{header}1,10,5\n2,20,6\n"));
    sandbox.write("exports/orders-2.csv", format!("{header}3,30,7\n"));
    sandbox.pipeline(
        r#"
pipeline: exports
checkpoint: ./lake/_checkpoints/exports
flows:
  - name: orders
    source:
      watermark:
        files: { path: ./exports, format: csv, schema: "id BIGINT, updated BIGINT, amount BIGINT" }
        column: updated
        lag: 5
    transform: SELECT id, updated, amount FROM source
    sink: { table: ./lake/orders, mode: merge, keys: [id], sequence_by: updated }
  - name: orders_log
    source:
      watermark: { files: { path: ./exports, format: csv }, column: updated }
    transform: SELECT id, updated, amount FROM source
    sink: { table: ./lake/orders_log }
"#,
    );
    let (orders, log) = (sandbox.path("lake/orders"), sandbox.path("lake/orders_log"));
    let rows = |table: &Path| {
        single_value(
            table,
            "SELECT string_agg(CAST(id AS VARCHAR) || ':' || CAST(amount AS VARCHAR), ',' ORDER BY id, updated) FROM t",
        )
    };
    let files_read = |summary: &serde_json::Value| {
        summary["flows"].as_array().expect("flows").iter().map(|f| f["files"].as_u64().unwrap_or(0)).collect::<Vec<_>>()
    };

    let summary = sandbox.run_ok();
    assert_eq!(files_read(&summary), vec![2, 2], "{summary}");
    assert_eq!(rows(&orders), "1:5,2:6,3:7");
    assert_eq!(rows(&log), "1:5,2:6,3:7", "the schema is inferred from the files");
    assert_eq!(txn_versions(&orders), vec![30], "the watermark is the txn version");

    // The first export is rewritten: 2 is updated (40); 4 (27) is late but within
    // the lag below 30, 5 (24) is not. The second export is not read again.
    sandbox.write("exports/orders-1.csv", format!("{header}1,10,5\n2,40,60\n4,27,8\n5,24,9\n"));
    let summary = sandbox.run_ok();
    assert_eq!(files_read(&summary), vec![1, 1], "only the rewritten file is read: {summary}");
    assert_eq!(rows(&orders), "1:5,2:60,3:7,4:8");
    assert_eq!(rows(&log), "1:5,2:6,2:60,3:7", "without a lag, only rows beyond 30");
    assert_eq!(txn_versions(&orders), vec![30, 40]);

    // A crash between writing and committing does not move the watermark.
    sandbox.write("exports/orders-3.csv", format!("{header}6,50,1\n"));
    kill_hard(sandbox.run_until_failpoint("before_commit", FAILPOINT_TIMEOUT));
    assert_eq!(txn_versions(&orders), vec![30, 40]);
    sandbox.run_ok();
    assert_eq!(rows(&orders), "1:5,2:60,3:7,4:8,6:1");
    assert_eq!(rows(&log), "1:5,2:6,2:60,3:7,6:1");
    assert_eq!(txn_versions(&orders), vec![30, 40, 50]);

    // A malformed row is quarantined, once; the rest of the file is loaded.
    sandbox.write("exports/orders-4.csv", format!("{header}7,soon,1\n8,60,2\n"));
    sandbox.run_ok();
    assert_eq!(rows(&orders), "1:5,2:60,3:7,4:8,6:1,8:2");
    let quarantine = sandbox.path("lake/orders_quarantine");
    assert_eq!(single_value(&quarantine, "SELECT count(*) FROM t"), "1");

    // A late row within the lag, alone: it waits for the round that moves the watermark.
    sandbox.write("exports/orders-5.csv", format!("{header}9,57,3\n"));
    sandbox.run_ok();
    assert_eq!(rows(&orders), "1:5,2:60,3:7,4:8,6:1,8:2");
    sandbox.write("exports/orders-6.csv", format!("{header}10,70,4\n"));
    sandbox.run_ok();
    assert_eq!(rows(&orders), "1:5,2:60,3:7,4:8,6:1,8:2,9:3,10:4");
    assert_eq!(txn_versions(&orders), vec![30, 40, 50, 60, 70]);

    // Nothing changed: nothing is read or committed.
    let versions = (log_entries(&orders).len(), log_entries(&log).len());
    let summary = sandbox.run_ok();
    assert_eq!(files_read(&summary), vec![0, 0], "{summary}");
    assert_eq!((log_entries(&orders).len(), log_entries(&log).len()), versions);
    assert_eq!(single_value(&quarantine, "SELECT count(*) FROM t"), "1");
}

/// Merge sinks partitioned by a column: an update in place, a key moving to
/// another partition and a delete, for SCD 1 and SCD 2. The rows land in
/// their partitions' folders, the file the moved key left is rewritten, and
/// the target's change data feed (partitioned too) carries the partition
/// column into a downstream flow.
#[test]
fn partitioned_merge_sinks_move_keys_between_partitions() {
    let sandbox = Sandbox::new();
    let row = |id: i64, region: &str, amount: i64, seq: i64, op: &str| {
        format!("{{\"id\": {id}, \"region\": \"{region}\", \"amount\": {amount}, \"seq\": {seq}, \"op\": \"{op}\"}}\n")
    };
    sandbox.write("in/a.json", [row(1, "eu", 10, 1, "U"), row(2, "us", 20, 1, "U"), row(3, "eu", 30, 1, "U")].concat());
    sandbox.pipeline(
        r#"
pipeline: parts
checkpoint: ./lake/_checkpoints/parts
flows:
  - name: bronze
    source:
      files: { path: ./in, format: json, schema: "id BIGINT, region STRING, amount BIGINT, seq BIGINT, op STRING" }
    transform: SELECT id, region, amount, seq, op FROM source
    sink: { table: ./lake/bronze }
  - name: silver
    source: { delta_changes: { table: flow:bronze } }
    sink:
      table: ./lake/silver
      mode: merge
      keys: [id]
      sequence_by: seq
      delete_when: "op = 'D'"
      except_columns: [op, _change_type, _commit_version, _commit_timestamp]
      partition_by: [region]
  - name: history
    source: { delta_changes: { table: flow:bronze } }
    sink:
      table: ./lake/history
      mode: merge
      keys: [id]
      sequence_by: seq
      delete_when: "op = 'D'"
      except_columns: [op, _change_type, _commit_version, _commit_timestamp]
      scd: 2
      partition_by: [region]
  - name: silver_changes
    source: { delta_changes: { table: flow:silver } }
    sink: { table: ./lake/silver_changes }
"#,
    );
    let (silver, history, changes) =
        (sandbox.path("lake/silver"), sandbox.path("lake/history"), sandbox.path("lake/silver_changes"));
    let rows_of = |table: &Path| {
        single_value(
            table,
            "SELECT string_agg(CAST(id AS VARCHAR) || ':' || region || ':' || CAST(amount AS VARCHAR), ',' ORDER BY id) FROM t",
        )
    };
    sandbox.run_ok();
    assert_eq!(rows_of(&silver), "1:eu:10,2:us:20,3:eu:30");
    assert!(sandbox.path("lake/silver/region=us").is_dir() && sandbox.path("lake/silver/region=eu").is_dir());

    // 1 is updated in place, 2 moves from us to eu, 3 is deleted.
    sandbox.write("in/b.json", [row(1, "eu", 11, 2, "U"), row(2, "eu", 21, 2, "U"), row(3, "eu", 30, 2, "D")].concat());
    sandbox.run_ok();
    assert_eq!(rows_of(&silver), "1:eu:11,2:eu:21");
    assert_eq!(single_value(&silver, "SELECT count(*) FROM t WHERE region = 'us'"), "0");
    let partitions: std::collections::BTreeSet<String> = log_entries(&silver)
        .iter()
        .flatten()
        .filter_map(|action| action.get("add"))
        .filter_map(|add| add["partitionValues"]["region"].as_str().map(str::to_string))
        .collect();
    assert_eq!(partitions, ["eu".to_string(), "us".to_string()].into(), "every add names its partition");

    // SCD 2: every version kept, in its partition; the current ones open.
    assert_eq!(
        single_value(
            &history,
            "SELECT string_agg(CAST(id AS VARCHAR) || ':' || region || ':' || CASE WHEN __end_at IS NULL THEN 'current' ELSE 'closed' END, ',' ORDER BY id, __start_at) FROM t"
        ),
        "1:eu:closed,1:eu:current,2:us:closed,2:eu:current,3:eu:closed"
    );

    // Silver's own feed, read downstream: the partition column on every change.
    assert_eq!(single_value(&changes, "SELECT count(*) FROM t WHERE region IS NULL"), "0");
    assert_eq!(
        single_value(
            &changes,
            "SELECT string_agg(CAST(id AS VARCHAR) || ':' || region || ':' || _change_type, ',' ORDER BY _commit_version, id, _change_type) FROM t WHERE _commit_version > 0"
        ),
        "1:eu:update_postimage,1:eu:update_preimage,2:eu:update_postimage,2:us:update_preimage,3:eu:delete"
    );
}

/// A merge sink partitioned by its first key reads, for a batch, only the
/// partitions the batch's keys fall into.
#[test]
fn a_merge_partitioned_by_its_first_key_reads_only_the_partitions_of_the_batch() {
    let sandbox = Sandbox::new();
    let row = |day: i64, id: i64, amount: i64| format!("{{\"day\": {day}, \"id\": {id}, \"amount\": {amount}}}\n");
    sandbox.write("in/a.json", (1..=3).flat_map(|day| (0..2).map(move |id| row(day, id, 1))).collect::<String>());
    sandbox.pipeline(
        r#"
pipeline: days
checkpoint: ./lake/_checkpoints/days
flows:
  - name: by_day
    source:
      files: { path: ./in, format: json, schema: "day BIGINT, id BIGINT, amount BIGINT" }
    transform: SELECT day, id, amount, _metadata.file_name AS file FROM source
    sink: { table: ./lake/by_day, mode: merge, keys: [day, id], sequence_by: file, partition_by: [day] }
"#,
    );
    sandbox.run_ok();
    sandbox.write("in/b.json", [row(3, 0, 5), row(3, 9, 5)].concat());
    let summary = sandbox.run_ok();
    let merge = &summary["flows"][0]["merge"];
    assert_eq!((merge["files_scanned"].as_u64(), merge["updated"].as_u64()), (Some(1), Some(1)), "{summary}");
    let table = sandbox.path("lake/by_day");
    assert_eq!(single_value(&table, "SELECT count(*) FROM t"), "7");
    assert_eq!(single_value(&table, "SELECT sum(amount) FROM t WHERE day = 3"), "11");
}
