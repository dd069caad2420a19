//! Discovery benchmark: how long finding the new files of a `files:` source
//! takes once many files are ingested already (issue target: under 1 s with
//! 100 k files on local disk).
//!
//!   cargo run --release -p sluice-tests --bin sluice-discovery-bench -- [--files 100000] [--new 100]
//!
//! Writes `--files` small files under time-prefixed names (`YYYY/MM/DD/HH/part-N.json`,
//! 1000 per folder), records them all in a ledger as ingested (in batches of
//! 1000, as the checkpoint's plans would), lands `--new` more, and times the
//! discovery of those: a full listing compared with the ledger, and an
//! incremental listing that starts after the greatest key ingested.

use std::time::Instant;

use clap::Parser;
use sluice_coordinator::discovery::{Ledger, list_source};
use sluice_proto::spec::{SourceSpec, parse_pipeline};
use sluice_proto::storage::StorageOptions;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 100_000)]
    files: usize,
    /// Files that land after the others were ingested.
    #[arg(long, default_value_t = 100)]
    new: usize,
    /// Timed discoveries of each kind (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Where to write the files; a temporary folder by default.
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

fn key(i: usize) -> String {
    // 1000 files an hour: folders by hour, as time-partitioned landing zones are.
    let hour = i / 1000;
    format!("{:04}/{:02}/{:02}/{:02}/part-{i:08}.json", 2026, 1 + hour / (24 * 28), 1 + (hour / 24) % 28, hour % 24)
}

fn write_files(root: &std::path::Path, range: std::ops::Range<usize>) -> anyhow::Result<()> {
    for i in range {
        let path = root.join(key(i));
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, format!("{{\"id\": {i}}}\n"))?;
    }
    Ok(())
}

fn median(mut seconds: Vec<f64>) -> f64 {
    seconds.sort_by(f64::total_cmp);
    seconds[seconds.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let temp = tempfile::tempdir()?;
    let root = args.dir.clone().unwrap_or_else(|| temp.path().join("landing"));
    std::fs::create_dir_all(&root)?;
    eprintln!("writing {} files under {} ...", args.files, root.display());
    write_files(&root, 0..args.files)?;

    let yaml = format!(
        "pipeline: bench\ncheckpoint: {}\nflows:\n  - name: f\n    source:\n      files: {{ path: {}, format: json, schema: 'id BIGINT' }}\n    sink: {{ table: {} }}\n",
        temp.path().join("cp").display(),
        root.display(),
        temp.path().join("t").display()
    );
    let spec = parse_pipeline(&yaml, None)?;
    let SourceSpec::Files(source) = &spec.flows[0].source else { anyhow::bail!("not a files source") };
    let storage = StorageOptions::default();

    let started = Instant::now();
    let listed = list_source("f", source, &storage, None).await?;
    let first_listing = started.elapsed().as_secs_f64();
    let mut ledger = Ledger::default();
    let mut by_key = listed.clone();
    by_key.sort_by(|a, b| a.url.cmp(&b.url));
    for batch in by_key.chunks(1000) {
        ledger.record(batch);
    }
    eprintln!(
        "{} files listed in {first_listing:.3} s and recorded as ingested; landing {} more",
        listed.len(),
        args.new
    );
    write_files(&root, args.files..args.files + args.new)?;

    let mut full = Vec::new();
    let mut incremental = Vec::new();
    for _ in 0..args.runs {
        let started = Instant::now();
        let found = ledger.compare(list_source("f", source, &storage, None).await?);
        full.push(started.elapsed().as_secs_f64());
        anyhow::ensure!(found.new.len() == args.new, "full listing found {} new files", found.new.len());

        let started = Instant::now();
        let found = ledger.compare(list_source("f", source, &storage, ledger.last_key()).await?);
        incremental.push(started.elapsed().as_secs_f64());
        anyhow::ensure!(found.new.len() == args.new, "incremental listing found {} new files", found.new.len());
    }
    println!(
        "discovery of {} new files with {} ingested (median of {}): full listing {:.3} s, incremental listing {:.3} s",
        args.new,
        args.files,
        args.runs,
        median(full),
        median(incremental)
    );
    Ok(())
}
