#!/usr/bin/env bash
# Runs Sluice's tests: installs what they need when it is missing, then
# `cargo test --workspace` (extra arguments are passed on to it).
#
# - protoc (Debian `protobuf-compiler`): etcd-client's build script needs it.
# - etcd (Debian `etcd-server`, 3.4): the cluster tests start their own server
#   on a free loopback port with a temporary data directory.
# - kill (procps): the crash tests send SIGKILL, SIGSTOP and SIGTERM.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
command -v etcd >/dev/null 2>&1 || [ -x /usr/bin/etcd ] || missing+=(etcd-server)
command -v kill >/dev/null 2>&1 || [ -x /bin/kill ] || missing+=(procps)
if [ ${#missing[@]} -gt 0 ]; then
  echo "tests/run.sh: installing ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

exec cargo test --workspace "$@"
