//! The coordination store: a small key-value interface with leases, shaped after
//! etcd so that an etcd implementation is a thin adapter. [`MemoryKv`] serves
//! the embedded runtime and tests; [`conformance`] is the suite every
//! implementation must pass.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

pub type LeaseId = i64;

#[derive(Debug, Clone, thiserror::Error)]
pub enum KvError {
    #[error("coordination store unavailable: {0}")]
    Unavailable(String),
    #[error("lease {0} has expired or was revoked")]
    LeaseLost(LeaseId),
}

impl KvError {
    /// Whether the same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, KvError::Unavailable(_))
    }
}

/// Keys under a prefix, in key order, with the store revision they were read at.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub revision: u64,
    pub entries: Vec<(String, Vec<u8>)>,
}

#[async_trait]
pub trait KvStore: Send + Sync + 'static {
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, KvError>;
    /// Extends the lease by its TTL; `Ok(false)` when it is already gone.
    async fn keep_alive(&self, lease: LeaseId) -> Result<bool, KvError>;
    /// Ends the lease and deletes every key bound to it.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), KvError>;
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), KvError>;
    /// Creates `key`, bound to `lease` if given, unless it exists. True when this call created it.
    async fn create_if_absent(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<bool, KvError>;
    /// Puts `key` only while `guard_key` holds `guard_value`. True when it did.
    async fn put_if_equal(
        &self,
        guard_key: &str,
        guard_value: &[u8],
        key: &str,
        value: Vec<u8>,
    ) -> Result<bool, KvError>;
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError>;
    async fn list(&self, prefix: &str) -> Result<Listing, KvError>;
    async fn delete(&self, key: &str) -> Result<(), KvError>;
    async fn delete_prefix(&self, prefix: &str) -> Result<(), KvError>;
    /// Waits until a key under `prefix` changes after `revision`, or `timeout` passes.
    /// True when something changed (or the store cannot tell, e.g. after compaction):
    /// the caller lists again either way.
    async fn wait_for_change(&self, prefix: &str, revision: u64, timeout: Duration) -> Result<bool, KvError>;
}

/// An in-process [`KvStore`]. Leases expire on the tokio clock.
#[derive(Default)]
pub struct MemoryKv {
    state: Mutex<State>,
    changed: Notify,
}

#[derive(Default)]
struct State {
    revision: u64,
    entries: BTreeMap<String, Entry>,
    leases: HashMap<LeaseId, Lease>,
    next_lease: LeaseId,
    /// Recent changes, newest last, for `wait_for_change`.
    recent: VecDeque<(u64, String)>,
}

struct Entry {
    value: Vec<u8>,
    lease: Option<LeaseId>,
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
}

const RECENT_CHANGES_KEPT: usize = 4096;

impl State {
    fn record_change(&mut self, key: &str) {
        self.revision += 1;
        self.recent.push_back((self.revision, key.to_string()));
        if self.recent.len() > RECENT_CHANGES_KEPT {
            self.recent.pop_front();
        }
    }

    fn remove(&mut self, key: &str) -> bool {
        if self.entries.remove(key).is_some() {
            self.record_change(key);
            true
        } else {
            false
        }
    }

    /// Drops expired leases and their keys. True if any key went.
    fn expire(&mut self, now: Instant) -> bool {
        let expired: Vec<LeaseId> =
            self.leases.iter().filter(|(_, lease)| lease.deadline <= now).map(|(id, _)| *id).collect();
        let mut removed = false;
        for id in expired {
            removed |= self.drop_lease(id);
        }
        removed
    }

    fn drop_lease(&mut self, id: LeaseId) -> bool {
        self.leases.remove(&id);
        let bound: Vec<String> =
            self.entries.iter().filter(|(_, e)| e.lease == Some(id)).map(|(k, _)| k.clone()).collect();
        let mut removed = false;
        for key in bound {
            removed |= self.remove(&key);
        }
        removed
    }

    fn changed_since(&self, prefix: &str, revision: u64) -> bool {
        match self.recent.front() {
            Some((oldest, _)) if *oldest > revision + 1 => true,
            _ => self.recent.iter().rev().take_while(|(r, _)| *r > revision).any(|(_, k)| k.starts_with(prefix)),
        }
    }

    fn check_lease(&self, lease: Option<LeaseId>) -> Result<(), KvError> {
        match lease {
            Some(id) if !self.leases.contains_key(&id) => Err(KvError::LeaseLost(id)),
            _ => Ok(()),
        }
    }
}

impl MemoryKv {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `f` on the state after expiring leases, and wakes waiters if anything changed.
    fn with_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let revision_before = state.revision;
        state.expire(Instant::now());
        let result = f(&mut state);
        let changed = state.revision != revision_before;
        drop(state);
        if changed {
            self.changed.notify_waiters();
        }
        result
    }
}

#[async_trait]
impl KvStore for MemoryKv {
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, KvError> {
        Ok(self.with_state(|s| {
            s.next_lease += 1;
            let id = s.next_lease;
            s.leases.insert(id, Lease { ttl, deadline: Instant::now() + ttl });
            id
        }))
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<bool, KvError> {
        Ok(self.with_state(|s| match s.leases.get_mut(&lease) {
            Some(l) => {
                l.deadline = Instant::now() + l.ttl;
                true
            }
            None => false,
        }))
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), KvError> {
        self.with_state(|s| s.drop_lease(lease));
        Ok(())
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), KvError> {
        self.with_state(|s| {
            s.entries.insert(key.to_string(), Entry { value, lease: None });
            s.record_change(key);
        });
        Ok(())
    }

    async fn create_if_absent(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<bool, KvError> {
        self.with_state(|s| {
            s.check_lease(lease)?;
            if s.entries.contains_key(key) {
                return Ok(false);
            }
            s.entries.insert(key.to_string(), Entry { value, lease });
            s.record_change(key);
            Ok(true)
        })
    }

    async fn put_if_equal(
        &self,
        guard_key: &str,
        guard_value: &[u8],
        key: &str,
        value: Vec<u8>,
    ) -> Result<bool, KvError> {
        Ok(self.with_state(|s| {
            if s.entries.get(guard_key).is_none_or(|e| e.value != guard_value) {
                return false;
            }
            s.entries.insert(key.to_string(), Entry { value, lease: None });
            s.record_change(key);
            true
        }))
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.with_state(|s| s.entries.get(key).map(|e| e.value.clone())))
    }

    async fn list(&self, prefix: &str) -> Result<Listing, KvError> {
        Ok(self.with_state(|s| Listing {
            revision: s.revision,
            entries: s
                .entries
                .range(prefix.to_string()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, e)| (k.clone(), e.value.clone()))
                .collect(),
        }))
    }

    async fn delete(&self, key: &str) -> Result<(), KvError> {
        self.with_state(|s| s.remove(key));
        Ok(())
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<(), KvError> {
        self.with_state(|s| {
            let keys: Vec<String> = s
                .entries
                .range(prefix.to_string()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, _)| k.clone())
                .collect();
            for key in keys {
                s.remove(&key);
            }
        });
        Ok(())
    }

    async fn wait_for_change(&self, prefix: &str, revision: u64, timeout: Duration) -> Result<bool, KvError> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.with_state(|s| s.changed_since(prefix, revision)) {
                return Ok(true);
            }
            // Wake at the next lease deadline too, so expiries are noticed without a writer.
            let next_expiry = self.with_state(|s| s.leases.values().map(|l| l.deadline).min());
            let wake_at = next_expiry.map_or(deadline, |d| d.min(deadline));
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(wake_at) => {
                    if Instant::now() >= deadline {
                        return Ok(self.with_state(|s| s.changed_since(prefix, revision)));
                    }
                }
            }
        }
    }
}

/// The behaviour every [`KvStore`] must show. Each check uses keys under `prefix`.
/// Test support: a check that fails panics.
#[allow(clippy::unwrap_used)]
pub mod conformance {
    use super::*;

    pub async fn run_all(store: &dyn KvStore, prefix: &str) {
        create_if_absent_creates_once(store, &format!("{prefix}/a")).await;
        guarded_put_needs_the_guard(store, &format!("{prefix}/b")).await;
        keys_vanish_with_their_lease(store, &format!("{prefix}/c")).await;
        list_and_delete_prefix(store, &format!("{prefix}/d")).await;
        wait_sees_changes_and_times_out(store, &format!("{prefix}/e")).await;
    }

    async fn create_if_absent_creates_once(store: &dyn KvStore, p: &str) {
        let key = format!("{p}/k");
        assert!(store.create_if_absent(&key, b"one".to_vec(), None).await.unwrap());
        assert!(!store.create_if_absent(&key, b"two".to_vec(), None).await.unwrap());
        assert_eq!(store.get(&key).await.unwrap().as_deref(), Some(&b"one"[..]));
    }

    async fn guarded_put_needs_the_guard(store: &dyn KvStore, p: &str) {
        let (guard, key) = (format!("{p}/guard"), format!("{p}/k"));
        assert!(!store.put_if_equal(&guard, b"me", &key, b"v".to_vec()).await.unwrap());
        store.put(&guard, b"other".to_vec()).await.unwrap();
        assert!(!store.put_if_equal(&guard, b"me", &key, b"v".to_vec()).await.unwrap());
        store.put(&guard, b"me".to_vec()).await.unwrap();
        assert!(store.put_if_equal(&guard, b"me", &key, b"v".to_vec()).await.unwrap());
        assert_eq!(store.get(&key).await.unwrap().as_deref(), Some(&b"v"[..]));
    }

    async fn keys_vanish_with_their_lease(store: &dyn KvStore, p: &str) {
        let lease = store.grant_lease(Duration::from_secs(2)).await.unwrap();
        let key = format!("{p}/claim");
        assert!(store.create_if_absent(&key, b"w".to_vec(), Some(lease)).await.unwrap());
        assert!(store.keep_alive(lease).await.unwrap());
        store.revoke_lease(lease).await.unwrap();
        assert_eq!(store.get(&key).await.unwrap(), None);
        assert!(!store.keep_alive(lease).await.unwrap());
        let err = store.create_if_absent(&key, b"w".to_vec(), Some(lease)).await.unwrap_err();
        assert!(matches!(err, KvError::LeaseLost(_)), "{err}");

        let short = store.grant_lease(Duration::from_secs(1)).await.unwrap();
        assert!(store.create_if_absent(&key, b"w".to_vec(), Some(short)).await.unwrap());
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.get(&key).await.unwrap().is_some() {
            assert!(Instant::now() < deadline, "a key outlived its expired lease");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn list_and_delete_prefix(store: &dyn KvStore, p: &str) {
        for name in ["2", "1", "3"] {
            store.put(&format!("{p}/x/{name}"), name.as_bytes().to_vec()).await.unwrap();
        }
        store.put(&format!("{p}/y"), b"y".to_vec()).await.unwrap();
        let listing = store.list(&format!("{p}/x/")).await.unwrap();
        let keys: Vec<_> =
            listing.entries.iter().map(|(k, _)| k.rsplit('/').next().unwrap_or_default().to_string()).collect();
        assert_eq!(keys, ["1", "2", "3"]);
        store.delete_prefix(&format!("{p}/x/")).await.unwrap();
        assert!(store.list(&format!("{p}/x/")).await.unwrap().entries.is_empty());
        assert!(store.get(&format!("{p}/y")).await.unwrap().is_some());
    }

    async fn wait_sees_changes_and_times_out(store: &dyn KvStore, p: &str) {
        let revision = store.list(p).await.unwrap().revision;
        let started = Instant::now();
        assert!(!store.wait_for_change(p, revision, Duration::from_millis(300)).await.unwrap());
        assert!(started.elapsed() >= Duration::from_millis(250));
        store.put(&format!("{p}/k"), b"v".to_vec()).await.unwrap();
        assert!(store.wait_for_change(p, revision, Duration::from_secs(5)).await.unwrap());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_store_conforms() {
        conformance::run_all(&MemoryKv::new(), "/conformance").await;
    }
}
