//! Shuffle stages on Ballista (in a cluster): each worker runs an executor
//! ([`executor`]), a task whose transform needs a shuffle is planned by its
//! worker and run on all of them ([`query`]), and Delta tables travel in those
//! plans as Sluice's own scan node ([`scan`]).

pub mod executor;
pub mod query;
pub mod scan;
