//! `sluice-worker`, built inside this package so that `cargo test` rebuilds the
//! exact program the cluster tests drive (see `sluice-cli.rs`).

/// The same allocator as `sluice` (see `client/src/main.rs`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    sluice_worker::cluster_cli::main()
}
