//! Shuffle stages on Ballista with real processes: a real etcd, a
//! coordinator (whose in-process Ballista scheduler runs the queries) and two
//! workers (each running a Ballista executor). A gold aggregation and a join
//! over a silver table run on Ballista, and their tables are compared row for
//! row with the same flows run locally by the embedded runtime; then a
//! worker, executor and all, is SIGKILLed while the query reads its part,
//! and the flow still completes exactly once.

use std::path::Path;

use datafusion_proto::physical_plan::AsExecutionPlan;
use std::time::Duration;

use sluice_tests::cluster::Cluster;
use sluice_tests::harness::{Sandbox, commit_infos, query_i64, query_text, table_version, txn_versions};
use sluice_tests::sales::{DAILY_SALES, gold_pipeline, load_silver};

const LONG: Duration = Duration::from_secs(180);

fn submit(cluster: &Cluster, sandbox: &Sandbox, file: &str) {
    let output = cluster.cli(sandbox, &["submit", file]);
    assert_eq!(output.code, Some(0), "submit failed: {output:?}");
}

/// Every row of the two tables is the same; the invoice totals first, for a short message.
fn assert_same_rows(flow: &str, ballista: &Path, local: &Path) {
    let total = |table: &Path| query_i64(table, "SELECT CAST(SUM(invoices) AS BIGINT) FROM t");
    assert_eq!(total(ballista), total(local), "{flow}: invoices counted on Ballista and locally");
    assert_eq!(rows(ballista), rows(local), "{flow}: Ballista and local differ");
}

/// The table's rows, sorted, as text.
fn rows(table: &Path) -> String {
    query_text(table, "SELECT * FROM t ORDER BY 1, 2")
}

/// The engine each batch's commit names.
fn engines(table: &Path) -> Vec<String> {
    commit_infos(table).iter().filter_map(|c| c["sluice.engine"].as_str().map(str::to_string)).collect()
}

/// Both gold tables of `gold` were written by one commit each, on Ballista,
/// carrying the silver version they read as txn version.
fn assert_committed_once_on_ballista(sandbox: &Sandbox, gold: &str) {
    let silver = table_version(&sandbox.path("lake/silver/sales")).expect("a silver table");
    for flow in ["daily_sales", "region_sales"] {
        let table = sandbox.path(&format!("lake/{gold}/{flow}"));
        assert_eq!(txn_versions(&table), vec![silver], "{flow}: one commit, for the silver version read");
        assert_eq!(engines(&table), vec!["ballista"], "{flow} ran on Ballista");
    }
}

/// The silver tables, and the gold flows run on them locally by the
/// embedded runtime, into `lake/local/`.
fn silver_and_local_gold() -> Sandbox {
    let sandbox = Sandbox::new();
    load_silver(&sandbox, 12, 400);
    sandbox.write("local.yaml", gold_pipeline("gold_local", "local", "local"));
    let output = sandbox.command(&["run", "local.yaml"]).output().expect("sluice starts");
    assert!(output.status.success(), "the local run failed: {}", String::from_utf8_lossy(&output.stderr));
    for flow in ["daily_sales", "region_sales"] {
        assert_eq!(engines(&sandbox.path(&format!("lake/local/{flow}"))), vec!["local"]);
    }
    sandbox
}

/// Both gold tables written on Ballista equal those computed locally, row for row.
fn assert_gold_equals_local(sandbox: &Sandbox) {
    for flow in ["daily_sales", "region_sales"] {
        let (ballista, local) =
            (sandbox.path(&format!("lake/gold/{flow}")), sandbox.path(&format!("lake/local/{flow}")));
        assert_same_rows(flow, &ballista, &local);
    }
}

#[test]
fn gold_aggregation_and_join_on_ballista_equal_the_local_result_row_for_row() {
    let sandbox = silver_and_local_gold();
    let mut cluster = Cluster::new("3s");
    cluster.start_coordinator("");
    cluster.start_worker(2, "");
    cluster.start_worker(2, "");
    // `auto`: both transforms need a shuffle and two workers are live.
    sandbox.write("gold.yaml", gold_pipeline("gold", "gold", "auto"));
    submit(&cluster, &sandbox, "gold.yaml");
    cluster.wait_for_state(&sandbox, "gold", "completed", LONG);

    assert_committed_once_on_ballista(&sandbox, "gold");
    assert_gold_equals_local(&sandbox);
    // And both equal DataFusion over the silver table directly.
    let silver = sandbox.path("lake/silver/sales");
    let direct = query_text(&silver, &format!("{} ORDER BY 1, 2", DAILY_SALES.replace("FROM source", "FROM t")));
    assert_eq!(rows(&sandbox.path("lake/gold/daily_sales")), direct);
    assert_eq!(query_i64(&sandbox.path("lake/gold/daily_sales"), "SELECT SUM(invoices) FROM t"), 12 * 400);
    // Every worker's executor ran part of the queries.
    for worker in &cluster.workers {
        assert!(worker.logged("Ballista executor started"), "{}:\n{}", worker.name, worker.log());
        assert!(worker.logged("Finished task"), "{} ran no Ballista task:\n{}", worker.name, worker.log());
    }
    let coordinator = cluster.coordinators[0].log();
    assert!(coordinator.contains("Ballista scheduler started"), "{coordinator}");
}

#[test]
fn an_executor_killed_mid_query_still_completes_the_flow_exactly_once() {
    let sandbox = silver_and_local_gold();
    let mut cluster = Cluster::new("3s");
    cluster.start_coordinator("");
    // The first worker's executor stops at its first scan of a partition for
    // good; the second's pauses at each for a while, so that its two slots
    // are busy and the first surely gets scans of its own.
    let doomed = cluster.start_worker(2, "ballista_scan");
    cluster.start_worker(2, "ballista_scan=1500ms");
    sandbox.write("gold.yaml", gold_pipeline("gold", "gold", "ballista"));
    submit(&cluster, &sandbox, "gold.yaml");
    cluster.workers[doomed].wait_for("failpoint ballista_scan reached", LONG);
    cluster.workers[doomed].kill_hard();
    cluster.wait_for_state(&sandbox, "gold", "completed", LONG);
    // The leader told its scheduler as soon as the worker's lease was gone,
    // and Ballista ran the lost executor's tasks again on the other.
    let coordinator = cluster.coordinators[0].log();
    assert!(coordinator.contains("reported the worker's Ballista executor lost"), "{coordinator}");
    assert!(coordinator.contains("on lost Executor worker-0"), "{coordinator}");

    assert_committed_once_on_ballista(&sandbox, "gold");
    assert_gold_equals_local(&sandbox);
}

/// The scan node alone, in one process: each partition reads only its files,
/// so every row is read once whatever the partitions, and the plan survives
/// the trip through the codec the scheduler and executors use.
#[test]
fn the_delta_scan_node_reads_each_file_once_and_round_trips_through_the_codec() {
    use datafusion::prelude::{SessionConfig, SessionContext};
    use sluice_worker::ballista::scan::{DeltaSource, physical_codec};
    let sandbox = Sandbox::new();
    load_silver(&sandbox, 12, 400);
    let url = url::Url::from_directory_path(sandbox.path("lake/silver/sales")).expect("a URL");
    let version = table_version(&sandbox.path("lake/silver/sales")).expect("a table") as u64;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a runtime");
    runtime.block_on(async {
        for partitions in [1, 5, 8, 20] {
            let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(partitions));
            let source = DeltaSource::open(url.as_str(), version, &Default::default()).await.expect("open");
            assert_eq!(source.file_count(), 12);
            ctx.register_table("source", std::sync::Arc::new(source)).expect("register");
            let frame =
                ctx.sql("SELECT COUNT(*) AS n, COUNT(DISTINCT invoice_id) AS d FROM source").await.expect("sql");
            let plan = frame.create_physical_plan().await.expect("a plan");
            let codec = physical_codec();
            let proto = datafusion_proto::protobuf::PhysicalPlanNode::try_from_physical_plan(plan, codec.as_ref())
                .expect("encode");
            let decoded = proto.try_into_physical_plan(&ctx.task_ctx(), codec.as_ref()).expect("decode");
            let batches = datafusion::physical_plan::collect(decoded, ctx.task_ctx()).await.expect("run");
            let text = arrow::util::pretty::pretty_format_batches(&batches).expect("text").to_string();
            assert!(text.contains("| 4800 | 4800 |"), "{partitions} partitions:\n{text}");
        }
    });
}
