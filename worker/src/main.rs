//! `sluice-worker`: see `sluice_worker::cluster_cli`.

/// The same allocator as `sluice` (see `client/src/main.rs`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    sluice_worker::cluster_cli::main()
}
