//! Finding the files of a files source, and which of them are new.
//!
//! A file's identity is its path plus size, modification time and etag: a file
//! rewritten in place is detected. By default it is skipped with a warning (as
//! Auto Loader does); with `allow_overwrites: true` it is ingested again.
//! Files and folders whose names start with `.` or `_` are ignored (`_SUCCESS`,
//! `.crc` and temporary files of writers that rename into place).
//!
//! A listing is full, or incremental: it starts after the greatest key
//! ingested so far (S3's `start-after`, Azure's and GCS's offsets; on local
//! disk the files before it are not even stat'ed), which only sees every new
//! file when keys arrive in lexical order. `listing: auto` lists incrementally
//! while the ledger shows they did; see `FlowRunner::listing_offset`.

use std::collections::HashMap;

use futures::TryStreamExt;
use globset::GlobMatcher;
use object_store::ObjectStoreExt;
use object_store::path::Path;
use sluice_proto::spec::FilesSource;
use sluice_proto::storage::StorageOptions;
use sluice_proto::task::SourceFile;
use sluice_worker::storage::{redacted, store_for, url_of};

use crate::error::CoordinatorError;

/// Lists the files of the source, oldest first (then by path); with `after`,
/// only those whose key is greater.
pub async fn list_source(
    flow: &str,
    source: &FilesSource,
    storage: &StorageOptions,
    after: Option<&Path>,
) -> Result<Vec<SourceFile>, CoordinatorError> {
    let location = source.location.to_string();
    let listing_error = |message: String| CoordinatorError::SourceListing {
        flow: flow.to_string(),
        path: location.clone(),
        message: redacted(&message, storage),
    };
    if source.location.scheme() == "file" {
        let exists = source.location.to_file_path().is_ok_and(|p| p.is_dir());
        if !exists {
            return Err(CoordinatorError::SourceMissing { flow: flow.to_string(), path: location });
        }
    }
    let (store, prefix) = store_for(&source.location, storage).map_err(|e| listing_error(e.to_string()))?;
    let matcher: Option<GlobMatcher> = match &source.glob {
        Some(glob) => Some(globset::Glob::new(glob).map_err(|e| listing_error(e.to_string()))?.compile_matcher()),
        None => None,
    };
    let listing = match after {
        Some(offset) => store.list_with_offset(Some(&prefix), offset),
        None => store.list(Some(&prefix)),
    };
    let objects: Vec<object_store::ObjectMeta> =
        listing.try_collect().await.map_err(|e| listing_error(e.to_string()))?;
    let mut files: Vec<SourceFile> = objects
        .into_iter()
        .filter_map(|meta| {
            let relative: Vec<_> = meta.location.prefix_match(&prefix)?.map(|part| part.as_ref().to_string()).collect();
            let hidden = relative.iter().any(|part| part.starts_with('.') || part.starts_with('_'));
            let matches = matcher.as_ref().is_none_or(|m| m.is_match(relative.join("/")));
            (!hidden && matches).then(|| SourceFile {
                url: url_of(&source.location, &meta.location),
                size: meta.size,
                modified_ms: meta.last_modified.timestamp_millis(),
                etag: meta.e_tag,
            })
        })
        .collect();
    sort_oldest_first(&mut files);
    Ok(files)
}

/// The order files are ingested in: oldest first, then by path.
pub fn sort_oldest_first(files: &mut [SourceFile]) {
    files.sort_by(|a, b| (a.modified_ms, &a.url).cmp(&(b.modified_ms, &b.url)));
}

/// A file's current identity, or `None` when it no longer exists.
pub async fn head_file(url: &str, storage: &StorageOptions) -> Result<Option<SourceFile>, String> {
    let parsed = sluice_worker::storage::parse_url(url).map_err(|e| e.to_string())?;
    let (store, path) = store_for(&parsed, storage).map_err(|e| e.to_string())?;
    match store.head(&path).await {
        Ok(meta) => Ok(Some(SourceFile {
            url: url.to_string(),
            size: meta.size,
            modified_ms: meta.last_modified.timestamp_millis(),
            etag: meta.e_tag,
        })),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(redacted(&e.to_string(), storage)),
    }
}

/// The object key of a file URL, as listings order them.
fn key_of(url: &str) -> Option<Path> {
    url::Url::parse(url).ok().and_then(|u| sluice_worker::storage::path_in_bucket(&u).ok())
}

/// The files ingested so far, by URL, with the identity they had when ingested.
#[derive(Debug, Clone)]
pub struct Ledger {
    files: HashMap<String, SourceFile>,
    /// The greatest key ingested.
    last_key: Option<Path>,
    /// Whether each batch recorded brought only keys greater than every earlier batch's.
    ordered: bool,
}

impl Default for Ledger {
    fn default() -> Self {
        Self { files: HashMap::new(), last_key: None, ordered: true }
    }
}

impl Ledger {
    /// Records one batch's files (batches in the order they were committed).
    pub fn record(&mut self, files: &[SourceFile]) {
        let keys: Vec<Path> = files.iter().filter_map(|f| key_of(&f.url)).collect();
        if let (Some(last), Some(least)) = (&self.last_key, keys.iter().min())
            && least <= last
        {
            self.ordered = false;
        }
        if let Some(greatest) = keys.into_iter().max()
            && self.last_key.as_ref().is_none_or(|last| &greatest > last)
        {
            self.last_key = Some(greatest);
        }
        for file in files {
            self.files.insert(file.url.clone(), file.clone());
        }
    }

    /// Whether the files of a full listing that are new to the ledger all have
    /// keys above the greatest one ingested; `None` when nothing tells (no
    /// new file, or nothing ingested yet).
    pub fn new_keys_in_order(&self, listed: &[SourceFile]) -> Option<bool> {
        let last = self.last_key.as_ref()?;
        let mut new_keys = listed.iter().filter(|f| !self.files.contains_key(&f.url)).filter_map(|f| key_of(&f.url));
        let first = new_keys.next()?;
        Some(first > *last && new_keys.all(|key| key > *last))
    }

    /// The greatest key ingested: where an incremental listing starts.
    pub fn last_key(&self) -> Option<&Path> {
        self.last_key.as_ref()
    }

    /// Whether keys have arrived in lexical order so far (batch after batch).
    pub fn ordered(&self) -> bool {
        self.ordered
    }

    /// Whether this very file (same path and content) was ingested.
    pub fn contains(&self, file: &SourceFile) -> bool {
        self.files.get(&file.url).is_some_and(|seen| same_content(seen, file))
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Splits listed files into new ones and ones rewritten since they were ingested.
    pub fn compare(&self, listed: Vec<SourceFile>) -> Discovered {
        let mut discovered = Discovered::default();
        for file in listed {
            match self.files.get(&file.url) {
                None => discovered.new.push(file),
                Some(seen) if same_content(seen, &file) => {}
                Some(_) => discovered.rewritten.push(file),
            }
        }
        discovered
    }
}

fn same_content(seen: &SourceFile, now: &SourceFile) -> bool {
    let etags_agree = match (&seen.etag, &now.etag) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    };
    seen.size == now.size && seen.modified_ms == now.modified_ms && etags_agree
}

#[derive(Debug, Default)]
pub struct Discovered {
    pub new: Vec<SourceFile>,
    /// Files already ingested whose content changed since.
    pub rewritten: Vec<SourceFile>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, size: u64, modified_ms: i64) -> SourceFile {
        SourceFile { url: format!("file:///src/{name}"), size, modified_ms, etag: None }
    }

    #[test]
    fn ledger_knows_whether_keys_arrived_in_order() {
        let mut ledger = Ledger::default();
        assert!(ledger.last_key().is_none() && ledger.ordered());
        ledger.record(&[file("2026-01-02.json", 1, 9), file("2026-01-01.json", 1, 10)]);
        ledger.record(&[file("2026-01-03.json", 1, 1)]);
        assert!(ledger.ordered(), "order within a batch does not matter, nor modification times");
        assert_eq!(ledger.last_key().map(|k| k.to_string()).as_deref(), Some("src/2026-01-03.json"));
        ledger.record(&[file("2026-01-02b.json", 1, 11)]);
        assert!(!ledger.ordered(), "a key below the greatest one ingested");
        assert_eq!(ledger.new_keys_in_order(&[file("2026-01-01.json", 1, 10)]), None, "nothing new");
        assert_eq!(ledger.new_keys_in_order(&[file("2026-01-04.json", 1, 1)]), Some(true));
        assert_eq!(
            ledger.new_keys_in_order(&[file("2026-01-04.json", 1, 1), file("2026-01-00.json", 1, 1)]),
            Some(false)
        );
        assert_eq!(ledger.last_key().map(|k| k.to_string()).as_deref(), Some("src/2026-01-03.json"));
    }

    #[test]
    fn ledger_tells_new_from_rewritten() {
        let mut ledger = Ledger::default();
        ledger.record(&[file("a", 10, 1), file("b", 10, 1)]);
        let found = ledger.compare(vec![file("a", 10, 1), file("b", 11, 2), file("c", 5, 3)]);
        assert_eq!(found.new, vec![file("c", 5, 3)]);
        assert_eq!(found.rewritten, vec![file("b", 11, 2)]);
    }
}
