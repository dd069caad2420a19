//! `sluice`: run and check pipelines.
//!
//! `run` and `validate` work on a pipeline file in this process (the embedded
//! runtime); `submit`, `status`, `list`, `stop` and `resume` talk to a
//! cluster's coordinators (`--coordinator` or `SLUICE_COORDINATOR`).
//!
//! Exit codes: 0 success, 1 the pipeline failed (or the cluster refused or
//! could not be reached), 2 the command line or the pipeline file is invalid,
//! 130 aborted by a second Ctrl-C.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use sluice_coordinator::pipeline_runner::RunFailure;
use sluice_coordinator::progress::{ProgressSink, RunSummary};
use sluice_proto::spec::{PipelineSpec, SchemaSpec, SourceSpec, Trigger, parse_pipeline};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::embedded::{Embedded, EmbeddedOptions};
use crate::remote::{ClientError, Remote, state_name, status_json, status_text};
use crate::render::{peak_rss_bytes, render_progress, summary_lines};

#[derive(Debug, Parser)]
#[command(name = "sluice", version, about = "Load files incrementally into Delta Lake tables, exactly once.")]
struct Cli {
    /// Log filter (tracing syntax, e.g. `info` or `sluice_coordinator=debug`).
    #[arg(long, env = "SLUICE_LOG", default_value = "warn", global = true)]
    log: String,
    /// Log line format.
    #[arg(long, env = "SLUICE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// Coordinator address(es) of a cluster, comma-separated; the first that answers is used.
    #[arg(long, env = "SLUICE_COORDINATOR", default_value = crate::remote::DEFAULT_COORDINATOR, global = true)]
    coordinator: String,
    /// Bearer token for a cluster whose coordinators require one (`--auth-token-file`).
    #[arg(long, env = "SLUICE_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// The CA (PEM) that signed the coordinators' certificate, for `https://`
    /// addresses; the system's roots when not given.
    #[arg(long, env = "SLUICE_CA_CERT", global = true)]
    ca_cert: Option<std::path::PathBuf>,
    /// A client certificate (PEM), for coordinators that require one (`--tls-client-ca`).
    #[arg(long, env = "SLUICE_CLIENT_CERT", global = true, requires = "client_key")]
    client_cert: Option<std::path::PathBuf>,
    /// The private key of `--client-cert` (PEM).
    #[arg(long, env = "SLUICE_CLIENT_KEY", global = true, requires = "client_cert")]
    client_key: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a pipeline in this process (the embedded runtime: no cluster needed).
    Run {
        /// The pipeline file (YAML).
        pipeline: PathBuf,
        /// Print the run summary as one JSON object on the last line of stdout.
        #[arg(long)]
        json: bool,
        /// Concurrent tasks (worker slots); the number of cores by default.
        #[arg(long, env = "SLUICE_SLOTS")]
        slots: Option<usize>,
        /// Serve Prometheus metrics (`GET /metrics`) on this address while running.
        #[arg(long, env = "SLUICE_METRICS_LISTEN")]
        metrics_listen: Option<std::net::SocketAddr>,
    },
    /// Check a pipeline file (keys, values, schema, transform SQL) without running it.
    Validate {
        /// The pipeline file (YAML).
        pipeline: PathBuf,
    },
    /// Submit a pipeline to a cluster (see --coordinator). Relative paths in it
    /// resolve against the file's folder, which the coordinator and workers must see.
    Submit {
        /// The pipeline file (YAML).
        pipeline: PathBuf,
        /// Follow progress until the pipeline is caught up (available_now: its run
        /// completed; interval: its first round); exit non-zero if it fails.
        #[arg(long)]
        wait: bool,
        /// Replace a pipeline of the same name (it restarts from its durable progress).
        #[arg(long)]
        replace: bool,
    },
    /// Show a submitted pipeline's status: per flow batches, files, rows, Delta version, tasks, errors.
    Status {
        name: String,
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the pipelines submitted to the cluster.
    List {
        /// Print the list as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop a pipeline after its current micro-batch.
    Stop { name: String },
    /// Run a stopped, failed or completed pipeline again from where it stopped.
    Resume { name: String },
}

pub fn main() -> ExitCode {
    sluice_worker::allocator::keep_freed_memory();
    let cli = Cli::parse();
    init_tracing(&cli.log, cli.log_format);
    match cli.command {
        Command::Run { pipeline, json, slots, metrics_listen } => {
            let Some(spec) = load_spec(&pipeline) else { return ExitCode::from(2) };
            let mut options = EmbeddedOptions::default();
            if let Some(slots) = slots {
                options.slots = slots;
            }
            run(&spec, options, json, metrics_listen)
        }
        Command::Validate { pipeline } => {
            let Some(spec) = load_spec(&pipeline) else { return ExitCode::from(2) };
            validate(&spec)
        }
        command => {
            let remote = match Remote::new(&cli.coordinator).with_token(cli.token.as_deref()) {
                Ok(remote) => remote,
                Err(e) => {
                    eprintln!("error: --token: {e}");
                    return ExitCode::from(2);
                }
            };
            let tls = sluice_proto::tls::ClientTlsFiles {
                ca: cli.ca_cert.clone(),
                cert: cli.client_cert.clone(),
                key: cli.client_key.clone(),
            };
            let remote = match remote.with_tls(&tls) {
                Ok(remote) => remote,
                Err(e) => {
                    eprintln!("error: TLS: {e}");
                    return ExitCode::from(2);
                }
            };
            let runtime = match coordinator_runtime() {
                Ok(runtime) => runtime,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(cluster_command(&remote, command))
        }
    }
}

fn fail(error: &ClientError) -> ExitCode {
    eprintln!("error: {error}");
    ExitCode::from(error.exit_code())
}

async fn cluster_command(remote: &Remote, command: Command) -> ExitCode {
    match command {
        Command::Submit { pipeline, wait, replace } => {
            let text = match std::fs::read_to_string(&pipeline) {
                Ok(text) => text,
                Err(e) => {
                    eprintln!("error: cannot read the pipeline file {}: {e}", pipeline.display());
                    return ExitCode::from(2);
                }
            };
            let base = pipeline.parent().map(|p| if p.as_os_str().is_empty() { Path::new(".") } else { p });
            let base = base.and_then(|p| std::path::absolute(p).ok()).map(|p| p.display().to_string());
            let submitted = match remote.submit(text, base.unwrap_or_default(), replace).await {
                Ok(submitted) => submitted,
                Err(error) => return fail(&error),
            };
            let verb = if submitted.replaced { "replaced" } else { "submitted" };
            println!("{verb} pipeline {} (generation {})", submitted.name, submitted.generation);
            if !wait {
                return ExitCode::SUCCESS;
            }
            follow(remote, &submitted.name, submitted.generation).await
        }
        Command::Status { name, json } => match remote.status(&name).await {
            Ok(status) if json => {
                println!("{}", status_json(&status));
                ExitCode::SUCCESS
            }
            Ok(status) => {
                print!("{}", status_text(&status));
                ExitCode::SUCCESS
            }
            Err(error) => fail(&error),
        },
        Command::List { json } => match remote.list().await {
            Ok(pipelines) if json => {
                println!("{}", serde_json::Value::Array(pipelines.iter().map(status_json).collect()));
                ExitCode::SUCCESS
            }
            Ok(pipelines) => {
                if pipelines.is_empty() {
                    println!("no pipelines submitted");
                }
                for p in &pipelines {
                    let rows: u64 = p.flows.iter().map(|f| f.rows_done).sum();
                    let batches: u64 = p.flows.iter().map(|f| f.batches_committed).sum();
                    println!(
                        "{:<24} {:<10} generation {:<3} {} flow(s), {batches} batches, {rows} rows{}",
                        p.name,
                        state_name(p.state),
                        p.generation,
                        p.flows.len(),
                        if p.last_error.is_empty() { String::new() } else { format!("; error: {}", p.last_error) }
                    );
                }
                ExitCode::SUCCESS
            }
            Err(error) => fail(&error),
        },
        Command::Stop { name } => match remote.stop(&name).await {
            Ok(status) => {
                println!("pipeline {name}: {}", state_name(status.state));
                ExitCode::SUCCESS
            }
            Err(error) => fail(&error),
        },
        Command::Resume { name } => match remote.resume(&name).await {
            Ok(status) => {
                println!("pipeline {name}: resumed (generation {})", status.generation);
                ExitCode::SUCCESS
            }
            Err(error) => fail(&error),
        },
        Command::Run { .. } | Command::Validate { .. } => unreachable!("handled by main"),
    }
}

/// `submit --wait`: prints each flow's progress as it changes, until the run is caught up.
async fn follow(remote: &Remote, name: &str, generation: u64) -> ExitCode {
    use sluice_proto::pb::v1::{PipelineState, PipelineStatus};
    let is = |s: &PipelineStatus, state: PipelineState| s.state == state as i32;
    let mut printed: std::collections::HashMap<String, (u64, String)> = Default::default();
    let each = |status: &PipelineStatus| {
        if status.generation != generation {
            return;
        }
        for f in &status.flows {
            let seen = printed.entry(f.name.clone()).or_default();
            if f.batches_committed != seen.0 && f.batches_committed > 0 {
                println!(
                    "{}: {} batches, {} files, {} rows committed (Delta version {})",
                    f.name, f.batches_committed, f.files_done, f.rows_done, f.last_delta_version
                );
            }
            if !f.last_error.is_empty() && f.last_error != seen.1 {
                eprintln!("{}: error, retrying: {}", f.name, f.last_error);
            }
            *seen = (f.batches_committed, f.last_error.clone());
        }
    };
    let done = |s: &PipelineStatus| {
        s.generation == generation
            && (is(s, PipelineState::Completed)
                || is(s, PipelineState::Failed)
                || is(s, PipelineState::Stopped)
                || (is(s, PipelineState::Waiting) && s.flows.iter().all(|f| f.caught_up)))
    };
    match remote.watch(name, std::time::Duration::from_secs(60), each, done).await {
        Ok(status) if is(&status, PipelineState::Completed) || is(&status, PipelineState::Waiting) => {
            let rows: u64 = status.flows.iter().map(|f| f.rows_done).sum();
            let files: u64 = status.flows.iter().map(|f| f.files_done).sum();
            println!("pipeline {name}: caught up: {files} files, {rows} rows");
            ExitCode::SUCCESS
        }
        Ok(status) => {
            eprintln!("error: pipeline {name} {}: {}", state_name(status.state), status.last_error);
            ExitCode::FAILURE
        }
        Err(error) => fail(&error),
    }
}

fn init_tracing(filter: &str, format: LogFormat) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        // Colours only on a terminal: a log file or a pipe gets plain text.
        LogFormat::Text => builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Reads and validates the pipeline file; prints the error and returns `None` if it is not valid.
fn load_spec(path: &Path) -> Option<PipelineSpec> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("error: cannot read the pipeline file {}: {e}", path.display());
            return None;
        }
    };
    let base = path.parent().map(|p| if p.as_os_str().is_empty() { Path::new(".") } else { p });
    let base = base.and_then(|p| std::path::absolute(p).ok());
    match parse_pipeline(&text, base.as_deref()) {
        Ok(spec) => Some(spec),
        Err(e) => {
            eprintln!("error: {}: {e}", path.display());
            None
        }
    }
}

fn coordinator_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).thread_name("sluice-coordinator").enable_all().build()
}

fn run(spec: &PipelineSpec, options: EmbeddedOptions, json: bool, metrics: Option<std::net::SocketAddr>) -> ExitCode {
    let (runtime, embedded) = match (coordinator_runtime(), Embedded::start(options)) {
        (Ok(runtime), Ok(embedded)) => (runtime, embedded),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(address) = metrics
        && let Err(e) = runtime.block_on(async { sluice_worker::telemetry::serve_metrics(address) })
    {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let result = runtime.block_on(async {
        let cancel = CancellationToken::new();
        tokio::spawn(stop_on_signals(cancel.clone(), spec.trigger));
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        let renderer = tokio::spawn(render_progress(receiver));
        let result = embedded.run(spec, ProgressSink::new(sender), cancel).await;
        let _ = renderer.await;
        result
    });
    drop(embedded);
    drop(runtime);
    match result {
        Ok(summary) => {
            print_summary(&summary, None, json);
            ExitCode::SUCCESS
        }
        Err(RunFailure { error, summary }) => {
            eprintln!("error: {error}");
            if error.is_retryable() {
                eprintln!("hint: the error may be transient; running the pipeline again resumes where it stopped");
            } else {
                eprintln!("hint: nothing of the failed batch was committed; fix the cause and run again to resume");
            }
            print_summary(&summary, Some(error.to_string()), json);
            ExitCode::FAILURE
        }
    }
}

fn print_summary(summary: &RunSummary, error: Option<String>, json: bool) {
    if json {
        let mut value = serde_json::to_value(summary).unwrap_or_default();
        if let Some(object) = value.as_object_mut() {
            object.insert("peak_rss_bytes".to_string(), peak_rss_bytes().into());
            if let Some(error) = error {
                object.insert("error".to_string(), error.into());
            }
        }
        println!("{value}");
    } else {
        for line in summary_lines(summary) {
            println!("{line}");
        }
    }
}

/// First Ctrl-C or SIGTERM: stop after the current batch. Second: abort at once
/// (safe too: an interrupted batch is finished by the next run).
async fn stop_on_signals(cancel: CancellationToken, trigger: Trigger) {
    let mut stops = 0;
    loop {
        wait_for_stop_signal().await;
        stops += 1;
        if stops > 1 {
            eprintln!("aborting; the interrupted batch will be finished by the next run");
            std::process::exit(130);
        }
        if trigger != Trigger::AvailableNow || !cancel.is_cancelled() {
            eprintln!("stopping after the current batch (press Ctrl-C again to abort now)");
        }
        cancel.cancel();
    }
}

#[cfg(unix)]
async fn wait_for_stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_stop_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

fn validate(spec: &PipelineSpec) -> ExitCode {
    let runtime = match coordinator_runtime() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("pipeline {}: {} flow(s), checkpoint {}", spec.name, spec.flows.len(), spec.checkpoint);
    let mut valid = true;
    if let Err(e) = sluice_coordinator::pipeline_runner::preflight(spec) {
        valid = false;
        eprintln!("error: {e}");
    }
    for flow in &spec.flows {
        let (source, what) = match &flow.source {
            SourceSpec::Files(files) => (files, String::new()),
            SourceSpec::Watermark(w) if flow.source.files().is_some() => (
                flow.source.files().expect("a folder of files"),
                format!("rows beyond the watermark on `{}` of ", w.column),
            ),
            SourceSpec::DeltaChanges(_) | SourceSpec::Delta(_) | SourceSpec::Watermark(_) => {
                let table = flow.source.table().expect("a Delta source");
                let what = match &flow.source {
                    SourceSpec::Delta(_) => "snapshot".to_string(),
                    SourceSpec::Watermark(w) => format!("rows beyond the watermark on `{}`", w.column),
                    _ => "change data feed".to_string(),
                };
                println!(
                    "  {}: {what} of {} -> {} ({:?}; txn app id {})",
                    flow.name,
                    table.url,
                    flow.sink.table,
                    flow.sink.mode,
                    flow.app_id(&spec.name)
                );
                println!("    the transform is checked against the source table's schema when the flow runs");
                continue;
            }
        };
        println!(
            "  {}: {what}{:?} files in {} -> {} (txn app id {})",
            flow.name,
            source.format,
            source.location,
            flow.sink.table,
            flow.app_id(&spec.name)
        );
        let SchemaSpec::Declared(schema) = &source.schema else {
            println!("    schema: inferred from the first batch; the transform is checked then");
            continue;
        };
        let checked = runtime.block_on(async {
            let relation = sluice_worker::metadata::with_metadata_field(schema).map_err(|e| e.to_string())?;
            sluice_worker::transform::output_schema(Arc::clone(&relation), &[], flow.transform.as_deref())
                .await
                .map_err(|e| e.to_string())
        });
        match checked {
            Ok(output) => {
                let columns: Vec<String> =
                    output.fields().iter().map(|f| format!("{} {}", f.name(), f.data_type())).collect();
                println!("    output columns: {}", columns.join(", "));
            }
            Err(e) => {
                valid = false;
                eprintln!("error: flow `{}`: {e}", flow.name);
            }
        }
    }
    if valid { ExitCode::SUCCESS } else { ExitCode::from(2) }
}
