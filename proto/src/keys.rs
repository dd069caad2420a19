//! The coordination store's key layout, in one place.
//!
//! Every key lives under `/sluice/<namespace>/`, so several clusters (or tests)
//! can share one store. The store holds live coordination only: durable progress
//! lives in the Delta log (`txn`) and the pipeline's checkpoint location.
//!
//! ```text
//! /sluice/<ns>/tasks/<pipeline>/<flow>/<batch:020>/<task:06>    TaskSpec JSON     put by the coordinator
//! /sluice/<ns>/claims/<pipeline>/<flow>/<batch:020>/<task:06>   worker id         created if absent, bound to the worker's lease
//! /sluice/<ns>/results/<pipeline>/<flow>/<batch:020>/<task:06>  TaskOutcome JSON  put by the worker, only while its claim holds
//! /sluice/<ns>/workers/<worker id>                              WorkerRegistration JSON, bound to the worker's lease
//! /sluice/<ns>/leader                                           LeaderValue JSON  created if absent, bound to the leader's lease
//! /sluice/<ns>/pipelines/<pipeline>                             PipelineRecord JSON  put by any coordinator (submit, stop, resume)
//! /sluice/<ns>/status/<pipeline>                                PipelineStatus protobuf  put by the leader, only while it leads
//! ```
//!
//! Claim values are `<worker id>#<token>`, unique per claim (see
//! [`crate::task::claim_value`]).
//!
//! Coordinators elect a leader by creating `leader` under their own lease; the
//! others watch it and try again when it vanishes. Only the leader runs
//! pipelines; it checks that `leader` still holds its value right before every
//! Delta commit, and writes `status/` guarded by the same comparison, so a
//! deposed leader can neither commit nor overwrite its successor's status.
//! (The Delta txn check makes a commit racing that check harmless: see
//! `docs/DESIGN.md`.) Submitted specs live in `pipelines/` so that a new leader
//! knows every pipeline; what they have ingested lives in their Delta tables and
//! checkpoints, never in etcd.
//!
//! A task is free when it has neither a claim nor a result. A worker that dies
//! loses its lease, its claims vanish with it, and the task is free again. The
//! coordinator deletes a batch's keys once the batch is committed or abandoned.
//! Batch and task numbers are zero-padded so keys sort in numeric order.

use crate::task::TaskId;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    root: String,
}

impl Keys {
    pub fn new(namespace: &str) -> Self {
        Self { root: format!("/sluice/{namespace}") }
    }

    /// Every key of this namespace.
    pub fn root_prefix(&self) -> String {
        format!("{}/", self.root)
    }

    pub fn tasks_prefix(&self) -> String {
        format!("{}/tasks/", self.root)
    }

    pub fn claims_prefix(&self) -> String {
        format!("{}/claims/", self.root)
    }

    pub fn results_prefix(&self) -> String {
        format!("{}/results/", self.root)
    }

    pub fn leader(&self) -> String {
        format!("{}/leader", self.root)
    }

    pub fn pipelines_prefix(&self) -> String {
        format!("{}/pipelines/", self.root)
    }

    pub fn pipeline(&self, name: &str) -> String {
        format!("{}{name}", self.pipelines_prefix())
    }

    pub fn status_prefix(&self) -> String {
        format!("{}/status/", self.root)
    }

    pub fn status(&self, name: &str) -> String {
        format!("{}{name}", self.status_prefix())
    }

    /// Tasks (or claims, or results) of every batch of one pipeline, under `kind_prefix`.
    pub fn pipeline_suffix(pipeline: &str) -> String {
        format!("{pipeline}/")
    }

    pub fn workers_prefix(&self) -> String {
        format!("{}/workers/", self.root)
    }

    pub fn task(&self, id: &TaskId) -> String {
        format!("{}{}", self.tasks_prefix(), task_suffix(id))
    }

    pub fn claim(&self, id: &TaskId) -> String {
        format!("{}{}", self.claims_prefix(), task_suffix(id))
    }

    pub fn result(&self, id: &TaskId) -> String {
        format!("{}{}", self.results_prefix(), task_suffix(id))
    }

    pub fn worker(&self, worker_id: &str) -> String {
        format!("{}{worker_id}", self.workers_prefix())
    }

    /// The part of a task, claim or result key after its kind's prefix, for one batch.
    pub fn batch_suffix(pipeline: &str, flow: &str, batch: u64) -> String {
        format!("{pipeline}/{flow}/{batch:020}/")
    }

    /// The task suffix of a key under `prefix`, if it is one.
    pub fn suffix_of<'k>(prefix: &str, key: &'k str) -> Option<&'k str> {
        key.strip_prefix(prefix)
    }
}

fn task_suffix(id: &TaskId) -> String {
    format!("{}{:06}", Keys::batch_suffix(&id.pipeline, &id.flow, id.batch), id.index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_numerically_and_share_suffixes() {
        let keys = Keys::new("test");
        let id = |batch, index| TaskId { pipeline: "p".into(), flow: "f".into(), batch, index };
        assert!(keys.task(&id(9, 0)) < keys.task(&id(10, 0)));
        assert_eq!(keys.task(&id(1, 2)), "/sluice/test/tasks/p/f/00000000000000000001/000002");
        let (claim, task) = (keys.claim(&id(1, 2)), keys.task(&id(1, 2)));
        let suffix = Keys::suffix_of(&keys.claims_prefix(), &claim).unwrap();
        assert_eq!(Keys::suffix_of(&keys.tasks_prefix(), &task).unwrap(), suffix);
    }
}
