//! The contract between Sluice processes.
//!
//! - [`spec`]: the pipeline file (YAML) as users write it, and the validated
//!   [`spec::PipelineSpec`] every other crate works with.
//! - [`schema_ddl`]: SQL-DDL style schemas (`a STRING, b ARRAY<STRUCT<c BIGINT>>`).
//! - [`task`]: what a coordinator asks a worker to do and what the worker hands back.
//! - [`kv`]: the coordination store trait (leases, claims, the task queue) with an
//!   in-memory implementation; [`keys`] documents the key layout in one place.
//! - [`queue`]: the task queue protocol built on [`kv::KvStore`].
//! - [`timing`]: lease and heartbeat timings, derived from one TTL.
//! - [`storage`]: object-store options per location (`storage_options`).
//! - [`tls`]: client-side TLS settings (CA, client certificate) for gRPC and etcd.
//!
//! - [`pb`]: the gRPC API generated from `proto/sluice/v1/sluice.proto`.
//! - `etcd` (feature `etcd`): the etcd implementation of [`kv::KvStore`] and the
//!   leader election.
//!
//! Apart from the etcd adapter and reading TLS files, nothing in this crate
//! performs file or network I/O.

#![cfg_attr(test, allow(clippy::unwrap_used))]

#[cfg(feature = "etcd")]
pub mod etcd;
pub mod keys;
pub mod kv;
pub mod pb;
pub mod queue;
pub mod registry;
pub mod schema_ddl;
pub mod spec;
pub mod storage;
pub mod task;
pub mod timing;
pub mod tls;
