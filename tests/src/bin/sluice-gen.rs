//! Generates retail invoice files (newline-delimited JSON) for trying Sluice out
//! and for the benchmark.
//!
//! `sluice-gen --out DIR --invoices 1000000 --files 70`

use std::path::PathBuf;

use clap::Parser;
use sluice_tests::invoices::write_invoice_file;

#[derive(Parser)]
#[command(about = "Write retail invoice NDJSON files")]
struct Args {
    /// Folder to write `invoices-NNNNN.json` files into.
    #[arg(long)]
    out: PathBuf,
    /// Invoices in all.
    #[arg(long, default_value_t = 1000)]
    invoices: u64,
    /// Number of files to spread them over.
    #[arg(long, default_value_t = 10)]
    files: u64,
    /// Seed; the same seed gives the same invoices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let files = args.files.max(1);
    let per_file = args.invoices.div_ceil(files);
    let mut total = 0;
    for n in 0..files {
        let first = n * per_file;
        let count = per_file.min(args.invoices.saturating_sub(first));
        if count == 0 {
            break;
        }
        total += write_invoice_file(&args.out.join(format!("invoices-{n:05}.json")), args.seed, first, count)?;
    }
    println!("wrote {} invoices, {} bytes, to {}", args.invoices, total, args.out.display());
    Ok(())
}
