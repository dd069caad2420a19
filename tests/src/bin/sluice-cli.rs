//! The `sluice` command line, built inside this package so that `cargo test`
//! always rebuilds the exact program the integration tests drive (a binary of
//! another package is not rebuilt by `cargo test -p sluice-tests`).

/// The same allocator as `sluice` (see `client/src/main.rs`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    sluice_client::cli::main()
}
