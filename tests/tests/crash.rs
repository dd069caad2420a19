//! Exactly-once across crashes: a real `sluice` process is killed with SIGKILL
//! in each crash window, then run again; the table must hold every source row
//! exactly once and every batch's txn exactly once. Also: two runs racing on
//! one pipeline, and an interval pipeline stopped with SIGTERM.

use std::path::Path;
use std::time::{Duration, Instant};

use sluice_tests::harness::{Sandbox, kill_hard, log_entries, query_i64, table_version, txn_versions};
use sluice_tests::invoices::{invoice_pipeline, write_invoice_file};

const FAILPOINT_TIMEOUT: Duration = Duration::from_secs(120);

fn pipeline(trigger: &str) -> String {
    invoice_pipeline("retail", trigger, 2)
}

/// Four files of 30 invoices: two batches of two files.
fn sandbox_with_files() -> Sandbox {
    let sandbox = Sandbox::new();
    for n in 0..4u64 {
        write_invoice_file(&sandbox.path(&format!("landing/f{n}.json")), 9, n * 30, 30).expect("write invoices");
    }
    sandbox.pipeline(&pipeline("available_now"));
    sandbox
}

fn parquet_files_on_disk(table: &Path) -> usize {
    std::fs::read_dir(table)
        .map(|d| d.filter_map(Result::ok).filter(|e| e.path().extension().is_some_and(|x| x == "parquet")).count())
        .unwrap_or(0)
}

fn assert_exactly_once(table: &Path) {
    assert_eq!(query_i64(table, "SELECT COUNT(*) FROM t"), 120);
    assert_eq!(query_i64(table, r#"SELECT COUNT(DISTINCT "InvoiceNumber") FROM t"#), 120);
    assert_eq!(txn_versions(table), vec![1, 2], "each batch committed exactly once");
}

#[test]
fn killed_while_reading_then_rerun_resumes_the_same_batch() {
    let sandbox = sandbox_with_files();
    let table = sandbox.path("lake/bronze/invoices");
    kill_hard(sandbox.run_until_failpoint("during_read", FAILPOINT_TIMEOUT));
    assert_eq!(table_version(&table), None);

    let output = sandbox.run();
    assert_eq!(output.code, Some(0), "{output:?}");
    assert!(output.stderr.contains("resuming batch 1"), "{}", output.stderr);
    assert_exactly_once(&table);
}

#[test]
fn killed_after_writing_files_before_the_commit_leaves_nothing_visible() {
    let sandbox = sandbox_with_files();
    let table = sandbox.path("lake/bronze/invoices");
    kill_hard(sandbox.run_until_failpoint("before_commit", FAILPOINT_TIMEOUT));
    assert_eq!(table_version(&table), None, "no commit happened");
    assert!(parquet_files_on_disk(&table) > 0, "the batch's data files were written before the kill");

    sandbox.run_ok();
    assert_exactly_once(&table);
    let referenced: usize = log_entries(&table).iter().flatten().filter(|a| a.get("add").is_some()).count();
    assert!(parquet_files_on_disk(&table) > referenced, "the orphaned files stay unreferenced");
}

#[test]
fn killed_after_the_commit_before_the_ledger_does_not_commit_twice() {
    let sandbox = sandbox_with_files();
    let table = sandbox.path("lake/bronze/invoices");
    kill_hard(sandbox.run_until_failpoint("after_commit", FAILPOINT_TIMEOUT));
    assert_eq!(table_version(&table), Some(0), "batch 1 was committed before the kill");
    assert!(!sandbox.path("lake/_checkpoints/retail/flows/invoices_bronze/commits/00000000000000000001.json").exists());

    let summary = sandbox.run_ok();
    assert_eq!(
        (summary["batches"].as_u64(), summary["rows"].as_u64()),
        (Some(1), Some(60)),
        "only batch 2 is left: {summary}"
    );
    assert_exactly_once(&table);
    assert!(
        sandbox.path("lake/_checkpoints/retail/flows/invoices_bronze/commits/00000000000000000001.json").exists(),
        "the ledger was repaired"
    );
}

#[test]
fn killed_in_every_window_of_one_run_after_another() {
    let sandbox = sandbox_with_files();
    let table = sandbox.path("lake/bronze/invoices");
    for failpoint in ["during_read", "before_commit", "after_commit", "during_read", "after_commit"] {
        kill_hard(sandbox.run_until_failpoint(failpoint, FAILPOINT_TIMEOUT));
    }
    sandbox.run_ok();
    assert_exactly_once(&table);
}

#[test]
fn two_runs_racing_on_one_pipeline_commit_each_batch_once() {
    let sandbox = Sandbox::new();
    for n in 0..6u64 {
        write_invoice_file(&sandbox.path(&format!("landing/f{n}.json")), 4, n * 20, 20).expect("write invoices");
    }
    sandbox.pipeline(&pipeline("available_now").replace("max_files_per_batch: 2", "max_files_per_batch: 1"));
    let table = sandbox.path("lake/bronze/invoices");
    let start = || {
        let mut command = sandbox.command(&["run", "pipeline.yaml"]);
        command.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().expect("start")
    };
    let (first, second) = (start(), start());
    let first = first.wait_with_output().expect("first run ends");
    let second = second.wait_with_output().expect("second run ends");
    let stderr = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        first.status.success() || second.status.success(),
        "no run succeeded:\n{}\n{}",
        stderr(&first),
        stderr(&second)
    );
    // A loser may stop with an error, never with a duplicate: a last run finishes whatever is left.
    sandbox.run_ok();
    assert_eq!(query_i64(&table, "SELECT COUNT(*) FROM t"), 120);
    assert_eq!(query_i64(&table, r#"SELECT COUNT(DISTINCT "InvoiceNumber") FROM t"#), 120);
    let mut versions = txn_versions(&table);
    versions.sort_unstable();
    assert_eq!(versions, vec![1, 2, 3, 4, 5, 6]);
}

#[test]
fn an_interval_pipeline_picks_up_new_files_and_stops_cleanly_on_sigterm() {
    let sandbox = Sandbox::new();
    write_invoice_file(&sandbox.path("landing/f0.json"), 2, 0, 10).expect("write invoices");
    sandbox.pipeline(&pipeline("{ interval: 1s }"));
    let table = sandbox.path("lake/bronze/invoices");
    let child = sandbox
        .command(&["run", "pipeline.yaml", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start");

    let wait_for_rows = |rows: i64| {
        let deadline = Instant::now() + Duration::from_secs(120);
        while table_version(&table).is_none() || query_i64(&table, "SELECT COUNT(*) FROM t") < rows {
            assert!(Instant::now() < deadline, "the running pipeline did not reach {rows} rows");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait_for_rows(10);
    write_invoice_file(&sandbox.path("landing/f1.json"), 2, 10, 15).expect("write invoices");
    wait_for_rows(25);

    let pid = i32::try_from(child.id()).expect("a pid");
    send_signal(pid, "TERM");
    let output = child.wait_with_output().expect("the run ends");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let summary: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&output.stdout).lines().last().unwrap_or_default())
            .expect("a summary");
    assert_eq!(summary["rows"].as_u64(), Some(25), "{summary}");
    assert_eq!(query_i64(&table, "SELECT COUNT(*) FROM t"), 25);
}

/// Sends a signal with the `kill` command (the workspace forbids `unsafe`, so no libc call).
fn send_signal(pid: i32, signal: &str) {
    let status =
        std::process::Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().expect("kill runs");
    assert!(status.success(), "kill -{signal} {pid} failed");
}
