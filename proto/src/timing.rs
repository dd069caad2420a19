//! Lease and heartbeat timings. Only the TTL is configured; the rest derive from it.

use std::time::Duration;

/// Default time a worker's lease outlives its last keep-alive.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTimings {
    pub ttl: Duration,
}

impl Default for LeaseTimings {
    fn default() -> Self {
        Self { ttl: DEFAULT_LEASE_TTL }
    }
}

impl LeaseTimings {
    /// Three keep-alives per TTL, so one lost keep-alive does not lose the lease.
    pub fn keep_alive_interval(&self) -> Duration {
        self.ttl / 3
    }

    /// How long a waiter sleeps before it looks again even without a change
    /// notification, as a safety net against a lost notification.
    pub fn poll_interval(&self) -> Duration {
        (self.ttl / 4).min(Duration::from_secs(2))
    }
}
