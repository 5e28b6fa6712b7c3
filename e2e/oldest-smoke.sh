#!/usr/bin/env bash
# The end-to-end smoke on the oldest Kubernetes release Keyward claims (README, Chart.yaml's
# kubeVersion), built by the same plane builder as CI's newest (e2e/cluster.sh) from the pins in
# e2e/plane/oldest/go.mod. Outside CI: the first run builds a second plane (10-20 minutes on 2
# cores when nothing is cached). Runs on its own ports and state directory, so a developer's
# plane can keep running.
#
#   bash e2e/oldest-smoke.sh            the smoke: CRDs and CEL rules on the server, the
#                                       operator's smoke tests, and the end-to-end rotations
#                                       with real OPA agents
#   bash e2e/oldest-smoke.sh -- ARGS    other `cargo test` arguments instead
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
say() { printf '[oldest %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
export KEYWARD_PLANE_MODULE=$PWD/e2e/plane/oldest
export KEYWARD_CLUSTER_DIR=${KEYWARD_OLDEST_DIR:-/tmp/keyward-oldest-cluster}
export KEYWARD_API_PORT=${KEYWARD_OLDEST_API_PORT:-46443}
export KEYWARD_ETCD_PORT=${KEYWARD_OLDEST_ETCD_PORT:-43790}
export KEYWARD_KCM_PORT=${KEYWARD_OLDEST_KCM_PORT:-46257}
custom=0
if [ "${1:-}" = "--" ]; then shift; custom=1; args=("$@"); fi
bash e2e/opa.sh build
bash e2e/cluster.sh down >/dev/null 2>&1 || true
bash e2e/cluster.sh up
trap 'bash e2e/cluster.sh down' EXIT
eval "$(bash e2e/cluster.sh env)"
bash e2e/cluster.sh status
t0=$(date +%s)
if [ "$custom" = 1 ]; then
  cargo test "${args[@]}"
else
  # The CEL rules and the test bed's smoke tests (modules `cel` and `smoke` of the `plane` test
  # binary: a filter would also apply to e2e's names, hence two runs), then the end-to-end rotations.
  cargo test --features fault-injection --test plane -- cel:: smoke::
  cargo test --features fault-injection --test e2e
fi
say "oldest-version smoke passed on $(kubectl version -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])') in $(( $(date +%s) - t0 )) s"
