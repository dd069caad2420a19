//! The `sluice` command line, built inside this package so that `cargo test`
//! always rebuilds the exact program the integration tests drive (a binary of
//! another package is not rebuilt by `cargo test -p sluice-tests`).

fn main() -> std::process::ExitCode {
    sluice_client::cli::main()
}
