//! `sluice-coordinator`: see `sluice_coordinator::cluster::cli`.

/// The same allocator as `sluice` (see `client/src/main.rs`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    sluice_coordinator::cluster::cli::main()
}
