//! Bronze ingest benchmark: generates retail invoice NDJSON (about 700 bytes an
//! invoice, 1 to 5 line items each), ingests it with the `sluice` binary of the
//! same build profile, and reports MB/s, rows/s and peak memory.
//!
//! `cargo run --release -p sluice-tests --bin sluice-bench -- --invoices 1000000`

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
    /// `schema: infer` instead of the declared invoice schema.
    #[arg(long)]
    infer: bool,
}

fn sluice_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.parent().context("the benchmark binary has a folder")?.join("sluice");
    if !bin.exists() {
        bail!("{} is missing: build it with `cargo build --release --bin sluice`", bin.display());
    }
    Ok(bin)
}

fn generate(landing: &Path, args: &Args) -> anyhow::Result<u64> {
    let marker = landing.join(format!("_generated-{}-{}", args.invoices, args.files));
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
            bytes += write_invoice_file(&landing.join(format!("invoices-{n:05}.json")), 1, first, count)?;
        }
    }
    std::fs::write(&marker, bytes.to_string())?;
    eprintln!("generated {} in {:.1}s", ByteSize(bytes), started.elapsed().as_secs_f64());
    Ok(bytes)
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
        println!(
            "run {run}: {rows} rows in {seconds:.2}s: {:.1} MB/s, {:.0} rows/s, peak memory {} ({} batches)",
            bytes as f64 / 1e6 / seconds,
            rows as f64 / seconds,
            ByteSize(peak),
            summary["batches"]
        );
    }
    Ok(())
}
