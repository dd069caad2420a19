//! The task queue protocol on top of a [`KvStore`] (see [`crate::keys`]).
//!
//! The coordinator publishes a batch's tasks and waits for one outcome per task.
//! A worker claims a free task by creating its claim key bound to its own lease,
//! and publishes the outcome only while that claim still holds: a worker whose
//! lease expired cannot publish, so a task is never completed by two workers.

use std::collections::HashSet;
use std::time::Duration;

use crate::keys::Keys;
use crate::kv::{KvError, KvStore, LeaseId};
use crate::task::{TaskId, TaskOutcome, TaskSpec, claim_value};

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error("malformed entry at {key}: {message}")]
    Malformed { key: String, message: String },
}

pub struct TaskQueue<'a> {
    pub kv: &'a dyn KvStore,
    pub keys: &'a Keys,
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Serializing these plain data types to JSON cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, QueueError> {
    serde_json::from_slice(bytes).map_err(|e| QueueError::Malformed { key: key.to_string(), message: e.to_string() })
}

impl TaskQueue<'_> {
    // ----- coordinator side -----

    pub async fn publish(&self, tasks: &[TaskSpec]) -> Result<(), QueueError> {
        for task in tasks {
            self.kv.put(&self.keys.task(&task.id), encode(task)).await?;
        }
        Ok(())
    }

    /// Outcomes published so far for a batch, by task index, and the revision read at.
    pub async fn outcomes(
        &self,
        pipeline: &str,
        flow: &str,
        batch: u64,
    ) -> Result<(u64, Vec<(u32, TaskOutcome)>), QueueError> {
        let prefix = format!("{}{}", self.keys.results_prefix(), Keys::batch_suffix(pipeline, flow, batch));
        let listing = self.kv.list(&prefix).await?;
        let mut outcomes = Vec::with_capacity(listing.entries.len());
        for (key, value) in &listing.entries {
            let index = key[prefix.len()..]
                .parse::<u32>()
                .map_err(|e| QueueError::Malformed { key: key.clone(), message: e.to_string() })?;
            outcomes.push((index, decode(key, value)?));
        }
        Ok((listing.revision, outcomes))
    }

    /// Waits for a change to a batch's outcomes after `revision`.
    pub async fn wait_for_outcomes(
        &self,
        pipeline: &str,
        flow: &str,
        batch: u64,
        revision: u64,
        timeout: Duration,
    ) -> Result<(), QueueError> {
        let prefix = format!("{}{}", self.keys.results_prefix(), Keys::batch_suffix(pipeline, flow, batch));
        self.kv.wait_for_change(&prefix, revision, timeout).await?;
        Ok(())
    }

    /// Hands a task out again: a new attempt, with its claim and outcome cleared.
    pub async fn retry(&self, task: &TaskSpec) -> Result<(), QueueError> {
        let mut again = task.clone();
        again.attempt += 1;
        self.kv.delete(&self.keys.result(&task.id)).await?;
        self.kv.delete(&self.keys.claim(&task.id)).await?;
        self.kv.put(&self.keys.task(&task.id), encode(&again)).await?;
        Ok(())
    }

    /// Removes every key of a batch: its tasks, claims and outcomes.
    pub async fn clear_batch(&self, pipeline: &str, flow: &str, batch: u64) -> Result<(), QueueError> {
        let suffix = Keys::batch_suffix(pipeline, flow, batch);
        for prefix in [self.keys.tasks_prefix(), self.keys.claims_prefix(), self.keys.results_prefix()] {
            self.kv.delete_prefix(&format!("{prefix}{suffix}")).await?;
        }
        Ok(())
    }

    // ----- worker side -----

    /// Claims the first free task, if any, for `worker` under `lease`. Returns the
    /// task and the claim's value, which [`Self::publish_outcome`] needs.
    pub async fn claim_next(&self, worker: &str, lease: LeaseId) -> Result<Option<(TaskSpec, String)>, QueueError> {
        let (tasks_prefix, claims_prefix, results_prefix) =
            (self.keys.tasks_prefix(), self.keys.claims_prefix(), self.keys.results_prefix());
        let tasks = self.kv.list(&tasks_prefix).await?;
        if tasks.entries.is_empty() {
            return Ok(None);
        }
        let taken: HashSet<String> = self
            .kv
            .list(&claims_prefix)
            .await?
            .entries
            .into_iter()
            .filter_map(|(k, _)| Keys::suffix_of(&claims_prefix, &k).map(str::to_string))
            .chain(
                self.kv
                    .list(&results_prefix)
                    .await?
                    .entries
                    .into_iter()
                    .filter_map(|(k, _)| Keys::suffix_of(&results_prefix, &k).map(str::to_string)),
            )
            .collect();
        for (key, value) in &tasks.entries {
            let Some(suffix) = Keys::suffix_of(&tasks_prefix, key) else { continue };
            if taken.contains(suffix) {
                continue;
            }
            let task: TaskSpec = decode(key, value)?;
            let claim = claim_value(worker, &format!("{lease:x}-{}-{}", task.attempt, self.kv_nonce()));
            let claim_key = self.keys.claim(&task.id);
            if self.kv.create_if_absent(&claim_key, claim.clone().into_bytes(), Some(lease)).await? {
                // The listings above are not one snapshot: a batch cleared in
                // between (its tasks go first, then its claims and outcomes)
                // can leave a task listed whose claim was just deleted. A claim
                // on a task that is gone, or handed out again since, is dropped
                // rather than run for nothing.
                if self.kv.get(key).await?.as_deref() != Some(value.as_slice()) {
                    self.kv.delete(&claim_key).await?;
                    continue;
                }
                return Ok(Some((task, claim)));
            }
        }
        Ok(None)
    }

    /// Publishes an outcome while the claim (as [`Self::claim_next`] returned it)
    /// holds. False when the claim is gone (lease lost, batch abandoned, task
    /// handed out again): the outcome must then be discarded.
    pub async fn publish_outcome(&self, claim: &str, id: &TaskId, outcome: &TaskOutcome) -> Result<bool, QueueError> {
        Ok(self.kv.put_if_equal(&self.keys.claim(id), claim.as_bytes(), &self.keys.result(id), encode(outcome)).await?)
    }

    fn kv_nonce(&self) -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed)
    }

    /// Waits for a change to tasks or claims (a new task, a claim that vanished).
    pub async fn wait_for_work(&self, revision: u64, timeout: Duration) -> Result<(), QueueError> {
        self.kv.wait_for_change(&self.keys.tasks_prefix(), revision, timeout).await?;
        Ok(())
    }

    pub async fn revision(&self) -> Result<u64, QueueError> {
        Ok(self.kv.list(&self.keys.tasks_prefix()).await?.revision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::MemoryKv;
    use crate::spec::{CsvOptions, Format};
    use crate::task::{TaskFailure, TaskResult};
    use arrow_schema::Schema;

    fn task(index: u32) -> TaskSpec {
        TaskSpec {
            id: TaskId { pipeline: "p".into(), flow: "f".into(), batch: 1, index },
            attempt: 0,
            files: vec![],
            format: Format::Json,
            csv: CsvOptions::default(),
            source_schema: Schema::empty(),
            transform: None,
            table_url: "file:///t/".into(),
            table_schema: Schema::empty(),
            partition_by: vec![],
            ingest_time_us: 0,
            delta_read: None,
            merge: None,
            watermark: None,
            on_malformed: Default::default(),
            schema_evolution: Default::default(),
            expectations: vec![],
            storage: Default::default(),
            quarantine_url: "file:///t_quarantine/".into(),
            tables: Vec::new(),
            ballista: None,
        }
    }

    #[tokio::test]
    async fn each_task_is_claimed_once_and_a_lost_claim_cannot_publish() {
        let kv = MemoryKv::new();
        let keys = Keys::new("t");
        let queue = TaskQueue { kv: &kv, keys: &keys };
        queue.publish(&[task(0), task(1)]).await.unwrap();
        let (a, b) = (
            kv.grant_lease(Duration::from_secs(30)).await.unwrap(),
            kv.grant_lease(Duration::from_secs(30)).await.unwrap(),
        );
        let (first, first_claim) = queue.claim_next("a", a).await.unwrap().unwrap();
        let (second, second_claim) = queue.claim_next("b", b).await.unwrap().unwrap();
        assert_ne!(first.id, second.id);
        assert!(queue.claim_next("b", b).await.unwrap().is_none());

        // Worker a dies: its claim vanishes, b takes the task over, a cannot publish.
        kv.revoke_lease(a).await.unwrap();
        let (retaken, retaken_claim) = queue.claim_next("b", b).await.unwrap().unwrap();
        assert_eq!(retaken.id, first.id);
        let done = TaskOutcome::Done(TaskResult { worker: "a".into(), ..Default::default() });
        assert!(!queue.publish_outcome(&first_claim, &first.id, &done).await.unwrap());
        assert!(queue.publish_outcome(&retaken_claim, &first.id, &done).await.unwrap());
        let failed = TaskOutcome::Failed(TaskFailure {
            message: "x".into(),
            retryable: true,
            worker: "b".into(),
            new_columns: None,
        });
        assert!(queue.publish_outcome(&second_claim, &second.id, &failed).await.unwrap());
        let (_, outcomes) = queue.outcomes("p", "f", 1).await.unwrap();
        assert_eq!(outcomes.len(), 2);

        // A retried task is free again with a higher attempt.
        queue.retry(&second).await.unwrap();
        let (again, again_claim) = queue.claim_next("b", b).await.unwrap().unwrap();
        assert_eq!((again.id.index, again.attempt), (second.id.index, 1));
        // The first attempt's claim cannot publish under the second claim, even from the same worker.
        assert!(!queue.publish_outcome(&second_claim, &second.id, &failed).await.unwrap());
        assert!(queue.publish_outcome(&again_claim, &second.id, &failed).await.unwrap());
        queue.clear_batch("p", "f", 1).await.unwrap();
        assert!(kv.list(&keys.root_prefix()).await.unwrap().entries.is_empty());
    }
}
