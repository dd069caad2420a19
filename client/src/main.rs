//! The `sluice` command line.

fn main() -> std::process::ExitCode {
    sluice_client::cli::main()
}
