//! [`KvStore`] on etcd (v3 API; tested against etcd 3.4 and newer).
//!
//! Every call has a deadline ([`EtcdOptions::request_timeout`]); a call that
//! fails for any reason but a missing lease is [`KvError::Unavailable`], which
//! callers retry with backoff. The client reconnects by itself once etcd is back.
//!
//! `wait_for_change` opens a watch from the revision after the caller's listing,
//! so no change between the listing and the watch is missed. A watch that etcd
//! cancels (compaction past that revision, a restart) reports "changed" and
//! the caller lists again: nothing is lost, at worst one listing is spent.

use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};

use crate::kv::{KvError, KvStore, LeaseId, Listing};
use crate::tls::ClientTlsFiles;

#[derive(Debug, Clone)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// TLS to etcd: used when an endpoint is `https://` or a file is given.
    pub tls: ClientTlsFiles,
    /// etcd's own authentication (its token is refreshed when it expires).
    pub user: Option<EtcdUser>,
}

#[derive(Clone)]
pub struct EtcdUser {
    pub name: String,
    pub password: String,
}

impl std::fmt::Debug for EtcdUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdUser").field("name", &self.name).finish_non_exhaustive()
    }
}

impl EtcdOptions {
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(5),
            tls: ClientTlsFiles::default(),
            user: None,
        }
    }

    /// etcd-client's options for these settings; an error names what is wrong.
    fn connect_options(&self) -> Result<ConnectOptions, String> {
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout)
            .with_timeout(self.request_timeout)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_keep_alive_while_idle(true);
        let https = self.endpoints.iter().filter(|e| e.trim().starts_with("https://")).count();
        let http = self.endpoints.iter().filter(|e| e.trim().starts_with("http://")).count();
        if https > 0 && http > 0 {
            return Err("etcd endpoints mix http:// and https://; use one scheme".into());
        }
        if self.tls.is_set() && http > 0 {
            return Err("etcd TLS files are given but the endpoints are http://; write them https://".into());
        }
        if https > 0 || self.tls.is_set() {
            connect = connect.with_tls(self.tls.config().map_err(|e| format!("etcd TLS: {e}"))?);
        }
        if let Some(user) = &self.user {
            connect = connect.with_user(user.name.clone(), user.password.clone()).with_auto_token_refresh(true);
        }
        Ok(connect)
    }
}

/// A [`KvStore`] backed by an etcd cluster. Cheap to clone.
#[derive(Clone)]
pub struct EtcdKv {
    client: Client,
}

fn unavailable(error: etcd_client::Error) -> KvError {
    KvError::Unavailable(format!("etcd: {error}"))
}

impl EtcdKv {
    /// Connects to the first reachable endpoint. Fails when none answers within
    /// the connect timeout; the caller retries.
    pub async fn connect(options: &EtcdOptions) -> Result<Self, KvError> {
        let connect = options.connect_options().map_err(KvError::Unavailable)?;
        let endpoints: Vec<String> = options.endpoints.iter().map(|e| e.trim().to_string()).collect();
        let client = Client::connect(&endpoints, Some(connect))
            .await
            .map_err(|e| KvError::Unavailable(format!("cannot reach etcd at {}: {e}", endpoints.join(","))))?;
        Ok(Self { client })
    }

    /// Connects, retrying with backoff (up to 5 s apart) until etcd answers.
    /// Fails at once on what waiting cannot fix: options that do not make a
    /// connection (a TLS file that does not load), or credentials etcd refuses.
    pub async fn connect_with_retry(options: &EtcdOptions) -> Result<Self, String> {
        options.connect_options()?;
        let mut delay = Duration::from_millis(200);
        loop {
            match Self::connect(options).await {
                Ok(kv) => return Ok(kv),
                Err(error) if error.to_string().contains("authentication failed") => {
                    return Err(format!("etcd refused the user name or password: {error}"));
                }
                Err(error) => tracing::warn!(%error, "etcd is not reachable yet; retrying"),
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    fn client(&self) -> Client {
        self.client.clone()
    }
}

fn is_lease_not_found(error: &etcd_client::Error) -> bool {
    // "etcdserver: requested lease not found" from the server, or the client's
    // "lease keep alive error: lease not found".
    error.to_string().contains("lease not found")
}

#[async_trait]
impl KvStore for EtcdKv {
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, KvError> {
        let seconds = ttl.as_secs().max(1) as i64;
        let response = self.client().lease_grant(seconds, None).await.map_err(unavailable)?;
        Ok(response.id())
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<bool, KvError> {
        let attempt = async {
            let (mut keeper, mut stream) = self.client().lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            stream.message().await
        };
        match attempt.await {
            Ok(Some(response)) => Ok(response.ttl() > 0),
            Ok(None) => Err(KvError::Unavailable("etcd closed the keep-alive stream".into())),
            Err(error) if is_lease_not_found(&error) => Ok(false),
            Err(error) => Err(unavailable(error)),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), KvError> {
        match self.client().lease_revoke(lease).await {
            Ok(_) => Ok(()),
            Err(error) if is_lease_not_found(&error) => Ok(()),
            Err(error) => Err(unavailable(error)),
        }
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), KvError> {
        self.client().put(key, value, None).await.map_err(unavailable)?;
        Ok(())
    }

    async fn create_if_absent(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<bool, KvError> {
        let options = lease.map(|id| PutOptions::new().with_lease(id));
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value, options)]);
        match self.client().txn(txn).await {
            Ok(response) => Ok(response.succeeded()),
            Err(error) if is_lease_not_found(&error) => Err(KvError::LeaseLost(lease.unwrap_or_default())),
            Err(error) => Err(unavailable(error)),
        }
    }

    async fn put_if_equal(
        &self,
        guard_key: &str,
        guard_value: &[u8],
        key: &str,
        value: Vec<u8>,
    ) -> Result<bool, KvError> {
        // etcd fails a value comparison on a missing key, which is what we want.
        let txn = Txn::new()
            .when([Compare::value(guard_key, CompareOp::Equal, guard_value)])
            .and_then([TxnOp::put(key, value, None)]);
        Ok(self.client().txn(txn).await.map_err(unavailable)?.succeeded())
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        let response = self.client().get(key, None).await.map_err(unavailable)?;
        Ok(response.kvs().first().map(|kv| kv.value().to_vec()))
    }

    async fn list(&self, prefix: &str) -> Result<Listing, KvError> {
        let response = self.client().get(prefix, Some(GetOptions::new().with_prefix())).await.map_err(unavailable)?;
        let revision = response.header().map_or(0, |h| h.revision().max(0) as u64);
        let entries = response
            .kvs()
            .iter()
            .map(|kv| (String::from_utf8_lossy(kv.key()).into_owned(), kv.value().to_vec()))
            .collect();
        Ok(Listing { revision, entries })
    }

    async fn delete(&self, key: &str) -> Result<(), KvError> {
        self.client().delete(key, None).await.map_err(unavailable)?;
        Ok(())
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<(), KvError> {
        self.client().delete(prefix, Some(DeleteOptions::new().with_prefix())).await.map_err(unavailable)?;
        Ok(())
    }

    async fn wait_for_change(&self, prefix: &str, revision: u64, timeout: Duration) -> Result<bool, KvError> {
        let options = WatchOptions::new().with_prefix().with_start_revision(revision as i64 + 1);
        let wait = async {
            let mut stream = self.client().watch(prefix, Some(options)).await.map_err(unavailable)?;
            loop {
                match stream.message().await.map_err(unavailable)? {
                    Some(response) if response.canceled() || response.compact_revision() > 0 => return Ok(true),
                    Some(response) if !response.events().is_empty() => return Ok(true),
                    Some(_) => continue,
                    None => return Ok(true),
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(result) => result,
            Err(_elapsed) => Ok(false),
        }
    }
}
