//! Sources, sinks and checkpoints on object storage, against real servers on
//! loopback: moto's S3 server and Azure's emulator (azurite). Tables are read
//! back through delta-rs with the same stores Sluice uses.

use std::collections::{BTreeMap, HashMap};
use std::process::Command;

use sluice_proto::storage::StorageOptions;
use sluice_tests::harness::{RunOutput, Sandbox, query_url};
use sluice_tests::invoices::{INVOICE_SCHEMA, invoice};
use sluice_tests::object_stores::{AZURITE_ACCOUNT, AZURITE_KEY, Azurite, Moto};
use url::Url;

/// `count` invoices from `first` as NDJSON.
fn invoices(seed: u64, first: u64, count: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for index in first..first + count {
        serde_json::to_writer(&mut out, &invoice(seed, index)).expect("an invoice");
        out.push(b'\n');
    }
    out
}

/// Writes an object through the same object_store builders Sluice uses.
fn put(url: &str, options: &HashMap<String, String>, body: Vec<u8>) {
    use object_store::ObjectStoreExt;
    let url = Url::parse(url).expect("a URL");
    let storage = StorageOptions { base: options.clone().into_iter().collect(), scopes: Vec::new() };
    let (store, path) = sluice_worker::storage::store_for(&url, &storage).expect("a store");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(store.put(&path, body.into()))
        .expect("put the object");
}

fn s3_options(moto: &Moto) -> HashMap<String, String> {
    moto.env().into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v)).collect()
}

fn pipeline(checkpoint: &str, landing: &str, table: &str, extra: &str) -> String {
    format!(
        r#"
pipeline: retail
checkpoint: {checkpoint}
trigger: available_now
{extra}
flows:
  - name: invoices_bronze
    source:
      files:
        path: {landing}
        format: json
        schema: "{INVOICE_SCHEMA}"
        max_files_per_batch: 2
    transform: SELECT *, _metadata.file_path AS source_file FROM source
    sink:
      table: {table}
"#
    )
}

/// `sluice run pipeline.yaml --json` with `env` as the only object-store configuration.
fn run(sandbox: &Sandbox, env: &[(String, String)]) -> RunOutput {
    let mut command: Command = sandbox.command(&["run", "pipeline.yaml", "--json"]);
    for (key, _) in std::env::vars() {
        if key.starts_with("AWS_") || key.starts_with("AZURE") {
            command.env_remove(key);
        }
    }
    command.envs(env.iter().cloned());
    command.output().expect("sluice starts").into()
}

fn run_ok(sandbox: &Sandbox, env: &[(String, String)]) -> serde_json::Value {
    let output = run(sandbox, env);
    assert_eq!(output.code, Some(0), "sluice run failed:\n{}\n{}", output.stdout, output.stderr);
    output.summary()
}

fn count(url: &str, options: &HashMap<String, String>, sql: &str) -> i64 {
    let batches = query_url(&Url::parse(url).expect("a URL"), options, sql);
    let column = arrow::compute::cast(batches[0].column(0), &arrow::datatypes::DataType::Int64).expect("a number");
    column.as_any().downcast_ref::<arrow::array::Int64Array>().expect("Int64").value(0)
}

/// The `sluice.batch` of every commit of the table, in commit order.
fn committed_batches(url: &str, options: &HashMap<String, String>) -> Vec<i64> {
    sluice_worker::storage::register_with_deltalake();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    runtime.block_on(async {
        let table = deltalake::DeltaTableBuilder::from_url(Url::parse(url).expect("a URL"))
            .expect("a builder")
            .with_storage_options(options.clone())
            .load()
            .await
            .expect("the table loads");
        use futures::TryStreamExt;
        let infos: Vec<_> = table.history(None).try_collect().await.expect("history");
        let mut batches: Vec<i64> = infos
            .into_iter()
            .filter_map(|info| serde_json::to_value(info).ok())
            .filter_map(|info| info.get("sluice.batch").and_then(|b| b.as_i64()))
            .collect();
        batches.reverse();
        batches
    })
}

#[test]
fn s3_source_sink_and_checkpoint_ingest_each_file_once() {
    let moto = Moto::start();
    moto.create_bucket("landing");
    moto.create_bucket("lake");
    let options = s3_options(&moto);
    for n in 0..3 {
        put(&format!("s3://landing/invoices/2026-12-01/f{n}.json"), &options, invoices(1, n * 40, 40));
    }
    let sandbox = Sandbox::new();
    let table = "s3://lake/bronze/invoices";
    sandbox.pipeline(&pipeline("s3://lake/_checkpoints/retail", "s3://landing/invoices", table, ""));

    let summary = run_ok(&sandbox, &moto.env());
    assert_eq!((summary["batches"].as_u64(), summary["rows"].as_u64()), (Some(2), Some(120)), "{summary}");
    assert_eq!(count(table, &options, "SELECT COUNT(*) FROM t"), 120);
    assert_eq!(count(table, &options, r#"SELECT COUNT(DISTINCT "InvoiceNumber") FROM t"#), 120);
    assert_eq!(
        count(
            table,
            &options,
            "SELECT COUNT(*) FROM t WHERE source_file LIKE 's3://landing/invoices/2026-12-01/f%.json'"
        ),
        120
    );
    assert_eq!(committed_batches(table, &options), vec![1, 2]);

    // Nothing new: no commit. One new file: only it.
    let summary = run_ok(&sandbox, &moto.env());
    assert_eq!(summary["batches"].as_u64(), Some(0), "{summary}");
    put("s3://landing/invoices/2026-12-02/f3.json", &options, invoices(1, 120, 15));
    let summary = run_ok(&sandbox, &moto.env());
    assert_eq!((summary["files"].as_u64(), summary["rows"].as_u64()), (Some(1), Some(15)), "{summary}");
    assert_eq!(count(table, &options, "SELECT COUNT(*) FROM t"), 135);
    assert_eq!(committed_batches(table, &options), vec![1, 2, 3]);
}

#[test]
fn storage_options_in_the_pipeline_file_take_secrets_from_the_environment_and_never_show_them() {
    let moto = Moto::start();
    moto.create_bucket("lake");
    let options = s3_options(&moto);
    put("s3://lake/landing/a.json", &options, invoices(2, 0, 10));
    let sandbox = Sandbox::new();
    let storage = format!(
        r#"storage_options:
  aws_endpoint: {}
  aws_access_key_id: testing
  aws_secret_access_key: "${{LAKE_SECRET}}"
  aws_region: us-east-1
  aws_allow_http: true"#,
        moto.endpoint()
    );
    let table = "s3://lake/bronze/invoices";
    sandbox.pipeline(&pipeline("s3://lake/_checkpoints/retail", "s3://lake/landing", table, &storage));
    let env = [("LAKE_SECRET".to_string(), "testing-secret".to_string())];
    let summary = run_ok(&sandbox, &env);
    assert_eq!(summary["rows"].as_u64(), Some(10), "{summary}");
    assert_eq!(count(table, &options, "SELECT COUNT(*) FROM t"), 10);

    // Without the variable, the run stops before anything happens and says which.
    let output = run(&sandbox, &[]);
    assert_eq!(output.code, Some(1), "{output:?}");
    assert!(output.stderr.contains("${LAKE_SECRET}, which is not set"), "{}", output.stderr);

    // A misspelt option is named, and an inline secret is shown nowhere.
    let secret = "inline-s3cret-do-not-print";
    let bad = storage.replace("aws_region", "aws_regoin").replace("\"${LAKE_SECRET}\"", secret);
    sandbox.pipeline(&pipeline("s3://lake/_checkpoints/retail", "s3://lake/landing", table, &bad));
    for args in [&["run", "pipeline.yaml"][..], &["validate", "pipeline.yaml"][..]] {
        let output: RunOutput = sandbox.command(args).output().expect("sluice starts").into();
        assert_ne!(output.code, Some(0), "{output:?}");
        assert!(output.stderr.contains("unknown storage option `aws_regoin` for S3"), "{}", output.stderr);
        assert!(!output.stderr.contains(secret) && !output.stdout.contains(secret), "{output:?}");
    }
}

#[test]
fn two_runs_racing_on_s3_commit_each_batch_once() {
    let moto = Moto::start();
    moto.create_bucket("lake");
    let options = s3_options(&moto);
    for n in 0..4 {
        put(&format!("s3://lake/landing/f{n}.json"), &options, invoices(3, n * 20, 20));
    }
    let sandbox = Sandbox::new();
    let table = "s3://lake/bronze/invoices";
    let yaml = pipeline("s3://lake/_checkpoints/retail", "s3://lake/landing", table, "")
        .replace("max_files_per_batch: 2", "max_files_per_batch: 1");
    sandbox.pipeline(&yaml);
    let spawn = || {
        let mut command = sandbox.command(&["run", "pipeline.yaml"]);
        command.envs(moto.env()).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
        command.spawn().expect("sluice starts")
    };
    let (mut first, mut second) = (spawn(), spawn());
    let _ = (first.wait(), second.wait());
    // A loser may stop with an error, never with a duplicate: a last run finishes whatever is left.
    run_ok(&sandbox, &moto.env());
    assert_eq!(count(table, &options, "SELECT COUNT(*) FROM t"), 80);
    assert_eq!(count(table, &options, r#"SELECT COUNT(DISTINCT "InvoiceNumber") FROM t"#), 80);
    let mut batches = committed_batches(table, &options);
    batches.sort_unstable();
    assert_eq!(batches, vec![1, 2, 3, 4], "each batch committed once");
}

#[test]
fn azure_source_sink_and_checkpoint_on_the_emulator() {
    let azurite = Azurite::start();
    azurite.create_container("lake");
    // The test writes with an explicit account, key and endpoint; Sluice reads
    // its configuration from the environment, as the emulator's users set it.
    let options: HashMap<String, String> = BTreeMap::from([
        ("azure_storage_account_name", AZURITE_ACCOUNT.to_string()),
        ("azure_storage_account_key", AZURITE_KEY.to_string()),
        ("azure_storage_endpoint", azurite.blob_endpoint()),
        ("azure_allow_http", "true".to_string()),
    ])
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for n in 0..3 {
        put(&format!("az://lake/landing/f{n}.json"), &options, invoices(4, n * 10, 10));
    }
    let sandbox = Sandbox::new();
    let table = "az://lake/bronze/invoices";
    sandbox.pipeline(&pipeline("az://lake/_checkpoints/retail", "az://lake/landing", table, ""));
    let summary = run_ok(&sandbox, &azurite.env());
    assert_eq!((summary["batches"].as_u64(), summary["rows"].as_u64()), (Some(2), Some(30)), "{summary}");
    assert_eq!(count(table, &options, "SELECT COUNT(*) FROM t"), 30);
    assert_eq!(count(table, &options, r#"SELECT COUNT(DISTINCT "InvoiceNumber") FROM t"#), 30);
    assert_eq!(committed_batches(table, &options), vec![1, 2]);
    let summary = run_ok(&sandbox, &azurite.env());
    assert_eq!(summary["batches"].as_u64(), Some(0), "{summary}");
}
