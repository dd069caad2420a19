//! The Sluice coordinator: the control plane, and the only role that commits.
//!
//! For each flow it discovers new source files ([`discovery`]), fixes the next
//! micro-batch in the pipeline's checkpoint before any task runs
//! ([`checkpoint`], [`planner`]), hands the batch's tasks to workers through the
//! task queue, and commits their data files in one Delta commit carrying the
//! flow's `txn` action ([`commit`]). [`flow_runner`] ties these together and
//! [`pipeline_runner`] runs all flows of a pipeline on its trigger. The
//! protocol is described in `docs/DESIGN.md`.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod checkpoint;
#[cfg(feature = "cluster")]
pub mod cluster;
pub mod commit;
pub mod delta_flow;
pub mod discovery;
pub mod error;
pub mod event_log;
pub mod flow_runner;
pub mod pipeline_runner;
pub mod planner;
pub mod progress;
pub mod table_schema;
pub mod watermark_files;

pub use error::CoordinatorError;
