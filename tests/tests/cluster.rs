//! The distributed runtime with a real etcd server and real coordinator and
//! worker processes: workers killed or frozen mid-batch, the leader killed
//! mid-batch, etcd restarted mid-run, the CLI against it all, and a column
//! appearing mid-run with bad lines beside it. Every test reads the Delta
//! table back and checks each row is there exactly once.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sluice_tests::cluster::{Cluster, Etcd, free_port, reflected_services, wait_for_health};
use sluice_tests::harness::{self, Sandbox, query_i64, txn_versions};
use sluice_tests::invoices::{invoice_pipeline as pipeline, write_invoice_file};
use sluice_tests::object_stores::http;

const LONG: Duration = Duration::from_secs(180);

/// `files` files of 50 invoices each, numbered from 0.
fn sandbox_with_files(name: &str, files: u64, files_per_batch: u32) -> Sandbox {
    let sandbox = Sandbox::new();
    for n in 0..files {
        write_invoice_file(&sandbox.path(&format!("landing/f{n:03}.json")), 7, n * 50, 50).expect("write invoices");
    }
    sandbox.pipeline(&pipeline(name, "available_now", files_per_batch));
    sandbox
}

fn assert_exactly_once(table: &Path, rows: i64, batches: i64) {
    assert_eq!(query_i64(table, "SELECT COUNT(*) FROM t"), rows, "row count");
    assert_eq!(query_i64(table, r#"SELECT COUNT(DISTINCT "InvoiceNumber") FROM t"#), rows, "distinct invoices");
    assert_eq!(txn_versions(table), (1..=batches).collect::<Vec<_>>(), "each batch committed exactly once");
}

fn submit(cluster: &Cluster, sandbox: &Sandbox) {
    let output = cluster.cli(sandbox, &["submit", "pipeline.yaml"]);
    assert_eq!(output.code, Some(0), "submit failed: {output:?}");
}

/// Submits the sandbox's pipeline to a new cluster whose first worker stops
/// at its first read; once a second worker is up, the first is SIGKILLed there.
fn submit_and_kill_a_worker_mid_read(sandbox: &Sandbox) -> Cluster {
    let mut cluster = Cluster::new("3s");
    cluster.start_coordinator("");
    let doomed = cluster.start_worker(2, "during_read");
    submit(&cluster, sandbox);
    cluster.workers[doomed].wait_for("failpoint during_read reached", LONG);
    cluster.start_worker(2, "");
    cluster.workers[doomed].kill_hard();
    cluster
}

#[test]
fn etcd_store_passes_the_conformance_suite() {
    let etcd = Etcd::start();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a runtime");
    runtime.block_on(async {
        let options = sluice_proto::etcd::EtcdOptions::new(vec![etcd.endpoint()]);
        let store = sluice_proto::etcd::EtcdKv::connect(&options).await.expect("connect to etcd");
        sluice_proto::kv::conformance::run_all(&store, "/conformance").await;
        let store: Arc<dyn sluice_proto::kv::KvStore> = Arc::new(store);
        // A watch from a compacted revision reports a change instead of hanging or failing.
        let listing = store.list("/compaction/").await.expect("list");
        for n in 0..5 {
            store.put(&format!("/compaction/{n}"), vec![n]).await.expect("put");
        }
        let mut client = etcd_client::Client::connect([etcd.endpoint()], None).await.expect("connect");
        let now = store.list("/compaction/").await.expect("list").revision;
        client.compact(now as i64, None).await.expect("compact");
        let changed = store.wait_for_change("/compaction/", listing.revision, Duration::from_secs(5)).await;
        assert!(changed.expect("a watch from a compacted revision"), "the caller must list again");
    });
}

#[test]
fn a_worker_killed_mid_batch_loses_its_tasks_to_another_worker() {
    let sandbox = sandbox_with_files("killworker", 6, 3);
    let table = sandbox.path("lake/bronze/invoices");
    let cluster = submit_and_kill_a_worker_mid_read(&sandbox);

    let status = cluster.wait_for_state(&sandbox, "killworker", "completed", LONG);
    assert_eq!(status["flows"][0]["rows_done"], 300, "{status:#}");
    assert_exactly_once(&table, 300, 2);
}

#[test]
fn a_frozen_worker_past_its_lease_cannot_publish_its_late_result() {
    let sandbox = sandbox_with_files("frozen", 4, 4);
    let table = sandbox.path("lake/bronze/invoices");
    let mut cluster = Cluster::new("3s");
    cluster.start_coordinator("");
    let frozen = cluster.start_worker(4, "during_read=2s");
    submit(&cluster, &sandbox);
    cluster.workers[frozen].wait_for("failpoint during_read reached", LONG);
    cluster.workers[frozen].signal("STOP");
    cluster.start_worker(2, "");
    cluster.wait_for_state(&sandbox, "frozen", "completed", LONG);
    let rows_before = query_i64(&table, "SELECT COUNT(*) FROM t");

    // Thawed, the worker finds its lease gone; whatever it finished is discarded.
    cluster.workers[frozen].signal("CONT");
    cluster.workers[frozen].wait_for("lease lost", Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(query_i64(&table, "SELECT COUNT(*) FROM t"), rows_before);
    assert_exactly_once(&table, 200, 1);
    let status = cluster.status(&sandbox, "frozen");
    assert_eq!(status["state"], "completed", "{status:#}");
}

#[test]
fn the_standby_coordinator_finishes_the_batch_of_a_leader_killed_before_its_commit() {
    let sandbox = sandbox_with_files("failover", 6, 3);
    let table = sandbox.path("lake/bronze/invoices");
    let mut cluster = Cluster::new("3s");
    let leader = cluster.start_coordinator("before_commit");
    cluster.coordinators[leader].wait_for("this coordinator is the leader", LONG);
    let standby = cluster.start_coordinator("");
    cluster.coordinators[standby].wait_for("standing by", LONG);
    cluster.start_worker(2, "");
    submit(&cluster, &sandbox);
    cluster.coordinators[leader].wait_for("failpoint before_commit reached", LONG);
    cluster.coordinators[leader].kill_hard();

    let status = cluster.wait_for_state(&sandbox, "failover", "completed", LONG);
    assert!(cluster.coordinators[standby].logged("this coordinator is the leader"), "{}", cluster.logs());
    assert!(status["leader"].as_str().is_some_and(|l| l.contains("coordinator-1")), "{status:#}");
    assert_exactly_once(&table, 300, 2);
}

#[test]
fn a_run_survives_an_etcd_restart() {
    let sandbox = sandbox_with_files("etcdrestart", 6, 2);
    let table = sandbox.path("lake/bronze/invoices");
    let mut cluster = Cluster::new("5s");
    cluster.start_coordinator("");
    let coordinator = cluster.coordinator_urls[0].clone();
    let worker_health = format!("http://127.0.0.1:{}", free_port());
    let listen = worker_health.trim_start_matches("http://").to_string();
    let worker = cluster.start_worker_with(2, "during_read=3s", &["--health-listen", &listen]);
    wait_for_health(&coordinator, "SERVING", Duration::from_secs(30));
    wait_for_health(&worker_health, "SERVING", Duration::from_secs(30));
    submit(&cluster, &sandbox);
    cluster.workers[worker].wait_for("failpoint during_read reached", LONG);
    cluster.etcd.stop();
    // Both report themselves unready while etcd is away, and ready again after.
    wait_for_health(&coordinator, "NOT_SERVING", Duration::from_secs(15));
    wait_for_health(&worker_health, "NOT_SERVING", Duration::from_secs(15));
    cluster.etcd.restart();
    wait_for_health(&coordinator, "SERVING", Duration::from_secs(30));

    cluster.wait_for_state(&sandbox, "etcdrestart", "completed", LONG);
    assert_exactly_once(&table, 300, 3);
}

#[test]
fn the_cli_submits_lists_stops_and_resumes_and_explains_errors() {
    let sandbox = sandbox_with_files("clitest", 2, 10);
    let table = sandbox.path("lake/bronze/invoices");
    let mut cluster = Cluster::new("3s");
    cluster.start_coordinator("");
    cluster.start_worker(2, "");

    // Health checking and reflection, as grpcurl would use them.
    wait_for_health(&cluster.coordinator_urls[0], "SERVING", Duration::from_secs(30));
    let services = reflected_services(&cluster.coordinator_urls[0]);
    assert!(services.iter().any(|s| s == "sluice.v1.Sluice"), "{services:?}");
    assert!(services.iter().any(|s| s == "grpc.health.v1.Health"), "{services:?}");

    // submit --wait follows the run until it is caught up.
    let output = cluster.cli(&sandbox, &["submit", "pipeline.yaml", "--wait"]);
    assert_eq!(output.code, Some(0), "{output:?}");
    assert!(output.stdout.contains("caught up: 2 files, 100 rows"), "{}", output.stdout);
    assert_exactly_once(&table, 100, 1);

    // The same name again: refused unless replaced.
    let output = cluster.cli(&sandbox, &["submit", "pipeline.yaml"]);
    assert_eq!(output.code, Some(1), "{output:?}");
    assert!(output.stderr.contains("already exists") && output.stderr.contains("--replace"), "{}", output.stderr);

    // An invalid pipeline: the field is named, exit code 2, nothing stored.
    sandbox.write("broken.yaml", pipeline("broken", "available_now", 10).replace("format: json", "format: xml"));
    let output = cluster.cli(&sandbox, &["submit", "broken.yaml"]);
    assert_eq!(output.code, Some(2), "{output:?}");
    assert!(output.stderr.contains("format") && output.stderr.contains("xml"), "{}", output.stderr);

    // Unknown names.
    for command in [&["status", "nope"][..], &["stop", "nope"], &["resume", "nope"]] {
        let output = cluster.cli(&sandbox, command);
        assert_eq!(output.code, Some(1), "{command:?}: {output:?}");
        assert!(output.stderr.contains("no pipeline named `nope`"), "{}", output.stderr);
    }

    // An interval pipeline: stop it, land a file, resume it: the file is ingested once.
    sandbox.write("interval.yaml", pipeline("clitest", "{ interval: 1s }", 10));
    let output = cluster.cli(&sandbox, &["submit", "interval.yaml", "--replace", "--wait"]);
    assert_eq!(output.code, Some(0), "{output:?}");
    assert!(output.stdout.contains("replaced pipeline clitest (generation 2)"), "{}", output.stdout);
    let output = cluster.cli(&sandbox, &["stop", "clitest"]);
    assert_eq!(output.code, Some(0), "{output:?}");
    cluster.wait_for_state(&sandbox, "clitest", "stopped", LONG);
    write_invoice_file(&sandbox.path("landing/f100.json"), 7, 5000, 50).expect("write invoices");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(query_i64(&table, "SELECT COUNT(*) FROM t"), 100, "a stopped pipeline ingests nothing");
    let output = cluster.cli(&sandbox, &["resume", "clitest"]);
    assert_eq!(output.code, Some(0), "{output:?}");
    let deadline = std::time::Instant::now() + LONG;
    while query_i64(&table, "SELECT COUNT(*) FROM t") < 150 {
        assert!(std::time::Instant::now() < deadline, "the resumed pipeline did not ingest the new file");
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_exactly_once(&table, 150, 2);

    let output = cluster.cli(&sandbox, &["list"]);
    assert_eq!(output.code, Some(0), "{output:?}");
    assert!(output.stdout.contains("clitest") && output.stdout.contains("generation 3"), "{}", output.stdout);
    let output = cluster.cli(&sandbox, &["status", "clitest"]);
    assert!(
        output.stdout.contains("flow invoices_bronze") && output.stdout.contains("workers: 1 (2 slots)"),
        "{}",
        output.stdout
    );

    // A coordinator that is not there: one line, no transport error stack.
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let output = sandbox.command(&["list"]).env("SLUICE_COORDINATOR", &nowhere).output().expect("sluice starts");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cannot reach the coordinator") && stderr.contains(&nowhere), "{stderr}");
}

#[test]
fn the_medallion_example_runs_on_the_cluster_with_a_worker_killed_mid_task() {
    let sandbox = Sandbox::new();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/retail-medallion");
    sandbox.pipeline(&std::fs::read_to_string(example.join("pipeline.yaml")).expect("the example's pipeline"));
    for name in ["invoices-00000.json", "invoices-00001.json"] {
        let bytes = std::fs::read(example.join("landing/invoices").join(name)).expect("the example's file");
        sandbox.write(&format!("landing/invoices/{name}"), bytes);
    }
    let cluster = submit_and_kill_a_worker_mid_read(&sandbox);
    cluster.wait_for_state(&sandbox, "retail-medallion", "completed", LONG);

    // Silver merged, history and gold computed by workers, each committed once.
    let silver = sandbox.path("lake/silver/invoices");
    assert_eq!(query_i64(&silver, r#"SELECT COUNT(DISTINCT "InvoiceNumber") FROM t"#), 40);
    assert_eq!(query_i64(&silver, "SELECT COUNT(*) FROM t"), 40);
    let history = sandbox.path("lake/silver/invoice_history");
    assert_eq!(query_i64(&history, "SELECT COUNT(*) FROM t WHERE __end_at IS NULL"), 40);
    let gold = sandbox.path("lake/gold/daily_sales");
    assert_eq!(query_i64(&gold, r#"SELECT CAST(SUM("Invoices") AS BIGINT) FROM t"#), 40);
    for table in [&silver, &history, &gold] {
        assert_eq!(txn_versions(table), vec![0], "{}: one batch, for bronze's version 0", table.display());
    }
}

#[test]
fn on_the_cluster_a_new_column_evolves_the_table_and_bad_lines_go_to_quarantine_exactly_once() {
    let sandbox = Sandbox::new();
    let line = |i: i64, extra: &str| format!("{{\"id\": {i}, \"name\": \"n{i}\"{extra}}}\n");
    sandbox.write("in/1.json", (0..50).map(|i| line(i, "")).collect::<String>());
    // The second file: a new column half way through, two bad lines and a value of the wrong type.
    let mut second: String = (50..75).map(|i| line(i, "")).collect();
    second.push_str("not json at all\n{\"id\": 999, \"name\": \"cut\n");
    second.extend((75..100).map(|i| line(i, &format!(", \"color\": \"c{i}\""))));
    second.push_str("{\"id\": \"a hundred\", \"name\": \"typo\"}\n");
    sandbox.write("in/2.json", second);
    sandbox.pipeline(
        r#"
pipeline: evolving
checkpoint: ./cp
flows:
  - name: events
    source:
      files:
        path: ./in
        format: json
        schema: infer
        max_files_per_batch: 1
    sink:
      table: ./lake/events
"#,
    );
    let cluster = submit_and_kill_a_worker_mid_read(&sandbox);
    let status = cluster.wait_for_state(&sandbox, "evolving", "completed", LONG);

    let table = sandbox.path("lake/events");
    assert_eq!(query_i64(&table, "SELECT COUNT(*) FROM t"), 100, "{status}");
    assert_eq!(query_i64(&table, "SELECT COUNT(DISTINCT id) FROM t"), 100);
    assert_eq!(query_i64(&table, "SELECT COUNT(*) FROM t WHERE color IS NOT NULL"), 25);
    assert_eq!(txn_versions(&table), vec![1, 2], "each batch committed exactly once");
    let log = harness::log_entries(&table);
    assert!(log[1].iter().any(|a| a.get("metaData").is_some()), "the column arrives in the second batch's commit");
    let quarantine = sandbox.path("lake/events_quarantine");
    assert_eq!(query_i64(&quarantine, "SELECT COUNT(*) FROM t"), 3, "three bad lines, once each");
    assert_eq!(query_i64(&quarantine, "SELECT COUNT(*) FROM t WHERE file_path LIKE '%/2.json'"), 3);
    assert_eq!(txn_versions(&quarantine), vec![2]);
}

/// SIGTERM drains a worker: it takes no new task, finishes the one it runs and
/// exits. With no other worker, the pipeline completes only because it did.
/// The coordinator's Prometheus metrics count the committed batch.
#[test]
fn a_worker_sent_sigterm_mid_task_finishes_it_and_exits_and_metrics_count_the_batch() {
    let sandbox = sandbox_with_files("drain", 2, 2);
    let table = sandbox.path("lake/bronze/invoices");
    let mut cluster = Cluster::new("3s");
    let metrics_port = free_port();
    cluster.start_coordinator_with("", &["--metrics-listen", &format!("127.0.0.1:{metrics_port}")]);
    let worker = cluster.start_worker(1, "during_read=3s");
    submit(&cluster, &sandbox);
    cluster.workers[worker].wait_for("failpoint during_read reached", LONG);
    cluster.workers[worker].signal("TERM");
    assert_eq!(cluster.workers[worker].wait_exit(Duration::from_secs(60)), Some(0), "{}", cluster.logs());
    assert!(cluster.workers[worker].logged("draining"), "{}", cluster.logs());
    assert!(!cluster.workers[worker].logged("abandoning"), "{}", cluster.logs());

    let status = cluster.wait_for_state(&sandbox, "drain", "completed", LONG);
    assert_eq!(status["flows"][0]["rows_done"], 100, "{status:#}");
    assert_exactly_once(&table, 100, 1);

    let (code, metrics) = http(metrics_port, "GET", "/metrics", b"");
    assert_eq!(code, 200, "{metrics}");
    let labels = r#"{pipeline="drain",flow="invoices_bronze"}"#;
    for (name, value) in [("sluice_batches_committed_total", 1), ("sluice_rows_total", 100), ("sluice_files_total", 2)]
    {
        let line = format!("{name}{labels} {value}");
        assert!(metrics.lines().any(|l| l == line), "no `{line}` in:\n{metrics}");
    }
    assert!(metrics.contains("sluice_commit_duration_seconds_bucket"), "{metrics}");
}

/// A coordinator started with `--auth-token-file` and `--allowed-locations`:
/// calls without the token are refused (health checking stays open for
/// probes), a rotated token takes effect, and a pipeline writing outside the
/// allowed locations is refused at submission.
#[test]
fn the_api_requires_its_bearer_token_and_refuses_locations_outside_the_allow_list() {
    let sandbox = sandbox_with_files("guarded", 1, 1);
    let token = sandbox.write("secrets/token", "first-token\n");
    let allowed = url::Url::from_directory_path(sandbox.dir.path()).expect("a URL").to_string();
    let mut cluster = Cluster::new("3s");
    cluster.start_coordinator_with(
        "",
        &["--auth-token-file", token.to_str().expect("a path"), "--allowed-locations", &allowed],
    );
    cluster.start_worker(2, "");
    let url = cluster.coordinator_urls[0].clone();
    let cli = |token: Option<&str>, args: &[&str]| -> harness::RunOutput {
        let mut command = sandbox.command(args);
        command.env("SLUICE_COORDINATOR", &url).env_remove("SLUICE_TOKEN");
        if let Some(token) = token {
            command.env("SLUICE_TOKEN", token);
        }
        command.output().expect("sluice starts").into()
    };

    let output = cli(None, &["list"]);
    assert_eq!(output.code, Some(1), "{output:?}");
    assert!(output.stderr.contains("requires a bearer token"), "{}", output.stderr);
    let output = cli(Some("wrong"), &["list"]);
    assert!(output.stderr.contains("not valid"), "{output:?}");
    assert_eq!(cli(Some("first-token"), &["list"]).code, Some(0));
    wait_for_health(&url, "SERVING", Duration::from_secs(30));

    // Rotated: the old token no longer opens the API, the new one does.
    std::thread::sleep(Duration::from_millis(20));
    sandbox.write("secrets/token", "second-token\n");
    assert!(cli(Some("first-token"), &["list"]).stderr.contains("not valid"));

    // A sink outside the allowed locations is refused before anything runs.
    let outside = tempfile::tempdir().expect("a folder");
    let yaml = std::fs::read_to_string(sandbox.path("pipeline.yaml")).expect("the pipeline");
    let elsewhere = yaml.replace("./lake/bronze/invoices", &outside.path().join("t").display().to_string());
    sandbox.write("elsewhere.yaml", elsewhere);
    let output = cli(Some("second-token"), &["submit", "elsewhere.yaml"]);
    assert_eq!(output.code, Some(2), "{output:?}");
    assert!(output.stderr.contains("outside the locations this deployment allows"), "{}", output.stderr);

    let output = cli(Some("second-token"), &["submit", "pipeline.yaml", "--wait"]);
    assert_eq!(output.code, Some(0), "{output:?}\n{}", cluster.logs());
    assert_eq!(query_i64(&sandbox.path("lake/bronze/invoices"), "SELECT COUNT(*) FROM t"), 50);
}
