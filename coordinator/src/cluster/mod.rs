//! The distributed runtime's coordinator: leader election ([`leader`]), the
//! leader's pipeline manager ([`manager`]), live status ([`status`]), the gRPC
//! API every coordinator serves ([`server`]), the Ballista scheduler for
//! shuffle stages ([`scheduler`]), and the `sluice-coordinator`
//! binary ([`cli`]). The key layout is documented in `sluice_proto::keys`.

pub mod auth;
pub mod cli;
pub mod leader;
pub mod manager;
pub mod scheduler;
pub mod server;
pub mod status;
