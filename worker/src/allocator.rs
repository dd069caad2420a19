//! One setting of the binaries' allocator (mimalloc), made when they start.
//!
//! By default mimalloc hands memory it freed back to the OS soon after (its
//! purge delay is 1000 ms; an ingest of 1 M invoices made about 1,100
//! `madvise(MADV_DONTNEED)` calls), and takes it again moments later. Each
//! time, the kernel has to zero the pages again, often as 2 MiB transparent
//! huge pages: in `perf`, zeroing pages took from 4 to 13 % of that ingest's
//! CPU time. Sluice's processes run batch after batch with about the same
//! working set, so they keep what they freed for their next allocations
//! instead (20 such calls for the same ingest): memory stays near the peak it
//! reached (about 350 MiB there) rather than shrinking between batches.
//!
//! Setting `MIMALLOC_PURGE_DELAY` in the environment (in milliseconds; `1000` is
//! mimalloc's default) overrides this.
//!
//! The only `unsafe` code in Sluice: two calls into mimalloc's C API.

#![allow(unsafe_code)]

/// `mi_option_purge_delay` in mimalloc v3's `mimalloc.h` (the crate's bindings
/// do not name it).
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory for reuse (see the module's doc), unless the environment
/// says otherwise. Call it first thing in `main`.
pub fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: sets one of mimalloc's global options, which it reads atomically.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_option_is_mimallocs_purge_delay() {
        // Its default is 1000 ms: a wrong index would read another option.
        // SAFETY: reads one of mimalloc's global options.
        let before = unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) };
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert!(before == 1000 || before == -1, "purge delay read as {before}");
        }
    }
}
