//! Bronze ingest benchmark: generates retail invoice NDJSON (about 700 bytes an
//! invoice, 1 to 5 line items each), ingests it with the `sluice` binary of the
//! same build profile, and reports MB/s, rows/s and peak memory.
//!
//! `cargo run --release -p sluice-tests --bin sluice-bench -- --invoices 1000000`
//!
//! With `--cluster`, it also runs the same ingest on a local cluster (its own
//! etcd, one `sluice-coordinator`, then 1 and 2 `sluice-worker` processes of
//! `--slots` slots each) and reports each one's throughput and the overhead
//! against the embedded runtime with the same slots
//! (`cargo build --release --bins` first).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use bytesize::ByteSize;
use clap::Parser;
use sluice_tests::invoices::{INVOICE_SCHEMA, write_invoice_file};

#[derive(Parser)]
#[command(about = "Measure bronze ingest throughput and memory")]
struct Args {
    /// Invoices to ingest.
    #[arg(long, default_value_t = 1_000_000)]
    invoices: u64,
    /// Files to spread them over.
    #[arg(long, default_value_t = 64)]
    files: u64,
    /// Working folder; generated data is kept there and reused by later runs.
    #[arg(long, default_value = "target/bench")]
    dir: PathBuf,
    /// Worker slots for the run (default: the number of cores).
    #[arg(long)]
    slots: Option<usize>,
    /// Runs to make; each starts from an empty table.
    #[arg(long, default_value_t = 1)]
    runs: u32,
    /// Replace this percentage of the lines with bad ones (truncated JSON, not
    /// JSON, a value of the wrong type, bytes that are not UTF-8, in turn), to
    /// measure the cost of quarantining them.
    #[arg(long, default_value_t = 0.0)]
    bad_lines_percent: f64,
    /// `schema: infer` instead of the declared invoice schema.
    #[arg(long)]
    infer: bool,
    /// Also run on a local cluster with 1 and with 2 worker processes.
    #[arg(long)]
    cluster: bool,
    /// With --cluster: pin each worker process (and the embedded run) to a core
    /// of its own with `taskset`, as if each ran on a one-core machine, so that
    /// one worker cannot use the second worker's core.
    #[arg(long)]
    pin: bool,
}

fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.parent().context("the benchmark binary has a folder")?.join(name);
    if !bin.exists() {
        bail!("{} is missing: build it with `cargo build --release --bins`", bin.display());
    }
    Ok(bin)
}

/// `program`, run on core `core` (modulo the core count) with `taskset` when given.
fn pinned(program: PathBuf, core: Option<usize>) -> Command {
    match core {
        Some(core) => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let mut command = Command::new("taskset");
            command.arg("-c").arg((core % cores).to_string()).arg(program);
            command
        }
        None => Command::new(program),
    }
}

/// `sluice`, or `sluice-cli` beside it: the same program, built by
/// `cargo build --release -p sluice-tests --bins` with this benchmark.
fn sluice_binary() -> anyhow::Result<PathBuf> {
    binary("sluice").or_else(|_| binary("sluice-cli"))
}

/// Runs the pipeline in `dir` on a fresh local cluster with `workers` worker
/// processes of `slots` slots; returns the seconds from submit to caught up.
fn cluster_run(dir: &Path, workers: usize, slots: usize, pin: bool) -> anyhow::Result<f64> {
    use sluice_tests::cluster::{Etcd, free_port};
    use std::process::{Child, Stdio};
    struct Killed(Vec<Child>);
    impl Drop for Killed {
        fn drop(&mut self) {
            for child in &mut self.0 {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
    let etcd = Etcd::start();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut processes = Killed(Vec::new());
    let log = std::fs::File::create(dir.join(format!("cluster-{workers}.log")))?;
    processes.0.push(
        Command::new(binary("sluice-coordinator")?)
            .args(["--etcd", &etcd.endpoint(), "--listen", &format!("127.0.0.1:{port}"), "--log", "warn"])
            .args(["--ballista-listen", "127.0.0.1:0"])
            .stderr(log.try_clone()?)
            .spawn()?,
    );
    for index in 0..workers {
        let mut command = pinned(binary("sluice-worker")?, pin.then_some(index));
        command.args(["--etcd", &etcd.endpoint(), "--slots", &slots.to_string(), "--log", "warn"]);
        // Each worker's Ballista executor on a port of its own.
        command.args(["--ballista-listen", "127.0.0.1:0"]);
        processes.0.push(command.stderr(log.try_clone()?).spawn()?);
    }
    // Wait until the coordinator takes the probe pipeline (it answers) and its
    // status lists every worker (they have registered).
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    let mut probe_submitted = false;
    loop {
        if !probe_submitted {
            probe_submitted = Command::new(sluice_binary()?)
                .args(["--coordinator", &url, "submit", "probe.yaml"])
                .current_dir(dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()?
                .success();
        }
        if probe_submitted {
            let status =
                Command::new(sluice_binary()?).args(["--coordinator", &url, "status", "probe", "--json"]).output()?;
            let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap_or_default();
            if status["workers"].as_array().is_some_and(|w| w.len() == workers) {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!("the local cluster did not come up; see {}", dir.join(format!("cluster-{workers}.log")).display());
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let started = Instant::now();
    let output = Command::new(sluice_binary()?)
        .args(["--coordinator", &url, "submit", "pipeline.yaml", "--wait"])
        .current_dir(dir)
        .output()?;
    let seconds = started.elapsed().as_secs_f64();
    if !output.status.success() {
        bail!("submit --wait failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(seconds)
}

fn generate(landing: &Path, args: &Args) -> anyhow::Result<u64> {
    let marker = landing.join(format!("_generated-{}-{}-{}", args.invoices, args.files, args.bad_lines_percent));
    if marker.exists() {
        return Ok(std::fs::read_to_string(&marker)?.trim().parse()?);
    }
    if landing.exists() {
        std::fs::remove_dir_all(landing)?;
    }
    let started = Instant::now();
    let per_file = args.invoices.div_ceil(args.files.max(1));
    let mut bytes = 0;
    for n in 0..args.files.max(1) {
        let first = n * per_file;
        let count = per_file.min(args.invoices.saturating_sub(first));
        if count > 0 {
            let path = landing.join(format!("invoices-{n:05}.json"));
            bytes += write_invoice_file(&path, 1, first, count)?;
            if args.bad_lines_percent > 0.0 {
                bytes = bytes + spoil_lines(&path, args.bad_lines_percent)? - std::fs::metadata(&path)?.len();
            }
        }
    }
    std::fs::write(&marker, bytes.to_string())?;
    eprintln!("generated {} in {:.1}s", ByteSize(bytes), started.elapsed().as_secs_f64());
    Ok(bytes)
}

/// Replaces `percent` % of the file's lines, evenly spread, with bad lines of
/// four kinds in turn; returns the file's size before the change.
fn spoil_lines(path: &Path, percent: f64) -> anyhow::Result<u64> {
    let text = std::fs::read(path)?;
    let before = text.len() as u64;
    let every = (100.0 / percent).round().max(1.0) as usize;
    let mut out = Vec::with_capacity(text.len());
    for (index, line) in text.split(|b| *b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        if index % every == every / 2 {
            // SLUICE_BENCH_BAD_KIND=0..3 makes every bad line of one kind.
            let kind = std::env::var("SLUICE_BENCH_BAD_KIND").ok().and_then(|k| k.parse().ok());
            match kind.unwrap_or(index / every) % 4 {
                0 => out.extend_from_slice(&line[..line.len() / 2]),
                1 => out.extend_from_slice(b"this is not JSON at all"),
                2 => {
                    let text = String::from_utf8_lossy(line);
                    out.extend_from_slice(
                        text.replacen("\"TotalAmount\":", "\"TotalAmount\":\"n/a\",\"x\":", 1).as_bytes(),
                    );
                }
                _ => {
                    out.extend_from_slice(b"{\"InvoiceNumber\": \"\xff\xfe\"}");
                }
            }
        } else {
            out.extend_from_slice(line);
        }
        out.push(b'\n');
    }
    std::fs::write(path, out)?;
    Ok(before)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let sluice = sluice_binary()?;
    std::fs::create_dir_all(&args.dir)?;
    let dir = std::path::absolute(&args.dir)?;
    let landing = dir.join("landing");
    let bytes = generate(&landing, &args)?;
    let schema = if args.infer { "infer".to_string() } else { format!("\"{INVOICE_SCHEMA}\"") };
    let pipeline = format!(
        "pipeline: bench\ncheckpoint: ./lake/_checkpoints\nflows:\n  - name: invoices\n    source:\n      files:\n        path: ./landing\n        format: json\n        glob: \"*.json\"\n        schema: {schema}\n    sink:\n      table: ./lake/invoices\n"
    );
    std::fs::write(dir.join("pipeline.yaml"), pipeline)?;
    println!("input: {} invoices in {} files, {} ({bytes} bytes)", args.invoices, args.files, ByteSize(bytes));
    if args.cluster {
        // A probe pipeline with nothing to ingest, to see that the cluster is up.
        std::fs::create_dir_all(dir.join("probe-landing"))?;
        std::fs::write(
            dir.join("probe.yaml"),
            "pipeline: probe\ncheckpoint: ./probe-lake/_checkpoints\nflows:\n  - name: probe\n    source:\n      files:\n        path: ./probe-landing\n        format: json\n        schema: \"a STRING\"\n    sink:\n      table: ./probe-lake/t\n",
        )?;
        let slots = args.slots.unwrap_or(1);
        let mut results = Vec::new();
        for workers in [0usize, 1, 2] {
            let mut best = f64::MAX;
            for _ in 0..args.runs {
                for lake in ["lake", "probe-lake"] {
                    if dir.join(lake).exists() {
                        std::fs::remove_dir_all(dir.join(lake))?;
                    }
                }
                let seconds = if workers == 0 {
                    let started = Instant::now();
                    let output = pinned(sluice.clone(), args.pin.then_some(0))
                        .args(["run", "pipeline.yaml", "--slots", &slots.to_string()])
                        .current_dir(&dir)
                        .output()?;
                    if !output.status.success() {
                        bail!("sluice failed: {}", String::from_utf8_lossy(&output.stderr));
                    }
                    started.elapsed().as_secs_f64()
                } else {
                    cluster_run(&dir, workers, slots, args.pin)?
                };
                best = best.min(seconds);
            }
            results.push(best);
            let what = if workers == 0 {
                format!("embedded, {slots} slot(s){}", if args.pin { ", pinned to one core" } else { "" })
            } else {
                format!(
                    "cluster, {workers} worker process(es) x {slots} slot(s){}",
                    if args.pin { ", each pinned to a core of its own" } else { "" }
                )
            };
            let overhead = if workers == 1 {
                format!(", overhead vs embedded {:+.0}%", (best / results[0] - 1.0) * 100.0)
            } else {
                String::new()
            };
            let speedup = if workers == 2 { format!(", {:.2}x one worker", results[1] / best) } else { String::new() };
            println!("{what}: {best:.2}s, {:.1} MB/s{overhead}{speedup}", bytes as f64 / 1e6 / best);
        }
        return Ok(());
    }
    for run in 1..=args.runs {
        let lake = dir.join("lake");
        if lake.exists() {
            std::fs::remove_dir_all(&lake)?;
        }
        let mut command = Command::new(&sluice);
        command.args(["run", "pipeline.yaml", "--json"]).current_dir(&dir);
        if let Some(slots) = args.slots {
            command.args(["--slots", &slots.to_string()]);
        }
        let started = Instant::now();
        let output = command.output()?;
        let seconds = started.elapsed().as_secs_f64();
        if !output.status.success() {
            bail!("sluice failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())?;
        let rows = summary["rows"].as_u64().unwrap_or(0);
        let peak = summary["peak_rss_bytes"].as_u64().unwrap_or(0);
        let quarantined = summary["flows"][0]["quality"]["quarantined_rows"].as_u64().unwrap_or(0);
        println!(
            "run {run}: {rows} rows ({quarantined} quarantined) in {seconds:.2}s: {:.1} MB/s, {:.0} rows/s, peak memory {} ({} batches)",
            bytes as f64 / 1e6 / seconds,
            rows as f64 / seconds,
            ByteSize(peak),
            summary["batches"]
        );
    }
    Ok(())
}
