//! The Sluice client: the `sluice` command line and the embedded runtime it
//! starts for `sluice run`.

pub mod cli;
pub mod embedded;
pub mod remote;
pub mod render;
