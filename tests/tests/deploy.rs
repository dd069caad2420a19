//! The Kubernetes manifests in `deploy/`, checked offline: each overlay renders
//! with `kubectl kustomize` and validates against the Kubernetes 1.30 schemas
//! with `kubernetes-validate --strict`; the settings they give the binaries are
//! settings the binaries have.

use std::path::{Path, PathBuf};
use std::process::Command;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn render(overlay: &str) -> String {
    let output = Command::new("kubectl")
        .arg("kustomize")
        .arg(deploy_dir().join("overlays").join(overlay))
        .output()
        .expect("kubectl runs (tests/run.sh installs it when missing)");
    assert!(output.status.success(), "kustomize {overlay}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).expect("UTF-8 manifests")
}

fn documents(rendered: &str) -> Vec<serde_json::Value> {
    rendered
        .split("\n---\n")
        .map(|doc| serde_yaml::from_str::<serde_json::Value>(doc).expect("a YAML document"))
        .collect()
}

fn find<'a>(docs: &'a [serde_json::Value], kind: &str, name: &str) -> &'a serde_json::Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

#[test]
fn every_overlay_renders_and_validates_against_the_kubernetes_schemas() {
    for overlay in ["dev", "production", "external-etcd", "production-tls"] {
        let rendered = render(overlay);
        let file = tempfile::NamedTempFile::new().expect("a temporary file");
        std::fs::write(file.path(), &rendered).expect("write");
        let output = Command::new("python3")
            .args(["-m", "kubernetes_validate", "--strict", "--quiet", "-k", "1.30.0"])
            .arg(file.path())
            .output()
            .expect("python3 runs");
        assert!(
            output.status.success(),
            "{overlay} does not validate:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let docs = documents(&rendered);
        let coordinator = find(&docs, "Deployment", "sluice-coordinator");
        assert_eq!(coordinator["spec"]["replicas"], 2, "{overlay}: two coordinators, one leading");
        let container = &coordinator["spec"]["template"]["spec"]["containers"][0];
        let env = container["env"].as_array().expect("env");
        let position = |name: &str| env.iter().position(|v| v["name"] == name);
        // $(POD_IP) expands only when POD_IP is defined earlier in the list.
        assert!(position("POD_IP") < position("SLUICE_ADVERTISE"), "{overlay}: POD_IP after its use");
        assert!(position("POD_IP") < position("SLUICE_BALLISTA_ADVERTISE"), "{overlay}: POD_IP after its use");
        let tls = overlay.ends_with("-tls");
        assert_eq!(position("SLUICE_TLS_CERT").is_some(), tls, "{overlay}: TLS on the API");
        // The kubelet's gRPC probes speak plain text: with TLS they go to the health-only port.
        let probe_port = if tls { 7072 } else { 7070 };
        assert_eq!(container["readinessProbe"]["grpc"]["port"], probe_port, "{overlay}");
        assert_eq!(container["livenessProbe"]["grpc"]["port"], probe_port, "{overlay}");
        assert_eq!(coordinator["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"], true);
        find(&docs, "PodDisruptionBudget", "sluice-coordinator");
        find(&docs, "HorizontalPodAutoscaler", "sluice-worker");
        let worker = find(&docs, "Deployment", "sluice-worker");
        let grace =
            worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"].as_u64().expect("a grace period");
        let env = &worker["spec"]["template"]["spec"]["containers"][0]["env"];
        let worker_position = |name: &str| env.as_array().and_then(|e| e.iter().position(|v| v["name"] == name));
        assert!(
            worker_position("POD_IP") < worker_position("SLUICE_BALLISTA_ADVERTISE"),
            "{overlay}: the worker's POD_IP after its use"
        );
        let drain = env
            .as_array()
            .and_then(|e| e.iter().find(|v| v["name"] == "SLUICE_DRAIN_TIMEOUT"))
            .expect("a drain timeout");
        let drain = humantime::parse_duration(drain["value"].as_str().expect("text")).expect("a duration").as_secs();
        assert!(drain < grace, "{overlay}: the drain ({drain}s) must end before the pod is killed ({grace}s)");
        let etcd = docs.iter().any(|d| d["kind"] == "StatefulSet" && d["metadata"]["name"] == "sluice-etcd");
        assert_eq!(etcd, overlay != "external-etcd", "{overlay}: its own etcd or an existing one");
        if etcd {
            assert_eq!(find(&docs, "StatefulSet", "sluice-etcd")["spec"]["replicas"], 3);
        }
    }
}

/// Every `SLUICE_*` setting the manifests give a process is one its `--help` lists.
#[test]
fn the_manifests_set_only_settings_the_binaries_have() {
    let bin_dir = sluice_tests::harness::sluice_bin().parent().expect("a folder").to_path_buf();
    let help = |name: &str| {
        let output = Command::new(bin_dir.join(format!("{name}-under-test")))
            .arg("--help")
            .output()
            .unwrap_or_else(|e| panic!("{name}-under-test --help: {e}"));
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let (coordinator, worker) = (help("sluice-coordinator"), help("sluice-worker"));
    let docs = documents(&render("production-tls"));
    let config = &find(&docs, "ConfigMap", "sluice-config")["data"];
    for key in config.as_object().expect("a map").keys() {
        for (name, help) in [("sluice-coordinator", &coordinator), ("sluice-worker", &worker)] {
            assert!(help.contains(&format!("env: {key}")), "{name} has no setting {key}:\n{help}");
        }
    }
    for (deployment, help) in [("sluice-coordinator", &coordinator), ("sluice-worker", &worker)] {
        let env = &find(&docs, "Deployment", deployment)["spec"]["template"]["spec"]["containers"][0]["env"];
        for var in env.as_array().expect("env") {
            let key = var["name"].as_str().expect("a name");
            if key.starts_with("SLUICE_") {
                assert!(help.contains(&format!("env: {key}")), "{deployment} has no setting {key}");
            }
        }
    }
    // The KEDA example is well-formed YAML naming the worker Deployment.
    let keda: serde_json::Value = serde_yaml::from_str(
        &std::fs::read_to_string(deploy_dir().join("examples/keda-scaledobject.yaml")).expect("the example"),
    )
    .expect("YAML");
    assert_eq!(keda["spec"]["scaleTargetRef"]["name"], "sluice-worker");
}
