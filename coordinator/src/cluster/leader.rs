//! Leader election on the coordination store.
//!
//! A coordinator campaigns by creating the `leader` key bound to a lease of its
//! own; whoever creates it leads until its lease ends. The others keep their
//! lease alive, watch the key and try again when it vanishes, so a standby
//! takes over within one lease TTL of the leader's death. Written on
//! [`KvStore`] rather than etcd's election API so that the same code runs (and
//! is tested) on the in-memory store, and because etcd-client's blocking
//! `campaign` shares the client's request timeout.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sluice_proto::keys::Keys;
use sluice_proto::kv::{KvError, KvStore, LeaseId};
use sluice_proto::registry::LeaderValue;
use sluice_proto::timing::LeaseTimings;
use sluice_worker::worker_loop::keep_alive;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::flow_runner::{CommitFence, FenceError};

/// This coordinator's term as leader. `lost` fires when it ends.
pub struct Leadership {
    kv: Arc<dyn KvStore>,
    key: String,
    value: Vec<u8>,
    lease: LeaseId,
    lost: CancellationToken,
    pub me: LeaderValue,
}

const RETRY_DELAY: Duration = Duration::from_millis(500);

impl Leadership {
    /// Campaigns until this coordinator leads (`Some`) or `shutdown` fires (`None`).
    pub async fn campaign(
        kv: Arc<dyn KvStore>,
        keys: &Keys,
        id: &str,
        address: &str,
        ballista: Option<&str>,
        timings: LeaseTimings,
        shutdown: &CancellationToken,
    ) -> Option<Leadership> {
        let key = keys.leader();
        let mut announced_standby = false;
        'lease: while !shutdown.is_cancelled() {
            let lease = match kv.grant_lease(timings.ttl).await {
                Ok(lease) => lease,
                Err(error) => {
                    warn!(%error, "cannot campaign for leadership yet; retrying");
                    pause(shutdown, RETRY_DELAY).await;
                    continue;
                }
            };
            let me = LeaderValue {
                id: id.to_string(),
                address: address.to_string(),
                lease,
                ballista: ballista.map(str::to_string),
            };
            let value = me.encode();
            while !shutdown.is_cancelled() {
                match kv.create_if_absent(&key, value.clone(), Some(lease)).await {
                    Ok(true) => {
                        let lost = shutdown.child_token();
                        tokio::spawn(keep_alive(kv.clone(), lease, timings, lost.clone()));
                        info!(leader = %me.describe(), "this coordinator is the leader");
                        return Some(Leadership { kv, key, value, lease, lost, me });
                    }
                    Ok(false) => {}
                    Err(KvError::LeaseLost(_)) => continue 'lease,
                    Err(error) => {
                        warn!(%error, "cannot campaign for leadership yet; retrying");
                        pause(shutdown, RETRY_DELAY).await;
                        continue;
                    }
                }
                // Someone else leads: keep our lease alive and wait for the key to change.
                match kv.keep_alive(lease).await {
                    Ok(true) => {}
                    Ok(false) => continue 'lease,
                    Err(_) => {
                        pause(shutdown, RETRY_DELAY).await;
                        continue;
                    }
                }
                let Ok(listing) = kv.list(&key).await else {
                    pause(shutdown, RETRY_DELAY).await;
                    continue;
                };
                let Some((_, current)) = listing.entries.iter().find(|(k, _)| *k == key) else { continue };
                if !announced_standby {
                    let leader = LeaderValue::decode(current).map_or_else(|| "unknown".into(), |l| l.describe());
                    info!(%leader, "standing by");
                    announced_standby = true;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = kv.wait_for_change(&key, listing.revision, timings.keep_alive_interval()) => {}
                }
            }
            let _ = kv.revoke_lease(lease).await;
        }
        None
    }

    /// Fires when leadership is lost (lease expired or revoked) or on shutdown.
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn value(&self) -> &[u8] {
        &self.value
    }

    /// Ends the term now, so that a standby takes over without waiting for the TTL.
    pub async fn resign(&self) {
        self.lost.cancel();
        let _ = self.kv.revoke_lease(self.lease).await;
    }

    /// Puts `key` only while this coordinator leads.
    pub async fn put_fenced(&self, key: &str, value: Vec<u8>) -> Result<bool, KvError> {
        if self.lost.is_cancelled() {
            return Ok(false);
        }
        self.kv.put_if_equal(&self.key, &self.value, key, value).await
    }
}

#[async_trait]
impl CommitFence for Leadership {
    async fn check(&self) -> Result<(), FenceError> {
        let lost = || FenceError { message: "this coordinator is no longer the leader".into(), retryable: false };
        if self.lost.is_cancelled() {
            return Err(lost());
        }
        match self.kv.get(&self.key).await {
            Ok(Some(value)) if value == self.value => Ok(()),
            Ok(_) => {
                self.lost.cancel();
                Err(lost())
            }
            Err(error) => Err(FenceError {
                message: format!("cannot confirm leadership before committing: {error}"),
                retryable: true,
            }),
        }
    }
}

async fn pause(shutdown: &CancellationToken, delay: Duration) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(delay) => {}
    }
}

/// The current leader, if any.
pub async fn current_leader(kv: &dyn KvStore, keys: &Keys) -> Result<Option<LeaderValue>, KvError> {
    Ok(kv.get(&keys.leader()).await?.and_then(|v| LeaderValue::decode(&v)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_proto::kv::MemoryKv;

    #[tokio::test]
    async fn one_leader_at_a_time_and_a_standby_takes_over() {
        let kv: Arc<dyn KvStore> = Arc::new(MemoryKv::new());
        let keys = Keys::new("t");
        let timings = LeaseTimings { ttl: Duration::from_secs(2) };
        let shutdown = CancellationToken::new();
        let first = Leadership::campaign(kv.clone(), &keys, "a", "a:1", None, timings, &shutdown).await.unwrap();
        assert!(first.check().await.is_ok());
        let standby = {
            let (kv, keys, shutdown) = (kv.clone(), keys.clone(), shutdown.clone());
            tokio::spawn(async move { Leadership::campaign(kv, &keys, "b", "b:1", None, timings, &shutdown).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!standby.is_finished(), "two leaders at once");
        assert!(first.put_fenced("/x", b"1".to_vec()).await.unwrap());
        first.resign().await;
        let second = tokio::time::timeout(Duration::from_secs(5), standby).await.unwrap().unwrap().unwrap();
        assert_eq!(second.me.id, "b");
        assert!(first.check().await.is_err(), "a deposed leader may not commit");
        assert!(!first.put_fenced("/x", b"2".to_vec()).await.unwrap());
        assert!(second.check().await.is_ok());
        shutdown.cancel();
    }
}
