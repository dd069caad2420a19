//! Errors of the data plane.

use deltalake::DeltaTableError;

/// A source file that could not be read or decoded. Names the file and, where
/// known, the line.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{file}{}: {message}", line.map(|l| format!(": line {l}")).unwrap_or_default())]
pub struct ReadError {
    pub file: String,
    pub line: Option<u64>,
    pub message: String,
    /// True for transient storage errors; false for content that is bad as it is.
    pub retryable: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("transform failed: {0}")]
    Transform(String),
    /// A query on the cluster's Ballista executors failed while it ran (an
    /// executor lost, the scheduler unreachable); running it again may succeed.
    #[error("the query on Ballista failed: {0}")]
    Query(String),
    #[error("writing data files failed: {0}")]
    Write(#[from] DeltaTableError),
    #[error("storage: {0}")]
    Storage(#[from] object_store::Error),
    /// A location that cannot be used: an unsupported scheme, a malformed URL, a folder that cannot be created.
    #[error("{0}")]
    Location(String),
    #[error("the row produced by the transform does not fit the table: {0}")]
    Schema(String),
    #[error(transparent)]
    Queue(#[from] sluice_proto::queue::QueueError),
    #[error("the task was cancelled")]
    Cancelled,
    /// A panic while running the task.
    #[error("the task hit a bug in Sluice (please report it): {0}")]
    Bug(String),
    /// An expectation set to `fail` failed.
    #[error("{0}")]
    Expectation(String),
    /// The files hold columns the schema lacks, which the flow adds.
    #[error("{}: new column(s) {}; the schema evolves and the task runs again", .0.file, .0.columns.join(", "))]
    NewColumns(Box<sluice_proto::task::NewColumns>),
}

impl WorkerError {
    /// Whether running the same task again may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            WorkerError::Read(e) => e.retryable,
            WorkerError::Write(_)
            | WorkerError::Storage(_)
            | WorkerError::Queue(_)
            | WorkerError::Query(_)
            | WorkerError::Cancelled => true,
            WorkerError::Transform(_)
            | WorkerError::Location(_)
            | WorkerError::Schema(_)
            | WorkerError::Expectation(_)
            | WorkerError::NewColumns(_)
            | WorkerError::Bug(_) => false,
        }
    }
}
