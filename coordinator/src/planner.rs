//! Cutting pending files into micro-batches, and a batch into tasks.

use sluice_proto::task::SourceFile;

/// Tasks per worker slot, so that uneven tasks even out at the end of a batch.
pub const TASKS_PER_SLOT: usize = 2;

/// Below this, a task is not split further: the fixed cost of a task would dominate.
pub const MIN_TASK_BYTES: u64 = 16 << 20;

/// The files of the next batch: oldest first, within both limits, but always at
/// least one file so that a file larger than `max_bytes` still makes progress.
pub fn next_batch(pending: &[SourceFile], max_files: u64, max_bytes: Option<u64>) -> Vec<SourceFile> {
    let mut batch = Vec::new();
    let mut bytes = 0u64;
    for file in pending {
        let over_files = batch.len() as u64 >= max_files;
        let over_bytes = max_bytes.is_some_and(|max| bytes + file.size > max);
        if !batch.is_empty() && (over_files || over_bytes) {
            break;
        }
        bytes += file.size;
        batch.push(file.clone());
    }
    batch
}

/// Splits a batch's files into tasks for `parallelism` worker slots:
/// [`TASKS_PER_SLOT`] tasks a slot, no task smaller than
/// [`MIN_TASK_BYTES`] unless the batch is, largest files placed first.
pub fn split_into_tasks(files: &[SourceFile], parallelism: usize) -> Vec<Vec<SourceFile>> {
    let total: u64 = files.iter().map(|f| f.size).sum();
    let by_size = usize::try_from(total.div_ceil(MIN_TASK_BYTES)).unwrap_or(usize::MAX).max(1);
    let count = (parallelism.max(1) * TASKS_PER_SLOT).min(by_size).min(files.len()).max(1);
    let mut order: Vec<usize> = (0..files.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(files[i].size));
    let mut bins: Vec<(u64, Vec<usize>)> = vec![(0, Vec::new()); count];
    for index in order {
        let lightest = bins.iter_mut().min_by_key(|(bytes, _)| *bytes).expect("count is at least one");
        lightest.0 += files[index].size;
        lightest.1.push(index);
    }
    bins.into_iter()
        .filter(|(_, members)| !members.is_empty())
        .map(|(_, mut members)| {
            members.sort_unstable();
            members.into_iter().map(|i| files[i].clone()).collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(sizes: &[u64]) -> Vec<SourceFile> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, size)| SourceFile {
                url: format!("file:///f{i}"),
                size: *size,
                modified_ms: i as i64,
                etag: None,
            })
            .collect()
    }

    #[test]
    fn batches_respect_limits_but_always_progress() {
        let pending = files(&[10, 10, 10, 10]);
        assert_eq!(next_batch(&pending, 3, None).len(), 3);
        assert_eq!(next_batch(&pending, 10, Some(25)).len(), 2);
        assert_eq!(next_batch(&files(&[100, 1]), 10, Some(50)).len(), 1);
    }

    #[test]
    fn tasks_cover_every_file_once_and_balance_bytes() {
        let mb = 1 << 20;
        let batch = files(&[100 * mb, 10 * mb, 60 * mb, 50 * mb, 5 * mb, 5 * mb]);
        let tasks = split_into_tasks(&batch, 2);
        assert_eq!(tasks.len(), 4);
        let mut seen: Vec<String> = tasks.iter().flatten().map(|f| f.url.clone()).collect();
        seen.sort();
        assert_eq!(seen.len(), batch.len());
        seen.dedup();
        assert_eq!(seen.len(), batch.len());
        assert_eq!(split_into_tasks(&files(&[1, 1, 1]), 2).len(), 1, "small batches stay one task");
    }
}
