//! The Sluice worker: the data plane.
//!
//! A worker claims tasks from the coordination store ([`worker_loop`]), reads
//! the task's files ([`formats`]), runs the flow's transform over them with
//! DataFusion ([`transform`]), writes Parquet data files below the Delta table
//! and hands the resulting `Add` actions back ([`task_runner`]). It never
//! commits to a table: only the coordinator does.
//!
//! The coordinator also uses [`formats`] (schema inference), [`transform`]
//! (planning a flow's output schema) and [`storage`].

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod allocator;
#[cfg(feature = "cluster")]
pub mod ballista;
pub mod change_data;
pub mod chunks;
#[cfg(feature = "cluster")]
pub mod cluster_cli;
pub mod conform;
pub mod delta_source;
pub mod error;
pub mod exact_ints;
pub mod expectations;
pub mod failpoint;
pub mod formats;
pub mod history;
pub mod json_lines;
pub mod merge;
pub mod metadata;
pub mod quarantine;
pub mod rescue;
pub mod storage;
pub mod task_runner;
pub mod telemetry;
pub mod text;
#[cfg(feature = "cluster")]
pub mod tls;
pub mod transform;
pub mod watermark;
pub mod worker_loop;

pub use error::{ReadError, WorkerError};
