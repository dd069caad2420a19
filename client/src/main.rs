//! The `sluice` command line.

/// mimalloc rather than the system allocator: Arrow decoding and Parquet
/// encoding allocate from several threads at once, where glibc's malloc contends
/// (it halved ingest throughput; see the README's benchmark).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    sluice_client::cli::main()
}
