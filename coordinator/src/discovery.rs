//! Finding the files of a files source, and which of them are new.
//!
//! A file's identity is its path plus size, modification time and etag: a file
//! rewritten in place is detected. By default it is skipped with a warning (as
//! Auto Loader does); with `allow_overwrites: true` it is ingested again.
//! Files and folders whose names start with `.` or `_` are ignored (`_SUCCESS`,
//! `.crc` and temporary files of writers that rename into place).

use std::collections::HashMap;

use futures::TryStreamExt;
use globset::GlobMatcher;
use sluice_proto::spec::FilesSource;
use sluice_proto::storage::StorageOptions;
use sluice_proto::task::SourceFile;
use sluice_worker::storage::{redacted, store_for, url_of};

use crate::error::CoordinatorError;

/// Lists the files of the source, oldest first (then by path).
pub async fn list_source(
    flow: &str,
    source: &FilesSource,
    storage: &StorageOptions,
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
    let objects: Vec<object_store::ObjectMeta> =
        store.list(Some(&prefix)).try_collect().await.map_err(|e| listing_error(e.to_string()))?;
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
    files.sort_by(|a, b| (a.modified_ms, &a.url).cmp(&(b.modified_ms, &b.url)));
    Ok(files)
}

/// The files ingested so far, by URL, with the identity they had when ingested.
#[derive(Debug, Default, Clone)]
pub struct Ledger {
    files: HashMap<String, SourceFile>,
}

impl Ledger {
    pub fn record(&mut self, files: &[SourceFile]) {
        for file in files {
            self.files.insert(file.url.clone(), file.clone());
        }
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
    fn ledger_tells_new_from_rewritten() {
        let mut ledger = Ledger::default();
        ledger.record(&[file("a", 10, 1), file("b", 10, 1)]);
        let found = ledger.compare(vec![file("a", 10, 1), file("b", 11, 2), file("c", 5, 3)]);
        assert_eq!(found.new, vec![file("c", 5, 3)]);
        assert_eq!(found.rewritten, vec![file("b", 11, 2)]);
    }
}
