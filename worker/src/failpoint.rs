//! Named pause points for crash tests.
//!
//! `SLUICE_FAILPOINTS` is a comma-separated list of `name` or `name=duration`
//! (`during_read=4s`). Reaching a listed point prints `sluice: failpoint <name>
//! reached` to stderr, then stops the process's progress there for good (plain
//! `name`), so a test can kill it with SIGKILL in exactly that window, or for
//! the given time (`name=4s`), so a test can freeze or cut off the process
//! meanwhile and watch what it does when it goes on. Written by hand: the `fail`
//! crate's pause action needs a compile-time feature and blocks threads, where
//! an async wait is what we want.

use std::time::Duration;

/// Reading files: after the first batch of rows of a task was decoded.
pub const DURING_READ: &str = "during_read";
/// After every task of a batch wrote its data files, before the Delta commit.
pub const BEFORE_COMMIT: &str = "before_commit";
/// After the Delta commit, before the checkpoint's ledger records the batch.
pub const AFTER_COMMIT: &str = "after_commit";

/// `None`: not enabled. `Some(None)`: pause for good. `Some(Some(d))`: pause for `d`.
fn setting(name: &str) -> Option<Option<Duration>> {
    let list = std::env::var("SLUICE_FAILPOINTS").ok()?;
    list.split(',').find_map(|entry| {
        let (point, pause) = entry.trim().split_once('=').map_or((entry.trim(), None), |(p, d)| (p, Some(d)));
        (point == name).then(|| pause.and_then(|d| humantime::parse_duration(d.trim()).ok()))
    })
}

pub fn is_enabled(name: &str) -> bool {
    setting(name).is_some()
}

/// Waits (forever, or for the configured time) if `name` is enabled; returns at once otherwise.
pub async fn hit(name: &str) {
    match setting(name) {
        None => {}
        Some(pause) => {
            eprintln!("sluice: failpoint {name} reached");
            match pause {
                Some(duration) => tokio::time::sleep(duration).await,
                None => std::future::pending::<()>().await,
            }
        }
    }
}
