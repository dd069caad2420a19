//! Named pause points for crash tests.
//!
//! When `SLUICE_FAILPOINTS` lists a point's name (comma-separated), reaching it
//! prints `sluice: failpoint <name> reached` to stderr and stops the process's
//! progress there for good, so a test can kill it with SIGKILL in exactly that
//! window. Written by hand: the `fail` crate's pause action needs a compile-time
//! feature and blocks threads, where an async wait is what we want.

/// Reading files: after the first batch of rows of a task was decoded.
pub const DURING_READ: &str = "during_read";
/// After every task of a batch wrote its data files, before the Delta commit.
pub const BEFORE_COMMIT: &str = "before_commit";
/// After the Delta commit, before the checkpoint's ledger records the batch.
pub const AFTER_COMMIT: &str = "after_commit";

pub fn is_enabled(name: &str) -> bool {
    std::env::var("SLUICE_FAILPOINTS").is_ok_and(|list| list.split(',').any(|p| p.trim() == name))
}

/// Waits forever if `name` is enabled; returns at once otherwise.
pub async fn hit(name: &str) {
    if is_enabled(name) {
        eprintln!("sluice: failpoint {name} reached");
        std::future::pending::<()>().await;
    }
}
