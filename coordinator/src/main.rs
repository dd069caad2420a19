//! `sluice-coordinator`: see `sluice_coordinator::cluster::cli`.

fn main() -> std::process::ExitCode {
    sluice_coordinator::cluster::cli::main()
}
