//! A text file's bytes, chunk by chunk, one chunk read ahead of the decoder.
//!
//! From a cloud store, each chunk is one ranged GET. A local file is opened
//! once and read with `pread` into buffers that are used again: object_store's
//! local reads open the file for every range and zero each new buffer before
//! reading into it, which made zeroing memory and faulting it in cost about a
//! tenth of an ingest's CPU time (perf, 1 M invoices).

use std::fs::File;
use std::io::ErrorKind;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use url::Url;

/// Bytes read at a time.
pub const READ_CHUNK: u64 = 8 << 20;

/// Chunks read ahead of the one being decoded.
const AHEAD: usize = 2;

/// Free buffers kept for the next chunks: enough for the files two tasks read
/// at once, each with its chunks ahead.
const KEEP: usize = 8;

/// The file's first `size` bytes (its size when discovered) in chunks of
/// [`READ_CHUNK`]. object_store's own `get` stream reads local files 8 KiB at
/// a time, each read a trip through the blocking thread pool, which made
/// decoding wait on I/O: hence ranges.
pub fn read_ahead(
    store: Arc<dyn ObjectStore>,
    path: Path,
    url: &Url,
    size: u64,
) -> BoxStream<'static, object_store::Result<Bytes>> {
    if url.scheme() == "file"
        && let Ok(local) = url.to_file_path()
    {
        return local_chunks(local, size);
    }
    futures::stream::iter(ranges(size))
        .map(move |range| {
            let (store, path) = (store.clone(), path.clone());
            async move { store.get_range(&path, range).await }
        })
        .buffered(AHEAD)
        .boxed()
}

fn ranges(size: u64) -> Vec<Range<u64>> {
    (0..size).step_by(READ_CHUNK as usize).map(|start| start..(start + READ_CHUNK).min(size)).collect()
}

fn local_chunks(path: PathBuf, size: u64) -> BoxStream<'static, object_store::Result<Bytes>> {
    let opened = async move {
        let open = tokio::task::spawn_blocking(move || match File::open(&path) {
            Ok(file) => Ok((Arc::new(file), Arc::new(path))),
            Err(e) => Err(io_error(&path, e)),
        });
        open.await.map_err(|e| generic(e.to_string()))?
    };
    futures::stream::once(opened)
        .map_ok(move |(file, path)| {
            futures::stream::iter(ranges(size))
                .map(move |range| {
                    let (file, path) = (file.clone(), path.clone());
                    async move {
                        let read = tokio::task::spawn_blocking(move || read_chunk(&file, &path, range));
                        read.await.map_err(|e| generic(e.to_string()))?
                    }
                })
                .buffered(AHEAD)
        })
        .try_flatten()
        .boxed()
}

/// Reads `range` (at most [`READ_CHUNK`] bytes) of the file into a buffer
/// from the pool.
fn read_chunk(file: &File, path: &std::path::Path, range: Range<u64>) -> object_store::Result<Bytes> {
    let len = (range.end - range.start) as usize;
    let mut chunk = Chunk { buf: free_buffer(), len };
    let mut filled = 0;
    while filled < len {
        match file.read_at(&mut chunk.buf[filled..len], range.start + filled as u64) {
            Ok(0) => {
                return Err(generic(format!(
                    "{} is shorter than when it was discovered: {} bytes, {} expected (it was rewritten or truncated)",
                    path.display(),
                    range.start + filled as u64,
                    range.end
                )));
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error(path, e)),
        }
    }
    Ok(Bytes::from_owner(chunk))
}

fn io_error(path: &std::path::Path, error: std::io::Error) -> object_store::Error {
    if error.kind() == ErrorKind::NotFound {
        object_store::Error::NotFound { path: path.display().to_string(), source: Box::new(error) }
    } else {
        generic(format!("{}: {error}", path.display()))
    }
}

fn generic(message: String) -> object_store::Error {
    object_store::Error::Generic { store: "LocalFileSystem", source: message.into() }
}

/// A chunk read into a pooled buffer: dropped (with every slice of it), the
/// buffer goes back to the pool.
struct Chunk {
    buf: Vec<u8>,
    len: usize,
}

impl AsRef<[u8]> for Chunk {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        if buf.len() == READ_CHUNK as usize {
            let mut free = FREE.lock().unwrap_or_else(|e| e.into_inner());
            if free.len() < KEEP {
                free.push(buf);
            }
        }
    }
}

static FREE: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// A buffer of [`READ_CHUNK`] initialised bytes: a pooled one (already
/// written, so never zeroed again), or a new zeroed one (fresh pages from the
/// OS, which the kernel zeroes anyway).
fn free_buffer() -> Vec<u8> {
    let pooled = FREE.lock().unwrap_or_else(|e| e.into_inner()).pop();
    pooled.unwrap_or_else(|| vec![0; READ_CHUNK as usize])
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(url: &Url, size: u64) -> object_store::Result<Vec<Bytes>> {
        let (store, path) = crate::storage::store_for(url, &Default::default()).unwrap();
        read_ahead(store, path, url, size).try_collect().await
    }

    #[tokio::test]
    async fn local_chunks_hold_the_files_bytes_up_to_the_size_discovered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.json");
        let bytes: Vec<u8> = (0..(READ_CHUNK as usize * 2 + 12345)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let url = Url::from_file_path(&path).unwrap();
        for _ in 0..3 {
            let chunks = read_all(&url, bytes.len() as u64).await.unwrap();
            assert_eq!(chunks.iter().map(|c| c.len()).collect::<Vec<_>>(), [8 << 20, 8 << 20, 12345]);
            assert_eq!(chunks.concat(), bytes);
        }
        // Only the size discovered is read, though the file grew since.
        let chunks = read_all(&url, 100).await.unwrap();
        assert_eq!(chunks.concat(), &bytes[..100]);
        assert!(read_all(&url, 0).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_file_gone_or_shorter_than_discovered_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.json");
        std::fs::write(&path, b"{\"a\": 1}\n").unwrap();
        let url = Url::from_file_path(&path).unwrap();
        let shorter = read_all(&url, 100).await.unwrap_err().to_string();
        assert!(shorter.contains("shorter than when it was discovered"), "{shorter}");
        let gone = Url::from_file_path(dir.path().join("gone.json")).unwrap();
        assert!(matches!(read_all(&gone, 10).await, Err(object_store::Error::NotFound { .. })));
    }
}
