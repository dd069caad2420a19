//! A pipeline's live status, as the leader keeps it and every coordinator serves it.

use prost::Message;
use sluice_proto::keys::Keys;
use sluice_proto::kv::{KvError, KvStore, Listing};
use sluice_proto::pb::v1::{FlowStatus, PipelineState, PipelineStatus, TaskStatus, WorkerInfo};
use sluice_proto::registry::PipelineRecord;
use sluice_proto::spec::{PipelineSpec, Trigger};
use sluice_proto::task::{TaskSpec, WorkerRegistration, claim_worker};

use crate::progress::ProgressEvent;

pub fn trigger_text(trigger: &Trigger) -> String {
    match trigger {
        Trigger::AvailableNow => "available_now".to_string(),
        Trigger::Interval(every) => format!("interval {}", humantime::format_duration(*every)),
    }
}

/// The status of a generation that no leader has started yet.
pub fn pending_status(record: &PipelineRecord, spec: Option<&PipelineSpec>) -> PipelineStatus {
    PipelineStatus {
        name: record.name.clone(),
        state: PipelineState::Pending as i32,
        generation: record.generation,
        trigger: spec.map(|s| trigger_text(&s.trigger)).unwrap_or_default(),
        flows: spec
            .map(|s| {
                s.flows
                    .iter()
                    .map(|f| FlowStatus {
                        name: f.name.clone(),
                        table: f.sink.table.to_string(),
                        quarantine: f.quarantine.to_string(),
                        last_delta_version: -1,
                        ..Default::default()
                    })
                    .collect()
            })
            .unwrap_or_default(),
        updated_at_ms: now_ms(),
        ..Default::default()
    }
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

pub fn is_terminal(state: i32) -> bool {
    [PipelineState::Completed, PipelineState::Failed, PipelineState::Stopped].into_iter().any(|s| s as i32 == state)
}

/// Applies a run's progress event to its status. True when the change is worth
/// publishing at once (a state change rather than a counter).
pub fn apply(status: &mut PipelineStatus, event: &ProgressEvent) -> bool {
    let flow =
        |status: &mut PipelineStatus, name: &str| -> Option<usize> { status.flows.iter().position(|f| f.name == name) };
    match event {
        ProgressEvent::Discovered { flow: name, files, bytes } => {
            if let Some(i) = flow(status, name) {
                status.flows[i].files_pending = *files;
                status.flows[i].bytes_pending = *bytes;
                status.flows[i].caught_up = *files == 0;
            }
            false
        }
        ProgressEvent::BatchStarted { flow: name, batch, .. } => {
            status.state = PipelineState::Running as i32;
            if let Some(i) = flow(status, name) {
                status.flows[i].current_batch = *batch;
                status.flows[i].caught_up = false;
            }
            true
        }
        ProgressEvent::TaskFinished { .. } | ProgressEvent::TaskRetried { .. } => false,
        ProgressEvent::SchemaVersion { flow: name, version, added, schema, .. } => {
            if let Some(i) = flow(status, name) {
                let f = &mut status.flows[i];
                f.schema_version = *version;
                f.schema = schema.clone();
                f.schema_added = added.clone();
            }
            true
        }
        ProgressEvent::BatchCommitted(report) => {
            if let Some(i) = flow(status, &report.flow) {
                let f = &mut status.flows[i];
                f.batches_committed += 1;
                f.files_done += report.files;
                f.bytes_done += report.bytes;
                f.rows_done += report.rows;
                f.files_pending = f.files_pending.saturating_sub(report.files);
                f.bytes_pending = f.bytes_pending.saturating_sub(report.bytes);
                f.current_batch = 0;
                if let Some(version) = report.version {
                    f.last_delta_version = version;
                }
                if let Some(quality) = &report.quality {
                    f.quarantined_rows += quality.quarantined_rows;
                    f.malformed_rows += quality.malformed_rows;
                    f.unreadable_files += quality.unreadable_files;
                    for (name, count) in &quality.expectations {
                        *f.expectations_failed.entry(name.clone()).or_default() += count.failed;
                    }
                }
            }
            true
        }
        ProgressEvent::RewrittenFileSkipped { .. } | ProgressEvent::PlannedFileVanished { .. } => false,
        ProgressEvent::FlowCaughtUp { flow: name } => {
            if let Some(i) = flow(status, name) {
                status.flows[i].caught_up = true;
                status.flows[i].files_pending = 0;
                status.flows[i].bytes_pending = 0;
            }
            true
        }
        ProgressEvent::RoundFailed { flow: name, message } => {
            status.last_error = format!("flow `{name}`: {message}");
            if let Some(i) = flow(status, name) {
                status.flows[i].last_error = message.clone();
            }
            true
        }
        ProgressEvent::FlowSkipped { flow: name, upstream } => {
            if let Some(i) = flow(status, name) {
                status.flows[i].last_error = format!("not run: `{upstream}`, which it reads from, failed");
            }
            true
        }
        ProgressEvent::Waiting { .. } => {
            status.state = PipelineState::Waiting as i32;
            true
        }
    }
}

pub fn encode(status: &PipelineStatus) -> Vec<u8> {
    status.encode_to_vec()
}

pub fn decode(bytes: &[u8]) -> Option<PipelineStatus> {
    PipelineStatus::decode(bytes).ok()
}

/// The stored status of `name`, if any.
pub async fn read_status(kv: &dyn KvStore, keys: &Keys, name: &str) -> Result<Option<PipelineStatus>, KvError> {
    Ok(kv.get(&keys.status(name)).await?.and_then(|bytes| decode(&bytes)))
}

/// Fills in what only the store knows right now: the tasks in flight and who
/// holds them, and the live workers.
pub async fn add_live_view(kv: &dyn KvStore, keys: &Keys, status: &mut PipelineStatus) -> Result<(), KvError> {
    let suffix = Keys::pipeline_suffix(&status.name);
    let tasks = kv.list(&format!("{}{suffix}", keys.tasks_prefix())).await?;
    let claims = kv.list(&format!("{}{suffix}", keys.claims_prefix())).await?;
    let results = kv.list(&format!("{}{suffix}", keys.results_prefix())).await?;
    let (tasks_prefix, claims_prefix, results_prefix) =
        (keys.tasks_prefix(), keys.claims_prefix(), keys.results_prefix());
    for flow in &mut status.flows {
        flow.tasks.clear();
    }
    for (key, value) in &tasks.entries {
        let Some(rest) = Keys::suffix_of(&tasks_prefix, key) else { continue };
        let Ok(task) = serde_json::from_slice::<TaskSpec>(value) else { continue };
        let worker = claims
            .entries
            .iter()
            .find(|(k, _)| Keys::suffix_of(&claims_prefix, k) == Some(rest))
            .map(|(_, v)| claim_worker(v))
            .unwrap_or_default();
        let done = results.entries.iter().any(|(k, _)| Keys::suffix_of(&results_prefix, k) == Some(rest));
        if let Some(flow) = status.flows.iter_mut().find(|f| f.name == task.id.flow) {
            flow.tasks.push(TaskStatus {
                batch: task.id.batch,
                index: task.id.index,
                worker,
                files: task.files.len() as u64,
                bytes: task.files.iter().map(|f| f.size).sum(),
                attempt: task.attempt,
                done,
            });
        }
    }
    status.workers = live_workers(kv, keys).await?;
    Ok(())
}

pub async fn live_workers(kv: &dyn KvStore, keys: &Keys) -> Result<Vec<WorkerInfo>, KvError> {
    Ok(workers_in(&kv.list(&keys.workers_prefix()).await?))
}

/// The workers registered in a listing of `workers/`.
pub fn workers_in(listing: &Listing) -> Vec<WorkerInfo> {
    listing
        .entries
        .iter()
        .filter_map(|(_, v)| serde_json::from_slice::<WorkerRegistration>(v).ok())
        .map(|w| WorkerInfo { id: w.id, slots: w.slots })
        .collect()
}
