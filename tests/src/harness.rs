//! Runs the real `sluice` binary in a scratch folder and reads Delta tables back.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::util::pretty::pretty_format_batches;
use datafusion::prelude::{SessionConfig, SessionContext};
use url::Url;

/// The `sluice` program under test: `$SLUICE_BIN` (e.g. a release build), or
/// this package's `sluice-cli` binary, which is `sluice_client::cli::main` like
/// `sluice` itself and which cargo rebuilds before running these tests.
pub fn sluice_bin() -> PathBuf {
    if let Ok(path) = std::env::var("SLUICE_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("the test executable has a path");
    let name = format!("sluice-cli{}", std::env::consts::EXE_SUFFIX);
    // Beside this program (a benchmark in target/<profile>/), or one folder up
    // (a test in target/<profile>/deps/).
    let here = exe.parent().expect("a folder").join(&name);
    let bin = if here.exists() {
        here
    } else {
        exe.parent().and_then(Path::parent).expect("tests run from target/<profile>/deps").join(&name)
    };
    assert!(bin.exists(), "{} is missing: `cargo test` builds it", bin.display());
    bin
}

/// A scratch folder with `landing/`, a pipeline file and a lake.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
}

/// What a finished `sluice` process printed.
#[derive(Debug)]
pub struct RunOutput {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl RunOutput {
    /// The JSON summary `--json` prints on the last line of stdout.
    pub fn summary(&self) -> serde_json::Value {
        let last = self.stdout.lines().last().unwrap_or_default();
        serde_json::from_str(last).unwrap_or_else(|e| panic!("no JSON summary ({e}) in:\n{self:?}"))
    }
}

impl From<Output> for RunOutput {
    fn from(output: Output) -> Self {
        Self {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Sandbox {
    pub fn new() -> Self {
        Self { dir: tempfile::tempdir().expect("a temporary folder") }
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    pub fn write(&self, relative: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.path(relative);
        std::fs::create_dir_all(path.parent().expect("a parent folder")).expect("create folders");
        std::fs::write(&path, contents).expect("write a file");
        path
    }

    /// Writes `pipeline.yaml` in the sandbox root.
    pub fn pipeline(&self, yaml: &str) -> PathBuf {
        self.write("pipeline.yaml", yaml)
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(sluice_bin());
        command.args(args).current_dir(self.dir.path()).env("SLUICE_LOG", "warn").env_remove("SLUICE_FAILPOINTS");
        command
    }

    /// Runs `sluice run pipeline.yaml --json` to the end.
    pub fn run(&self) -> RunOutput {
        self.run_args(&["run", "pipeline.yaml", "--json"])
    }

    pub fn run_args(&self, args: &[&str]) -> RunOutput {
        self.command(args).output().expect("sluice starts").into()
    }

    /// Runs the pipeline and asserts it succeeded; returns the JSON summary.
    pub fn run_ok(&self) -> serde_json::Value {
        let output = self.run();
        assert_eq!(output.code, Some(0), "sluice run failed:\n{}\n{}", output.stdout, output.stderr);
        output.summary()
    }

    /// Starts `sluice run` with failpoints set, and waits until it reports reaching `failpoint`.
    pub fn run_until_failpoint(&self, failpoint: &str, timeout: Duration) -> Child {
        let mut child = self
            .command(&["run", "pipeline.yaml"])
            .env("SLUICE_FAILPOINTS", failpoint)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("sluice starts");
        let stderr = child.stderr.take().expect("piped stderr");
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = sender.send(line);
            }
        });
        let marker = format!("failpoint {failpoint} reached");
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match receiver.recv_timeout(left) {
                Ok(line) if line.contains(&marker) => return child,
                Ok(line) => seen.push(line),
                Err(_) => {
                    let _ = child.kill();
                    panic!("sluice did not reach failpoint {failpoint} in {timeout:?}; stderr:\n{}", seen.join("\n"));
                }
            }
        }
    }
}

/// Kills a process with SIGKILL and reaps it.
pub fn kill_hard(mut child: Child) {
    child.kill().expect("SIGKILL the process");
    let _ = child.wait();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime")
}

/// Runs `sql` against the Delta table at `table` (registered as `t`; identifiers
/// are case-sensitive, as in Sluice's transforms).
pub fn query(table: &Path, sql: &str) -> Vec<RecordBatch> {
    let url = Url::from_directory_path(table).expect("an absolute table path");
    query_url(&url, &HashMap::new(), sql)
}

/// Runs `sql` against the Delta table at `url` (any store Sluice supports,
/// with its storage `options`), registered as `t`.
pub fn query_url(url: &Url, options: &HashMap<String, String>, sql: &str) -> Vec<RecordBatch> {
    sluice_worker::storage::register_with_deltalake();
    runtime().block_on(async {
        let delta = deltalake::DeltaTableBuilder::from_url(url.clone())
            .map(|b| b.with_storage_options(options.clone()))
            .unwrap_or_else(|e| panic!("open {url}: {e}"))
            .load()
            .await
            .unwrap_or_else(|e| panic!("open {url}: {e}"));
        let mut config = SessionConfig::new();
        config.options_mut().sql_parser.enable_ident_normalization = false;
        let ctx = SessionContext::new_with_config(config);
        delta.update_datafusion_session(&ctx.state()).expect("register the table's store");
        ctx.register_table("t", delta.table_provider().await.expect("a table provider")).expect("register t");
        ctx.sql(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .collect()
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    })
}

/// The single value of a one-row, one-column query, as an i64.
pub fn query_i64(table: &Path, sql: &str) -> i64 {
    let batches = query(table, sql);
    let column = arrow::compute::cast(batches[0].column(0), &arrow::datatypes::DataType::Int64).expect("a number");
    column.as_any().downcast_ref::<arrow::array::Int64Array>().expect("an Int64 column").value(0)
}

/// The single value of a one-row, one-column query, as text ("" for NULL).
pub fn query_string(table: &Path, sql: &str) -> String {
    use arrow::array::Array;
    let batches = query(table, sql);
    let column = arrow::compute::cast(batches[0].column(0), &arrow::datatypes::DataType::Utf8).expect("text");
    let column = column.as_any().downcast_ref::<arrow::array::StringArray>().expect("a Utf8 column");
    if column.is_null(0) { String::new() } else { column.value(0).to_string() }
}

/// Writes `batch` as a Parquet file at `path`, creating its folder.
pub fn write_parquet(path: &Path, batch: &RecordBatch) {
    std::fs::create_dir_all(path.parent().expect("a parent")).expect("folders");
    let file = std::fs::File::create(path).expect("create");
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).expect("a writer");
    writer.write(batch).expect("write");
    writer.close().expect("close");
}

/// Query results as text, for comparisons and failure messages.
pub fn query_text(table: &Path, sql: &str) -> String {
    pretty_format_batches(&query(table, sql)).expect("printable batches").to_string()
}

/// The table's latest version, or `None` if there is no Delta table there.
pub fn table_version(table: &Path) -> Option<i64> {
    runtime().block_on(async {
        let url = Url::from_directory_path(table).expect("an absolute table path");
        deltalake::open_table(url).await.ok().and_then(|t| t.version()).map(|v| v as i64)
    })
}

/// The committed Delta log entries (`_delta_log/*.json`), in order.
pub fn log_entries(table: &Path) -> Vec<Vec<serde_json::Value>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(table.join("_delta_log"))
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    paths.retain(|p| {
        p.extension().is_some_and(|e| e == "json")
            && p.file_stem().is_some_and(|s| s.to_string_lossy().chars().all(|c| c.is_ascii_digit()))
    });
    paths.sort();
    paths
        .iter()
        .map(|p| {
            std::fs::read_to_string(p)
                .expect("read a log entry")
                .lines()
                .map(|l| serde_json::from_str(l).expect("a JSON action"))
                .collect()
        })
        .collect()
}

/// The table's current `metaData` action (its schema, configuration, ...): the last in the log.
pub fn table_metadata(table: &Path) -> serde_json::Value {
    log_entries(table)
        .iter()
        .flatten()
        .filter_map(|a| a.get("metaData"))
        .next_back()
        .cloned()
        .expect("a metaData action")
}

/// The `commitInfo` of each commit, in log order.
pub fn commit_infos(table: &Path) -> Vec<serde_json::Value> {
    log_entries(table).iter().flatten().filter_map(|a| a.get("commitInfo").cloned()).collect()
}

/// The txn versions committed to the table, in log order (one per batch).
pub fn txn_versions(table: &Path) -> Vec<i64> {
    log_entries(table)
        .iter()
        .flatten()
        .filter_map(|a| a.get("txn"))
        .map(|t| t["version"].as_i64().expect("a version"))
        .collect()
}
