#!/usr/bin/env bash
# Keyward's test command: every layer (unit, real-apiserver integration in tests/, end-to-end
# scenarios in e2e/) against the local control plane. Starts the plane if it is not running and
# stops it again afterwards (only if this script started it). Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
started=0
if ! bash e2e/cluster.sh ready; then
  bash e2e/cluster.sh up
  started=1
fi
cleanup() { if [ "$started" = 1 ]; then bash e2e/cluster.sh down; fi; }
trap cleanup EXIT
eval "$(bash e2e/cluster.sh env)"
# CRDs may have changed since the plane started.
kubectl apply --validate=false -f crds/ >/dev/null 2>&1
cargo test --workspace --features fault-injection "$@"
