//! The `sluice` command line as a user meets it: help, validation errors, exit codes.
//! (Having an integration test here also makes `cargo test` build the binary
//! that the `tests/` crate drives.)

#![allow(clippy::unwrap_used)]

use std::process::Command;

fn sluice(dir: &std::path::Path, args: &[&str]) -> (Option<i32>, String, String) {
    let output =
        Command::new(env!("CARGO_BIN_EXE_sluice")).args(args).current_dir(dir).output().expect("sluice starts");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn help_lists_the_commands() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, _) = sluice(dir.path(), &["--help"]);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("run") && stdout.contains("validate"), "{stdout}");
}

#[test]
fn a_missing_pipeline_file_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, stderr) = sluice(dir.path(), &["run", "nope.yaml"]);
    assert_eq!(code, Some(2));
    assert!(stderr.starts_with("error: cannot read the pipeline file nope.yaml"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn an_invalid_pipeline_names_the_field_and_what_is_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = "pipeline: p\ncheckpoint: ./cp\nflows:\n  - name: f\n    source:\n      files: { path: ./in, format: xml }\n    sink: { table: ./t }\n";
    std::fs::write(dir.path().join("p.yaml"), yaml).unwrap();
    let (code, _, stderr) = sluice(dir.path(), &["run", "p.yaml"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("flows[0].source.files.format") && stderr.contains("`json`, `csv`, `parquet`"), "{stderr}");
}

#[test]
fn validate_checks_the_transform_sql() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = "pipeline: p\ncheckpoint: ./cp\nflows:\n  - name: f\n    source:\n      files: { path: ./in, format: json, schema: \"Id BIGINT, Name STRING\" }\n    transform: SELECT Id, Nmae FROM source\n    sink: { table: ./t }\n";
    std::fs::write(dir.path().join("p.yaml"), yaml).unwrap();
    let (code, _, stderr) = sluice(dir.path(), &["validate", "p.yaml"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("Nmae"), "{stderr}");

    std::fs::write(dir.path().join("p.yaml"), yaml.replace("Nmae", "Name, _metadata.file_name AS f")).unwrap();
    let (code, stdout, stderr) = sluice(dir.path(), &["validate", "p.yaml"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("output columns: Id Int64, Name Utf8, f Utf8"), "{stdout}");
}

#[test]
fn statements_other_than_queries_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = "pipeline: p\ncheckpoint: ./cp\nflows:\n  - name: f\n    source:\n      files: { path: ./in, format: json, schema: \"Id BIGINT\" }\n    transform: CREATE TABLE x AS SELECT * FROM source\n    sink: { table: ./t }\n";
    std::fs::write(dir.path().join("p.yaml"), yaml).unwrap();
    let (code, _, stderr) = sluice(dir.path(), &["validate", "p.yaml"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.to_lowercase().contains("not supported") || stderr.contains("DDL"), "{stderr}");
}
