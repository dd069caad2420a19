//! The Sluice client: the `sluice` command line and the embedded runtime it
//! starts for `sluice run`.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod cli;
pub mod embedded;
pub mod remote;
pub mod render;
