#!/usr/bin/env bash
# Keyward's run command on the embedded default: starts the local control plane (if it is not
# running), installs the CRDs, runs the operator and applies examples/. Watch a key being minted,
# rotate it from another terminal, and press Ctrl-C: everything this script started is stopped
# and what it applied is deleted.
#
#   bash e2e/demo.sh            # then, in another terminal:
#   eval "$(bash e2e/cluster.sh env)"
#   kubectl annotate pk opa-agents keyward.dev/rotate="$(date +%s)" --overwrite
#   kubectl get pk,secret,cm -l app.kubernetes.io/managed-by=keyward
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
started=0
if ! bash e2e/cluster.sh ready; then
  bash e2e/cluster.sh up
  started=1
fi
eval "$(bash e2e/cluster.sh env)"
op_pid=""
cleanup() {
  trap - INT TERM EXIT
  echo
  echo "[demo] cleaning up"
  kubectl delete --ignore-not-found -f examples/ >/dev/null 2>&1 || true
  if [ -n "$op_pid" ] && kill -0 "$op_pid" 2>/dev/null; then
    kill -TERM "$op_pid" 2>/dev/null || true
    wait "$op_pid" 2>/dev/null || true
  fi
  if [ "$started" = 1 ]; then bash e2e/cluster.sh down; fi
}
trap cleanup INT TERM EXIT

echo "[demo] building keyward"
cargo build --quiet --bin keyward
echo "[demo] installing CRDs"
kubectl apply --validate=false -f crds/ >/dev/null 2>&1
# Demo floors: short enough to watch a whole rotation in a minute.
./target/debug/keyward run --namespaces default \
  --min-rotation-interval 1m --min-min-interval 0s --min-overlap 0s \
  --metrics-address 127.0.0.1:0 --health-address 127.0.0.1:0 &
op_pid=$!
sleep 1
echo "[demo] applying examples/"
kubectl apply -f examples/ 2>/dev/null
echo "[demo] the operator runs (pid $op_pid); Ctrl-C stops it and cleans up."
echo "[demo] rotate from another terminal with:"
echo "         eval \"\$(bash e2e/cluster.sh env)\"; kubectl annotate pk opa-agents keyward.dev/rotate=\"\$(date +%s)\" --overwrite"
last=""
while kill -0 "$op_pid" 2>/dev/null; do
  sleep 2
  # Keys (ready, phase, key id) and the objects Keyward manages; printed when they change.
  now=$(kubectl get pk -o custom-columns=NAME:.metadata.name,READY:.status.conditions[0].status,PHASE:.status.phase,KEY:.status.currentKey.kid 2>/dev/null
    kubectl get secret,cm -l app.kubernetes.io/managed-by=keyward -o name 2>/dev/null)
  if [ "$now" != "$last" ]; then
    sed 's/^/[demo] /' <<<"$now"
    last=$now
  fi
done
