//! `sluice-worker`: see `sluice_worker::cluster_cli`.

fn main() -> std::process::ExitCode {
    sluice_worker::cluster_cli::main()
}
