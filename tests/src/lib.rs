//! Shared pieces of Sluice's integration tests and benchmark: the invoice data
//! generator ([`invoices`]) and a harness that runs the real `sluice` binary in
//! a scratch folder and reads Delta tables back ([`harness`]).

pub mod changes;
pub mod cluster;
pub mod harness;
pub mod invoices;
pub mod object_stores;
pub mod sales;
pub mod tls;
