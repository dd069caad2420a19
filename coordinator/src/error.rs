//! The coordinator's errors. Each names the flow (and batch) it concerns.

use deltalake::DeltaTableError;
use sluice_proto::queue::QueueError;
use sluice_worker::WorkerError;

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("flow `{flow}`: the source folder {path} does not exist")]
    SourceMissing { flow: String, path: String },
    #[error("flow `{flow}`: cannot list the source {path}: {message}")]
    SourceListing { flow: String, path: String, message: String },
    #[error("flow `{flow}`: source table {table}: {message}")]
    Source { flow: String, table: String, message: String },
    #[error("{error}; the flows that read from it did not run: {}", skipped.join(", "))]
    DependentsSkipped { error: Box<CoordinatorError>, skipped: Vec<String> },
    #[error("{location}: {message}")]
    Storage { location: String, message: String },
    #[error("checkpoint {location}: {message}")]
    Checkpoint { location: String, message: String },
    #[error("flow `{flow}`: {message}")]
    Schema { flow: String, message: String },
    #[error("flow `{flow}`: {source}")]
    Worker { flow: String, source: WorkerError },
    #[error("flow `{flow}`, batch {batch} failed, nothing of it was committed: {message}")]
    BatchFailed { flow: String, batch: u64, message: String, retryable: bool },
    #[error("flow `{flow}`, batch {batch}: the commit to {table} failed: {message}")]
    CommitFailed { flow: String, batch: u64, table: String, message: String },
    #[error("flow `{flow}`: table {table}: {source}")]
    Delta { flow: String, table: String, source: Box<DeltaTableError> },
    #[error("coordination store: {0}")]
    Queue(#[from] QueueError),
    #[error("flow `{flow}`: not committing: {message}")]
    Fenced { flow: String, message: String, retryable: bool },
}

impl CoordinatorError {
    /// Whether running the pipeline again, unchanged, may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            CoordinatorError::Worker { source, .. } => source.is_retryable(),
            CoordinatorError::CommitFailed { .. }
            | CoordinatorError::Queue(_)
            | CoordinatorError::Checkpoint { .. } => true,
            CoordinatorError::Delta { .. } | CoordinatorError::SourceListing { .. } => true,
            CoordinatorError::BatchFailed { retryable, .. } => *retryable,
            CoordinatorError::SourceMissing { .. } | CoordinatorError::Schema { .. } => false,
            CoordinatorError::Storage { .. } => false,
            CoordinatorError::Source { .. } => false,
            CoordinatorError::DependentsSkipped { error, .. } => error.is_retryable(),
            CoordinatorError::Fenced { retryable, .. } => *retryable,
        }
    }
}
