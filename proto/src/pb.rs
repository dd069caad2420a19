//! The gRPC API (`proto/sluice/v1/sluice.proto`): messages, client and server.
//! The code is generated ahead of time into `src/gen/` (see `tests/generated.rs`).

#[allow(clippy::all, clippy::pedantic, missing_docs, unused_qualifications)]
pub mod v1 {
    include!("gen/sluice.v1.rs");

    /// The encoded file descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!("gen/sluice_v1_descriptor.bin");
}
