//! The gRPC code under `src/gen/` is generated from `proto/` ahead of time, so
//! that building Sluice needs no protoc. This test regenerates it and fails if
//! the checked-in copy is stale; with `SLUICE_REGENERATE=1` it updates the copy.

use std::path::Path;

const FILES: [&str; 2] = ["sluice.v1.rs", "sluice_v1_descriptor.bin"];

#[test]
fn generated_code_is_current() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tempfile::tempdir().expect("temporary directory");
    tonic_prost_build::configure()
        .out_dir(out.path())
        .file_descriptor_set_path(out.path().join(FILES[1]))
        .compile_protos(&[root.join("proto/sluice/v1/sluice.proto")], &[root.join("proto")])
        .expect("protoc compiles proto/sluice/v1/sluice.proto (is protoc installed?)");
    let regenerate = std::env::var_os("SLUICE_REGENERATE").is_some();
    for name in FILES {
        let fresh = std::fs::read(out.path().join(name)).expect("generated file");
        let checked_in = root.join("src/gen").join(name);
        if regenerate {
            std::fs::write(&checked_in, &fresh).expect("write generated code");
            continue;
        }
        let current = std::fs::read(&checked_in).unwrap_or_default();
        assert!(
            current == fresh,
            "{} is stale: run `SLUICE_REGENERATE=1 cargo test --workspace -p sluice-proto generated` and commit it",
            checked_in.display()
        );
    }
}
