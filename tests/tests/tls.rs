//! TLS and credentials between the cluster's processes, with a real etcd and
//! real coordinator and worker processes: etcd over mutual TLS, the API over
//! TLS with its certificate rotated in place, the API requiring client
//! certificates, and etcd's own user and password authentication.

use std::path::Path;
use std::time::Duration;

use sluice_tests::cluster::{Cluster, Etcd, free_port, wait_for_health};
use sluice_tests::harness::{self, Sandbox, query_i64, txn_versions};
use sluice_tests::invoices::{invoice_pipeline, write_invoice_file};
use sluice_tests::tls::{Certs, path_str, replace_file};

/// `files` files of 50 invoices, one batch each.
fn sandbox_with_files(name: &str, files: u64) -> Sandbox {
    let sandbox = Sandbox::new();
    for n in 0..files {
        write_invoice_file(&sandbox.path(&format!("landing/f{n:03}.json")), 7, n * 50, 50).expect("write invoices");
    }
    sandbox.pipeline(&invoice_pipeline(name, "available_now", 1));
    sandbox
}

/// Runs the CLI against `url` with exactly `args` (no TLS settings from the environment).
fn cli(sandbox: &Sandbox, url: &str, args: &[&str]) -> harness::RunOutput {
    let mut command = sandbox.command(args);
    command.env("SLUICE_COORDINATOR", url);
    for name in ["SLUICE_CA_CERT", "SLUICE_CLIENT_CERT", "SLUICE_CLIENT_KEY", "SLUICE_TOKEN"] {
        command.env_remove(name);
    }
    command.output().expect("sluice starts").into()
}

fn etcd_tls_args(certs: &Certs) -> Vec<String> {
    [("--etcd-ca-cert", &certs.ca), ("--etcd-cert", &certs.client_cert), ("--etcd-key", &certs.client_key)]
        .into_iter()
        .flat_map(|(flag, path)| [flag.to_string(), path_str(path).to_string()])
        .collect()
}

fn assert_rows(table: &Path, rows: i64, batches: i64) {
    assert_eq!(query_i64(table, "SELECT COUNT(*) FROM t"), rows, "row count");
    assert_eq!(query_i64(table, r#"SELECT COUNT(DISTINCT "InvoiceNumber") FROM t"#), rows, "distinct invoices");
    assert_eq!(txn_versions(table), (1..=batches).collect::<Vec<_>>(), "each batch committed exactly once");
}

/// etcd requires client certificates; coordinator and worker present theirs.
/// The API is served over TLS: the CLI trusts it with `--ca-cert` and nothing
/// else. The certificate is then rotated in place to one from another CA: the
/// coordinator serves it without a restart, so the old CA no longer verifies
/// it and the new one does. Health stays probe-able without TLS on its own port.
#[test]
fn a_cluster_runs_over_tls_and_its_api_certificate_rotates_in_place() {
    let sandbox = sandbox_with_files("secured", 2);
    let first = Certs::generate(sandbox.dir.path(), "first-ca");
    let second = Certs::generate(sandbox.dir.path(), "second-ca");
    // The coordinator's own copy of its certificate, which the rotation replaces.
    let (cert, key) = (sandbox.path("serving/tls.crt"), sandbox.path("serving/tls.key"));
    std::fs::create_dir_all(sandbox.path("serving")).expect("a folder");
    replace_file(&first.server_cert, &cert);
    replace_file(&first.server_key, &key);

    let mut cluster = Cluster::with_etcd(Etcd::start_tls(&first), "3s");
    cluster.common_args = etcd_tls_args(&first);
    let health_port = free_port();
    let health = format!("127.0.0.1:{health_port}");
    cluster.start_coordinator_with(
        "",
        &["--tls-cert", path_str(&cert), "--tls-key", path_str(&key), "--health-listen", &health],
    );
    cluster.start_worker(2, "");
    let url = cluster.coordinator_urls[0].clone();
    assert!(url.starts_with("https://"), "{url}");
    wait_for_health(&format!("http://{health}"), "SERVING", Duration::from_secs(60));

    // Without the CA the server's certificate is not trusted; plain HTTP does not get through.
    let output = cli(&sandbox, &url, &["list"]);
    assert_eq!(output.code, Some(1), "{output:?}");
    assert!(output.stderr.contains("not signed by a CA this client trusts"), "{}", output.stderr);
    let output = cli(&sandbox, &url.replace("https://", "http://"), &["list"]);
    assert_ne!(output.code, Some(0), "{output:?}");
    assert!(output.stderr.contains("use an https:// address"), "{}", output.stderr);

    let ca = path_str(&first.ca);
    let output = cli(&sandbox, &url, &["--ca-cert", ca, "submit", "pipeline.yaml", "--wait"]);
    assert_eq!(output.code, Some(0), "{output:?}\n{}", cluster.logs());
    assert_rows(&sandbox.path("lake/bronze/invoices"), 100, 2);

    // Rotation: the new certificate and key land; the next connection uses them.
    std::thread::sleep(Duration::from_millis(20));
    replace_file(&second.server_key, &key);
    replace_file(&second.server_cert, &cert);
    let output = cli(&sandbox, &url, &["--ca-cert", ca, "list"]);
    assert_eq!(output.code, Some(1), "the first CA still verifies the rotated certificate: {output:?}");
    let output = cli(&sandbox, &url, &["--ca-cert", path_str(&second.ca), "list"]);
    assert_eq!(output.code, Some(0), "{output:?}\n{}", cluster.logs());
    assert!(output.stdout.contains("secured"), "{output:?}");
    assert!(cluster.coordinators[0].logged("TLS certificate reloaded"), "{}", cluster.logs());

    // A CA given for an http:// address is refused rather than ignored.
    let output = cli(&sandbox, "http://127.0.0.1:1", &["--ca-cert", ca, "list"]);
    assert_eq!(output.code, Some(2), "{output:?}");
    assert!(output.stderr.contains("not https://"), "{}", output.stderr);
}

/// etcd with authentication on: a worker with a wrong password stops at once
/// with an error that says so; with the right one the cluster runs. The API
/// requires client certificates (`--tls-client-ca`): the CLI without one is
/// turned away, with one it submits.
#[test]
fn etcd_credentials_are_checked_and_the_api_can_require_client_certificates() {
    let sandbox = sandbox_with_files("credentials", 1);
    let certs = Certs::generate(sandbox.dir.path(), "ca");
    let etcd = Etcd::start();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    runtime.block_on(async {
        let mut client = etcd_client::Client::connect([etcd.endpoint()], None).await.expect("connect to etcd");
        client.user_add("root", "root-password", None).await.expect("add root");
        client.user_grant_role("root", "root").await.expect("grant root");
        client.auth_enable().await.expect("enable authentication");
    });
    let mut cluster = Cluster::with_etcd(etcd, "3s");
    cluster.common_args = vec!["--etcd-user".into(), "root".into()];

    let mut refused = cluster.worker_command(1, 9);
    refused.env("SLUICE_ETCD_PASSWORD", "wrong-password");
    let output = refused.output().expect("the worker starts");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("etcd refused the user name or password"), "{stderr}");
    assert!(!stderr.contains("wrong-password"), "the password is printed: {stderr}");

    // The processes started from here on get the right password.
    cluster.common_args.extend(["--etcd-password".to_string(), "root-password".to_string()]);
    let (cert, key, client_ca) = (path_str(&certs.server_cert), path_str(&certs.server_key), path_str(&certs.ca));
    cluster.start_coordinator_with("", &["--tls-cert", cert, "--tls-key", key, "--tls-client-ca", client_ca]);
    cluster.start_worker(2, "");
    let url = cluster.coordinator_urls[0].clone();

    let output = cli(&sandbox, &url, &["--ca-cert", client_ca, "list"]);
    assert_eq!(output.code, Some(1), "a client without a certificate got in: {output:?}");
    assert!(output.stderr.contains("pass --client-cert and --client-key"), "{}", output.stderr);
    let with_cert = [
        "--ca-cert",
        client_ca,
        "--client-cert",
        path_str(&certs.client_cert),
        "--client-key",
        path_str(&certs.client_key),
    ];
    let mut args = with_cert.to_vec();
    args.extend(["submit", "pipeline.yaml", "--wait"]);
    let output = cli(&sandbox, &url, &args);
    assert_eq!(output.code, Some(0), "{output:?}\n{}", cluster.logs());
    assert_rows(&sandbox.path("lake/bronze/invoices"), 50, 1);
}
