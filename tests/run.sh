#!/usr/bin/env bash
# Runs Sluice's tests: installs what they need when it is missing, then
# `cargo test --workspace` (extra arguments are passed on to it).
#
# - protoc (Debian `protobuf-compiler`, with `libprotobuf-dev` for the
#   well-known types): etcd-client's build script needs it.
# - etcd (Debian `etcd-server`, 3.4): the cluster tests start their own server
#   on a free loopback port with a temporary data directory.
# - kill (procps): the crash tests send SIGKILL, SIGSTOP and SIGTERM.
# - openssl: the TLS tests make their own CA and certificates.
# - moto's S3 server (PyPI `moto[server]`), Azure's blob emulator (npm
#   `azurite`) and Azure's Python SDK (to create the emulator's containers):
#   the object-store tests start their own servers on free loopback ports.
# - kubectl (its built-in kustomize) and kubernetes-validate (PyPI): the
#   manifests in deploy/ are rendered and validated offline.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
# protoc's well-known types (google/protobuf/*.proto), which etcd-client's protos import.
[ -f /usr/include/google/protobuf/descriptor.proto ] || missing+=(libprotobuf-dev)
command -v kubectl >/dev/null 2>&1 || missing+=(kubernetes-client)
command -v etcd >/dev/null 2>&1 || [ -x /usr/bin/etcd ] || missing+=(etcd-server)
command -v kill >/dev/null 2>&1 || [ -x /bin/kill ] || missing+=(procps)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
if [ ${#missing[@]} -gt 0 ]; then
  echo "tests/run.sh: installing ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

python3 -c 'import azure.storage.blob, moto.server, kubernetes_validate' >/dev/null 2>&1 || {
  echo "tests/run.sh: installing moto[server], azure-storage-blob and kubernetes-validate from PyPI" >&2
  python3 -m pip install --quiet --disable-pip-version-check 'moto[server]' azure-storage-blob kubernetes-validate
}
command -v azurite-blob >/dev/null 2>&1 || {
  echo "tests/run.sh: installing azurite from the npm registry" >&2
  npm install --global --silent azurite
}

exec cargo test --workspace "$@"
