//! Object stores for locations given as URLs.

use std::sync::Arc;

use object_store::ObjectStore;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use url::Url;

use crate::error::WorkerError;

/// The store for `url` and the path of `url` inside it.
pub fn store_for(url: &Url) -> Result<(Arc<dyn ObjectStore>, Path), WorkerError> {
    match url.scheme() {
        "file" => {
            let path = Path::from_url_path(url.path()).map_err(|e| WorkerError::Location(format!("{url}: {e}")))?;
            Ok((Arc::new(LocalFileSystem::new()), path))
        }
        scheme => Err(WorkerError::Location(format!(
            "{url}: `{scheme}://` locations are not supported yet; this build reads and writes local paths and file:// URLs"
        ))),
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
