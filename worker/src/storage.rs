//! Object stores for locations given as URLs: local paths, S3, Azure and GCS.
//!
//! Cloud stores are object_store's own (`AmazonS3`, `MicrosoftAzure`,
//! `GoogleCloudStorage`), configured from the process environment
//! (`AWS_*`, `AZURE_*`, `GOOGLE_*`, as object_store reads it) and then from the
//! location's `storage_options` (see [`sluice_proto::storage`]). The same
//! builders serve delta-rs: [`register_with_deltalake`] installs them as its
//! object-store factories for `s3://`, `s3a://`, `az://`, `abfs://`,
//! `abfss://`, `azure://` and `gs://`, with delta-rs' default log store, whose
//! commits are conditional puts (`PutMode::Create`: `If-None-Match: *` on S3
//! and Azure, `ifGenerationMatch=0` on GCS). Concurrent writers are therefore
//! safe on S3 without DynamoDB: of two writers of the same version, one gets
//! "already exists" and re-checks the table (see `docs/DESIGN.md`).
//!
//! Stores are cached per bucket and options, so files read one after the other
//! share a connection pool.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Once, OnceLock};

use deltalake::DeltaResult;
use deltalake::logstore::{
    LogStore, LogStoreFactory, ObjectStoreFactory, ObjectStoreRef, StorageConfig, default_logstore, logstore_factories,
    object_store_factories,
};
use object_store::ObjectStore;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use sluice_proto::storage::StorageOptions;
use url::Url;

use crate::error::WorkerError;

/// Schemes served by object_store's cloud stores.
pub const CLOUD_SCHEMES: &[&str] = &["s3", "s3a", "az", "abfs", "abfss", "azure", "gs"];

/// The store for `url` and the path of `url` inside it. An option that is
/// neither the store's nor delta-rs' own is refused here, naming it, so that a
/// misspelt key is an error rather than silently ignored.
pub fn store_for(url: &Url, storage: &StorageOptions) -> Result<(Arc<dyn ObjectStore>, Path), WorkerError> {
    match url.scheme() {
        "file" => {
            let path = Path::from_url_path(url.path()).map_err(|e| WorkerError::Location(format!("{url}: {e}")))?;
            Ok((Arc::new(LocalFileSystem::new()), path))
        }
        _ => {
            let options = resolved(url, storage)?;
            let store = cloud_store(url, &options, true).map_err(|e| WorkerError::Location(redacted(&e, storage)))?;
            Ok((store, path_in_bucket(url)?))
        }
    }
}

/// The options delta-rs gets for a table at `url` (with `${NAME}` resolved);
/// registers Sluice's cloud stores with delta-rs first.
pub fn delta_options(url: &Url, storage: &StorageOptions) -> Result<HashMap<String, String>, WorkerError> {
    register_with_deltalake();
    resolved(url, storage)
}

/// A builder for the Delta table at `url`, with its storage options.
pub fn table_builder(url: &Url, storage: &StorageOptions) -> Result<deltalake::DeltaTableBuilder, WorkerError> {
    let options = delta_options(url, storage)?;
    let builder = deltalake::DeltaTableBuilder::from_url(url.clone())
        .map_err(|e| WorkerError::Location(redacted(&e.to_string(), storage)))?;
    Ok(builder.with_storage_options(options))
}

/// Checks that `url`'s store can be built from its options (no I/O): a bad key
/// or value is reported before anything runs.
pub fn check_location(url: &Url, storage: &StorageOptions) -> Result<(), WorkerError> {
    store_for(url, storage).map(|_| ())
}

/// `message` without the secrets of `storage`.
pub fn redacted(message: &str, storage: &StorageOptions) -> String {
    sluice_proto::storage::redact(message, storage)
}

fn resolved(url: &Url, storage: &StorageOptions) -> Result<HashMap<String, String>, WorkerError> {
    storage.resolved_for(url).map_err(|e| WorkerError::Location(format!("{url}: {e}")))
}

/// The object key of `url` in its store: what listings order and start after.
pub fn path_in_bucket(url: &Url) -> Result<Path, WorkerError> {
    Path::from_url_path(url.path()).map_err(|e| WorkerError::Location(format!("{url}: {e}")))
}

/// Installs the cloud stores as delta-rs' object-store and log-store factories (once per process).
pub fn register_with_deltalake() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for scheme in CLOUD_SCHEMES {
            let Ok(url) = Url::parse(&format!("{scheme}://")) else { continue };
            object_store_factories().insert(url.clone(), Arc::new(CloudStores));
            logstore_factories().insert(url, Arc::new(ConditionalPutLogStores));
        }
    });
}

struct CloudStores;

impl ObjectStoreFactory for CloudStores {
    fn parse_url_opts(&self, url: &Url, config: &StorageConfig) -> DeltaResult<(ObjectStoreRef, Path)> {
        // delta-rs passes its own options along (retries, limits): not strict here.
        let store = cloud_store(url, &config.raw, false).map_err(deltalake::DeltaTableError::Generic)?;
        let path = path_in_bucket(url).map_err(|e| deltalake::DeltaTableError::Generic(e.to_string()))?;
        Ok((store, path))
    }
}

struct ConditionalPutLogStores;

impl LogStoreFactory for ConditionalPutLogStores {
    fn with_options(
        &self,
        prefixed_store: ObjectStoreRef,
        root_store: ObjectStoreRef,
        location: &Url,
        options: &StorageConfig,
    ) -> DeltaResult<Arc<dyn LogStore>> {
        Ok(default_logstore(prefixed_store, root_store, location, options))
    }
}

/// Builds (or takes from the cache) the store of `url`'s bucket or container.
fn cloud_store(url: &Url, options: &HashMap<String, String>, strict: bool) -> Result<Arc<dyn ObjectStore>, String> {
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<dyn ObjectStore>>>> = OnceLock::new();
    let mut sorted: Vec<(&String, &String)> = options.iter().collect();
    sorted.sort();
    let root = format!("{}://{}", url.scheme(), url.authority());
    let cache_key = format!("{root} {sorted:?}");
    let cache = CACHE.get_or_init(Default::default);
    if let Some(store) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&cache_key) {
        return Ok(store.clone());
    }
    let store = build_cloud_store(url, options, strict)?;
    cache.lock().unwrap_or_else(|e| e.into_inner()).insert(cache_key, store.clone());
    Ok(store)
}

fn build_cloud_store(
    url: &Url,
    options: &HashMap<String, String>,
    strict: bool,
) -> Result<Arc<dyn ObjectStore>, String> {
    let scheme = url.scheme();
    let unknown = |key: &str, kind: &str| {
        format!(
            "{url}: unknown storage option `{key}` for {kind}; see object_store's {kind} configuration keys \
             (for example {})",
            match kind {
                "S3" => "aws_region, aws_endpoint, aws_access_key_id, aws_allow_http",
                "Azure" => "azure_storage_account_name, azure_storage_account_key, azure_storage_use_emulator",
                _ => "google_service_account, google_bucket",
            }
        )
    };
    let built = |e: object_store::Error| format!("{url}: {e}");
    // Options delta-rs consumes itself (retries, limits, IO runtime) are not errors.
    let delta_keys: Vec<String> = if strict {
        let config = StorageConfig::parse_options(options.clone()).map_err(|e| format!("{url}: {e}"))?;
        options.keys().filter(|k| !config.unknown_properties.contains_key(*k)).cloned().collect()
    } else {
        Vec::new()
    };
    let store_options: Vec<(&String, &String)> = options.iter().filter(|(k, _)| !delta_keys.contains(k)).collect();
    // The options as `K` (the store's configuration key); an unknown key is an
    // error when strict, and left out otherwise.
    fn keys_of<K: std::str::FromStr>(
        options: &[(&String, &String)],
        strict: bool,
        unknown: impl Fn(&str) -> String,
    ) -> Result<Vec<(K, String)>, String> {
        let mut parsed = Vec::with_capacity(options.len());
        for (key, value) in options {
            match key.to_ascii_lowercase().parse::<K>() {
                Ok(parsed_key) => parsed.push((parsed_key, value.to_string())),
                Err(_) if strict => return Err(unknown(key)),
                Err(_) => {}
            }
        }
        Ok(parsed)
    }
    match scheme {
        "s3" | "s3a" => {
            let mut builder = AmazonS3Builder::from_env().with_url(url.as_str());
            for (key, value) in keys_of::<AmazonS3ConfigKey>(&store_options, strict, |k| unknown(k, "S3"))? {
                builder = builder.with_config(key, value);
            }
            Ok(Arc::new(builder.build().map_err(built)?))
        }
        "az" | "abfs" | "abfss" | "azure" => {
            let mut builder = MicrosoftAzureBuilder::from_env().with_url(url.as_str());
            for (key, value) in keys_of::<AzureConfigKey>(&store_options, strict, |k| unknown(k, "Azure"))? {
                builder = builder.with_config(key, value);
            }
            Ok(Arc::new(builder.build().map_err(built)?))
        }
        "gs" => {
            let mut builder = GoogleCloudStorageBuilder::from_env().with_url(url.as_str());
            for (key, value) in keys_of::<GoogleConfigKey>(&store_options, strict, |k| unknown(k, "GCS"))? {
                builder = builder.with_config(key, value);
            }
            Ok(Arc::new(builder.build().map_err(built)?))
        }
        other => Err(format!(
            "{url}: `{other}://` locations are not supported; use a local path, file://, s3://, az://, abfss:// or gs://"
        )),
    }
}

/// The URL of `path` in the same store as `base`.
pub fn url_of(base: &Url, path: &Path) -> String {
    let mut url = base.clone();
    url.set_path(&format!("/{path}"));
    url.to_string()
}

/// Parses a URL that a task carries.
pub fn parse_url(text: &str) -> Result<Url, WorkerError> {
    Url::parse(text).map_err(|e| WorkerError::Location(format!("`{text}` is not a URL: {e}")))
}

/// Creates the folder of a local (`file://`) location if it does not exist yet;
/// other stores have no folders to create.
pub fn ensure_local_dir(url: &Url) -> Result<(), WorkerError> {
    if url.scheme() != "file" {
        return Ok(());
    }
    let path = url.to_file_path().map_err(|()| WorkerError::Location(format!("{url} is not a local path")))?;
    std::fs::create_dir_all(&path).map_err(|e| WorkerError::Location(format!("cannot create {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn options(pairs: &[(&str, &str)]) -> StorageOptions {
        let base: BTreeMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        StorageOptions { base, scopes: Vec::new() }
    }

    #[test]
    fn cloud_stores_are_built_from_options_without_io() {
        let s3 = Url::parse("s3://bucket/landing/").unwrap();
        let storage =
            options(&[("aws_region", "eu-west-1"), ("AWS_ENDPOINT", "http://127.0.0.1:9"), ("aws_allow_http", "true")]);
        let (_, path) = store_for(&s3, &storage).unwrap();
        assert_eq!(path.as_ref(), "landing");
        let az = Url::parse("abfss://lake@account.dfs.core.windows.net/bronze/").unwrap();
        store_for(&az, &options(&[("azure_storage_account_key", "a2V5")])).unwrap();
        let gs = Url::parse("gs://bucket/x/").unwrap();
        store_for(&gs, &options(&[("google_service_account_key", "{}"), ("google_skip_signature", "true")]))
            .map(|_| ())
            .unwrap_or_else(|e| assert!(e.to_string().contains("gs://bucket"), "{e}"));
        // delta-rs' own options pass.
        store_for(&s3, &options(&[("aws_region", "eu-west-1"), ("max_concurrency", "8")])).unwrap();
    }

    #[test]
    fn a_misspelt_option_is_named_and_a_secret_is_not_shown() {
        let s3 = Url::parse("s3://bucket/landing/").unwrap();
        let storage = options(&[("aws_regoin", "eu-west-1"), ("aws_secret_access_key", "very-secret-value")]);
        let error = store_for(&s3, &storage).unwrap_err().to_string();
        assert!(error.contains("unknown storage option `aws_regoin` for S3"), "{error}");
        assert!(!error.contains("very-secret-value"), "{error}");
    }
}
