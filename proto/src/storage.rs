//! Object-store options per location: the pipeline file's `storage_options`.
//!
//! A pipeline may set `storage_options` at its top level (for every location it
//! names, the checkpoint included) and on each source and sink (for that
//! location, over the top-level ones). A location that is not named
//! (a file inside a source folder, a quarantine table beside its sink, the sink
//! of a `flow:` reference) takes the options of the longest named location it
//! lies under. Options not given come from the process environment
//! (`AWS_ACCESS_KEY_ID`, `AZURE_STORAGE_ACCOUNT_NAME`, ...), as object_store and
//! delta-rs read it.
//!
//! A value may be written `${NAME}`: it is read from the environment of the
//! process that opens the store, so a secret can live in a Kubernetes Secret
//! instead of the pipeline file (which a cluster keeps in etcd). Values are
//! never shown: `Debug` prints the keys only.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use url::Url;

/// The options of every location of a pipeline.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageOptions {
    /// Options for every location (the pipeline file's top-level `storage_options`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub base: BTreeMap<String, String>,
    /// Options by location prefix (ending in `/`), over `base`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<StorageScope>,
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageScope {
    pub prefix: String,
    pub options: BTreeMap<String, String>,
}

/// The `storage_options` written on one location; `Debug` shows the keys only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct LocationOptions(pub BTreeMap<String, String>);

impl std::fmt::Debug for LocationOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

/// A `${NAME}` reference to a variable the process does not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("storage option `{key}` refers to ${{{variable}}}, which is not set in this process's environment")]
pub struct UnsetVariable {
    pub key: String,
    pub variable: String,
}

impl StorageOptions {
    pub fn is_empty(&self) -> bool {
        self.base.is_empty() && self.scopes.is_empty()
    }

    /// Adds the options given for one location (keys are case-insensitive and kept in lower case).
    pub fn add_scope(&mut self, location: &Url, options: &LocationOptions) {
        if options.0.is_empty() {
            return;
        }
        let prefix = prefix_of(location);
        let options: BTreeMap<String, String> =
            options.0.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.clone())).collect();
        match self.scopes.iter_mut().find(|s| s.prefix == prefix) {
            Some(scope) => scope.options.extend(options),
            None => self.scopes.push(StorageScope { prefix, options }),
        }
    }

    /// The options as written that apply to `url`: `base`, then the scopes it lies
    /// under from the shortest prefix to the longest. `${NAME}` is not resolved.
    pub fn written_for(&self, url: &Url) -> BTreeMap<String, String> {
        let target = prefix_of(url);
        let mut scopes: Vec<&StorageScope> = self.scopes.iter().filter(|s| target.starts_with(&s.prefix)).collect();
        scopes.sort_by_key(|s| s.prefix.len());
        let mut options: BTreeMap<String, String> =
            self.base.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.clone())).collect();
        for scope in scopes {
            options.extend(scope.options.clone());
        }
        options
    }

    /// The options for `url`, with `${NAME}` read from this process's environment.
    pub fn resolved_for(&self, url: &Url) -> Result<HashMap<String, String>, UnsetVariable> {
        self.written_for(url).into_iter().map(|(key, value)| Ok((key.clone(), resolve(&key, &value)?))).collect()
    }

    /// Every value that, once resolved, must not be shown (for redacting messages).
    pub fn secrets(&self) -> Vec<String> {
        let all = self.base.iter().chain(self.scopes.iter().flat_map(|s| s.options.iter()));
        all.filter(|(key, _)| is_secret_key(key))
            .filter_map(|(key, value)| resolve(key, value).ok())
            .filter(|value| value.len() >= 4)
            .collect()
    }
}

/// `text` with every secret of `options` replaced by `***`.
pub fn redact(text: &str, options: &StorageOptions) -> String {
    let mut out = text.to_string();
    for secret in options.secrets() {
        out = out.replace(&secret, "***");
    }
    out
}

/// Whether an option's value is a credential (never shown, redacted from messages).
pub fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["secret", "key", "token", "password", "sas", "credential", "signature"].iter().any(|word| key.contains(word))
        && !key.ends_with("_id")
}

fn resolve(key: &str, value: &str) -> Result<String, UnsetVariable> {
    let trimmed = value.trim();
    match trimmed.strip_prefix("${").and_then(|rest| rest.strip_suffix('}')) {
        Some(variable) => {
            std::env::var(variable).map_err(|_| UnsetVariable { key: key.to_string(), variable: variable.to_string() })
        }
        None => Ok(value.to_string()),
    }
}

/// The URL as a prefix that ends in `/`, so that `s3://b/a` does not cover `s3://b/ab`.
fn prefix_of(url: &Url) -> String {
    let text = url.as_str();
    if text.ends_with('/') { text.to_string() } else { format!("{text}/") }
}

impl std::fmt::Debug for StorageOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageOptions")
            .field("base", &self.base.keys().collect::<Vec<_>>())
            .field("scopes", &self.scopes)
            .finish()
    }
}

impl std::fmt::Debug for StorageScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {:?}", self.prefix, self.options.keys().collect::<Vec<_>>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn longest_prefix_wins_over_base() {
        let mut options = StorageOptions {
            base: map(&[("AWS_REGION", "eu-west-1"), ("aws_allow_http", "false")]),
            ..Default::default()
        };
        options
            .add_scope(&Url::parse("s3://landing/raw").unwrap(), &LocationOptions(map(&[("aws_allow_http", "true")])));
        options.add_scope(
            &Url::parse("s3://landing/raw/eu/").unwrap(),
            &LocationOptions(map(&[("aws_region", "eu-central-1")])),
        );
        let file = Url::parse("s3://landing/raw/eu/2026/a.json").unwrap();
        let got = options.resolved_for(&file).unwrap();
        assert_eq!(got["aws_region"], "eu-central-1");
        assert_eq!(got["aws_allow_http"], "true");
        // `raw` does not cover `rawer`.
        let other = Url::parse("s3://landing/rawer/a.json").unwrap();
        assert_eq!(options.resolved_for(&other).unwrap()["aws_allow_http"], "false");
    }

    #[test]
    fn variables_are_read_from_the_environment_and_never_shown() {
        let options = StorageOptions {
            base: map(&[("aws_secret_access_key", "${PATH}"), ("aws_access_key_id", "AKIDEXAMPLE")]),
            ..Default::default()
        };
        let url = Url::parse("s3://b/").unwrap();
        let path = std::env::var("PATH").unwrap();
        assert_eq!(options.resolved_for(&url).unwrap()["aws_secret_access_key"], path);
        assert!(!format!("{options:?}").contains("AKIDEXAMPLE"));
        assert_eq!(redact(&format!("failed with {path}"), &options), "failed with ***");
        let unset = StorageOptions { base: map(&[("k", "${SLUICE_SURELY_UNSET}")]), ..Default::default() };
        let error = unset.resolved_for(&url).unwrap_err();
        assert!(error.to_string().contains("${SLUICE_SURELY_UNSET}"), "{error}");
    }

    #[test]
    fn secret_keys() {
        for key in [
            "aws_secret_access_key",
            "azure_storage_account_key",
            "azure_storage_sas_key",
            "google_service_account_key",
            "aws_session_token",
            "bearer_token",
        ] {
            assert!(is_secret_key(key), "{key}");
        }
        for key in ["aws_access_key_id", "aws_region", "azure_storage_account_name", "aws_endpoint"] {
            assert!(!is_secret_key(key), "{key}");
        }
    }
}
