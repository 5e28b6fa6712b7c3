#!/usr/bin/env bash
# Keyward's run command: the whole promise on the local control plane, with real OPA agents.
#
# Starts the local control plane (if it is not running), builds a real `opa` once from Debian's
# packages (e2e/opa.sh, cached), installs the CRDs, runs the operator, and runs the stand-in
# kubelet with a bundle server (cargo example `demo-bed`): every pod of examples/agents/ is a
# real `opa run --server` on its own loopback IP that downloads its bundle with the token of its
# mounted Secret. Then it applies examples/ and examples/agents/, waits until the agents are
# confirmed on the first key, rotates the key, and shows the roll, the confirmation on the new
# key and the revocation of the old one. Ctrl-C stops everything it started and deletes what it
# applied.
#
#   bash e2e/demo.sh                 # rotate again from another terminal:
#   eval "$(bash e2e/cluster.sh env)"
#   kubectl annotate pk opa-agents keyward.dev/rotate="$(date +%s)" --overwrite
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
target=${CARGO_TARGET_DIR:-target}
say() { printf '[demo %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
started=0
if ! bash e2e/cluster.sh ready; then
  bash e2e/cluster.sh up
  started=1
fi
eval "$(bash e2e/cluster.sh env)"
op_pid=""
bed_pid=""
stop() {
  if [ -n "$1" ] && kill -0 "$1" 2>/dev/null; then
    kill -INT "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
  fi
}
cleanup() {
  trap - INT TERM EXIT
  echo
  say "cleaning up"
  kubectl delete --ignore-not-found -f examples/agents/ -f examples/ >/dev/null 2>&1 || true
  stop "$bed_pid"
  stop "$op_pid"
  if [ "$started" = 1 ]; then bash e2e/cluster.sh down; fi
}
trap cleanup INT TERM EXIT

say "1/4 a real OPA (built once from Debian's packages, about 3 minutes; cached afterwards)"
bash e2e/opa.sh build
say "2/4 building keyward and the demo's kubelet (the first build takes several minutes; cargo shows its progress)"
cargo build --bin keyward --example demo-bed
say "3/4 installing CRDs, starting the operator and the stand-in kubelet"
kubectl apply -f crds/ >/dev/null
# Demo floors: short enough to watch a whole rotation in a minute.
"$target/debug/keyward" run --namespaces default \
  --min-rotation-interval 1m --min-min-interval 0s --min-overlap 0s \
  --metrics-address 127.0.0.1:0 --health-address 127.0.0.1:0 >/tmp/keyward-demo-operator.log 2>&1 &
op_pid=$!
"$target/debug/examples/demo-bed" default opa-agents bundle-service keyward &
bed_pid=$!
sleep 1
say "4/4 applying examples/ (the key) and examples/agents/ (3 OPA pods and their PolicyAgent); operator log: /tmp/keyward-demo-operator.log"
kubectl apply -f examples/ -f examples/agents/ >/dev/null
# The example's rollout.minInterval (5m) would hold the demo's roll for 5 minutes after the first
# one (the operator stamps the first key into the pod template): 10s here.
kubectl patch policyagent opa --type merge -p '{"spec":{"rollout":{"minInterval":"10s"}}}' >/dev/null
say "   (demo only: PolicyAgent opa's rollout.minInterval lowered from 5m to 10s)"

kid() { kubectl get pk opa-agents -o jsonpath='{.status.currentKey.kid}' 2>/dev/null; }
confirmed() { kubectl get policyagent opa -o jsonpath='{.status.confirmedKeyId}' 2>/dev/null; }
wait_until() { # description, timeout (s), command...
  local what=$1 t=$2; shift 2
  local end=$(($(date +%s) + t))
  until "$@"; do
    [ "$(date +%s)" -lt "$end" ] || { say "gave up waiting for: $what (see /tmp/keyward-demo-operator.log)"; return 1; }
    sleep 1
  done
}
first_confirmed() { k=$(kid) && [ -n "$k" ] && [ "$(confirmed)" = "$k" ]; }
if wait_until "the agents confirmed on the first key" 120 first_confirmed; then
  old=$(kid)
  say "the OPA agents are confirmed on key $old"
  say "ROTATE: kubectl annotate pk opa-agents keyward.dev/rotate=..."
  kubectl annotate pk opa-agents keyward.dev/rotate="demo-$(date +%s)" --overwrite >/dev/null
  new_current() { k=$(kid) && [ -n "$k" ] && [ "$k" != "$old" ]; }
  wait_until "a new key" 120 new_current && new=$(kid) && say "new key $new published, handed out; the Deployment rolls"
  new_confirmed() { [ "$(confirmed)" = "$new" ]; }
  wait_until "the agents confirmed on the new key" 180 new_confirmed && say "CONFIRMED: every OPA pod downloaded its bundle with $new"
  old_revoked() { kubectl get cm opa-agents-trust -o jsonpath='{.data.revoked\.json}' 2>/dev/null | grep -qF -- "$old"; }
  wait_until "the old key revoked" 120 old_revoked && say "REVOKED: $old is in the revoked list; the bundle server now refuses it"
  kubectl get pk,policyagent 2>/dev/null | sed 's/^/[demo] /'
fi
say "the operator (pid $op_pid) and the kubelet (pid $bed_pid) keep running; Ctrl-C stops them and cleans up."
say "rotate again from another terminal with:"
echo "         eval \"\$(bash e2e/cluster.sh env)\"; kubectl annotate pk opa-agents keyward.dev/rotate=\"\$(date +%s)\" --overwrite"
wait "$op_pid"
