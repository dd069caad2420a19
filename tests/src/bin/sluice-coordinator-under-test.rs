//! `sluice-coordinator`, built inside this package so that `cargo test` rebuilds
//! the exact program the cluster tests drive (see `sluice-cli.rs`).

fn main() -> std::process::ExitCode {
    sluice_coordinator::cluster::cli::main()
}
