#!/usr/bin/env bash
# Keyward's load benchmark, one command:
#
#   bash e2e/bench.sh                      N = 100, 1000, 5000 (one namespace each)
#   bash e2e/bench.sh --smoke              N = 20, small fixture, about 2 minutes (CI); fails if
#                                          keys do not become Ready or a phase times out
#   bash e2e/bench.sh --n 100,1000         choose N
#   bash e2e/bench.sh --spread             also N = 5000 spread over 50 namespaces
#                                          (--spread-n N, --spread-ns K to change them)
#   bash e2e/bench.sh --memory-10k         also N = 10,000 (cold start, agents, idle memory only)
#   bash e2e/bench.sh --verifier           verifier reporting instead: N = 1,000 keys (--n to change),
#                                          then R `keyward verifier` replicas (--verifiers R, default 2,
#                                          as ServiceAccount keyward-system/keyward-verifier, ports
#                                          27480..) under an /auth load (-- --rps 500 --duration 60
#                                          --flood-keys 5 --flood-rps 2000 --flood-secs 20); reports
#                                          KeyUsageReport and Lease writes, watermark lag, latency, RSS
#   bash e2e/bench.sh full                every figure of issue "Faults of the control plane" in one run
#                                          per N (default N = 1000,10000; --n to change): the phases
#                                          above, then the verifier phase on the same keys (report lag
#                                          in the burst of N keys, R = --verifiers replicas), then API
#                                          server outages of 5, 30 and 120 s (--outages LIST; recovery:
#                                          the first reconcile and a backlog of 100 new keys), and a
#                                          table of the issue's goals against this run's figures
#   bash e2e/bench.sh soak                the soak (issue 20): N = 200 keys rotating every 60 s (floors
#                                          lowered by the operator's flags), 20 PolicyAgents x 2 pods,
#                                          2 verifier replicas (revokeWhenUnusedFor 20 s), for 60 min
#                                          (--minutes M, --n N); prints RSS, open watches, rotations
#                                          and violations every minute
#   options: --label TEXT (names the run in the table), --operator-bin PATH (measure another
#            build of keyward), --results FILE, --no-build, -- <extra keyward-bench arguments>
#            (e.g. -- --timeout-per-key 0.3 --idle 60; `keyward-bench --help` lists them)
#
# A memory guard protects the machine: when it has less than 4 GiB available, or kube-apiserver
# and etcd hold more than 8 GiB together (an overloaded API server buffers whole Secret lists),
# the driver kills the operator, reports what it measured so far and fails
# (-- --min-free-gib G --max-plane-gib G to change the limits).
#
# For each N it starts a plane of its own (never the shared one): KEYWARD_CLUSTER_DIR
# /tmp/keyward-bench, API port 27443, etcd 24790, controller-manager 27257, with the API server's
# audit log on (only the operator's ServiceAccount is audited), fresh for each N so runs do not
# affect each other, and stops it afterwards. It builds the release operator
# (CARGO_TARGET_DIR=$HOME/.cache/keyward/target-release) and the driver keyward-bench
# (e2e/testbed/src/bin/keyward-bench.rs), creates the operator's ServiceAccount, ClusterRole and
# binding, and runs `keyward run` (default flags; metrics and probes on ephemeral loopback ports,
# KEYWARD_METRICS_ADDRESS/KEYWARD_HEALTH_ADDRESS=127.0.0.1:0) with the ServiceAccount's token, so API
# Priority and Fairness applies to it as in a real cluster (an admin is exempt). The driver
# prints one Markdown table per run and appends it to /tmp/keyward-bench/results.md (and a JSON
# line to results.jsonl). What each figure means: docs/performance.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)

NS_LIST="100,1000,5000"
SMOKE=0
SPREAD=0
SPREAD_N=5000
SPREAD_NS=50
MEM10K=0
VERIFIER=0
VERIFIERS=2
SOAK=0
FULL=0
OUTAGES=5,30,120
MINUTES=60
N_GIVEN=0
LABEL=""
OPERATOR_BIN=""
RESULTS=""
BUILD=1
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    soak|--soak) SOAK=1; VERIFIER=1 ;;
    full|--full) FULL=1; VERIFIER=1 ;;
    --outages) OUTAGES=$2; shift ;;
    --minutes) MINUTES=$2; shift ;;
    --n) NS_LIST=$2; N_GIVEN=1; shift ;;
    --verifier) VERIFIER=1 ;;
    --verifiers) VERIFIER=1; VERIFIERS=$2; shift ;;
    --spread) SPREAD=1 ;;
    --spread-n) SPREAD=1; SPREAD_N=$2; shift ;;
    --spread-ns) SPREAD=1; SPREAD_NS=$2; shift ;;
    --memory-10k) MEM10K=1 ;;
    --label) LABEL=$2; shift ;;
    --operator-bin) OPERATOR_BIN=$2; shift ;;
    --results) RESULTS=$2; shift ;;
    --no-build) BUILD=0 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,48p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

export KEYWARD_CLUSTER_DIR=${KEYWARD_BENCH_DIR:-/tmp/keyward-bench}
export KEYWARD_API_PORT=${KEYWARD_BENCH_API_PORT:-27443}
export KEYWARD_ETCD_PORT=${KEYWARD_BENCH_ETCD_PORT:-24790}
export KEYWARD_KCM_PORT=${KEYWARD_BENCH_KCM_PORT:-27257}
DIR=$KEYWARD_CLUSTER_DIR
OPERATOR_USER=system:serviceaccount:keyward-system:keyward
VERIFIER_USER=system:serviceaccount:keyward-system:keyward-verifier
AUDIT_USERS=$OPERATOR_USER
if [ "$VERIFIER" = 1 ]; then
  AUDIT_USERS="$OPERATOR_USER,$VERIFIER_USER"
  [ "$N_GIVEN" = 1 ] || NS_LIST=1000
fi
if [ "$FULL" = 1 ] && [ "$N_GIVEN" = 0 ]; then NS_LIST=1000,10000; fi
TARGET=${KEYWARD_BENCH_TARGET:-$HOME/.cache/keyward/target-release}
RESULTS=${RESULTS:-$DIR/results.md}
mkdir -p "$DIR"

say() { printf '[bench.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
T0=$(date +%s)

if [ "$BUILD" = 1 ]; then
  say "building the release operator and the driver (CARGO_TARGET_DIR=$TARGET)"
  CARGO_TARGET_DIR=$TARGET cargo build --release --quiet --bin keyward
  CARGO_TARGET_DIR=$TARGET cargo build --release --quiet -p keyward-testbed --bin keyward-bench
fi
BENCH=$TARGET/release/keyward-bench
# A private copy: a concurrent `cargo build` cannot swap the measured binary in the middle of a run.
mkdir -p "$DIR/bin"
cp "${OPERATOR_BIN:-$TARGET/release/keyward}" "$DIR/bin/keyward"
OPERATOR=$DIR/bin/keyward
OP_SUM=$(sha256sum "$OPERATOR" | cut -c1-12)
LABEL=${LABEL:-$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)}
LABEL="$LABEL, keyward sha256 $OP_SUM"
say "operator under test: $OPERATOR ($LABEL)"

plane_down() { bash e2e/cluster.sh down >/dev/null 2>&1 || true; }
trap plane_down EXIT

# The operator's RBAC (what it reads and writes, nothing more), and a second ServiceAccount for
# the probe: GET one ConfigMap, create Secrets in the W namespace.
rbac() {
  kubectl apply -f - >/dev/null <<'YAML'
apiVersion: v1
kind: Namespace
metadata: {name: keyward-system}
---
apiVersion: v1
kind: Namespace
metadata: {name: bench-probe}
---
apiVersion: v1
kind: Namespace
metadata: {name: bench-w}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: keyward, namespace: keyward-system}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: bench-probe, namespace: keyward-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: keyward}
rules:
- apiGroups: [""]
  resources: [secrets, configmaps]
  verbs: [get, list, watch, create, patch, update, delete]
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create, patch]
- apiGroups: [keyward.dev]
  resources: [provisioningkeys, provisioningkeys/status, policyagents, policyagents/status]
  verbs: [get, list, watch, patch, update]
- apiGroups: [apps]
  resources: [deployments, statefulsets, daemonsets]
  verbs: [get, list, watch, patch]
- apiGroups: [apps]
  resources: [replicasets, controllerrevisions]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [get, list]
- apiGroups: [keyward.dev]
  resources: [keyusagereports]
  verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: keyward-verifier-leases, namespace: keyward-system}
rules: [{apiGroups: [coordination.k8s.io], resources: [leases], verbs: [list, watch]}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: keyward-verifier-leases, namespace: keyward-system}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: keyward-verifier-leases}
subjects: [{kind: ServiceAccount, name: keyward, namespace: keyward-system}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: keyward}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: keyward}
subjects: [{kind: ServiceAccount, name: keyward, namespace: keyward-system}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: bench-probe, namespace: bench-probe}
rules: [{apiGroups: [""], resources: [configmaps], verbs: [get]}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: bench-probe, namespace: bench-probe}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: bench-probe}
subjects: [{kind: ServiceAccount, name: bench-probe, namespace: keyward-system}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: bench-writer, namespace: bench-w}
rules: [{apiGroups: [""], resources: [secrets], verbs: [create]}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: bench-writer, namespace: bench-w}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: bench-writer}
subjects: [{kind: ServiceAccount, name: bench-probe, namespace: keyward-system}]
YAML
}

# The verifier's ServiceAccount, as the chart grants it: read keys and trust bundles, write its
# reports, create its Lease and get/update/patch only the Leases of replicas v-0 .. v-(R-1).
verifier_rbac() {
  local names="" i
  for i in $(seq 0 $(( VERIFIERS - 1 ))); do names="$names${names:+, }keyward-verifier-v-$i"; done
  kubectl apply -f - >/dev/null <<YAML
apiVersion: v1
kind: ServiceAccount
metadata: {name: keyward-verifier, namespace: keyward-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: keyward-verifier}
rules:
- apiGroups: [keyward.dev]
  resources: [provisioningkeys]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list, watch]
- apiGroups: [keyward.dev]
  resources: [keyusagereports]
  verbs: [get, create, patch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: keyward-verifier}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: keyward-verifier}
subjects: [{kind: ServiceAccount, name: keyward-verifier, namespace: keyward-system}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: keyward-verifier-lease, namespace: keyward-system}
rules:
- {apiGroups: [coordination.k8s.io], resources: [leases], verbs: [create]}
- {apiGroups: [coordination.k8s.io], resources: [leases], resourceNames: [$names], verbs: [get, update, patch]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: keyward-verifier-lease, namespace: keyward-system}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: keyward-verifier-lease}
subjects: [{kind: ServiceAccount, name: keyward-verifier, namespace: keyward-system}]
YAML
}

# A kubeconfig with a TokenRequest token of the ServiceAccount (what a pod gets), valid for
# 48 hours: longer than any soak.
sa_kubeconfig() { # sa file
  local token
  token=$(kubectl -n keyward-system create token "$1" --duration=48h) \
    || { say "error: no token for ServiceAccount $1"; return 1; }
  # Only the owner may read a file holding a token (a subshell: the script's umask stays).
  (umask 077; cat >"$2") <<KC
apiVersion: v1
kind: Config
clusters:
- name: bench
  cluster: {server: "https://127.0.0.1:$KEYWARD_API_PORT", certificate-authority: "$DIR/pki/ca.crt"}
users:
- name: $1
  user: {token: "$token"}
contexts:
- name: bench
  context: {cluster: bench, user: $1}
current-context: bench
KC
}

# One run on a fresh plane: run N NAMESPACES [driver args...]
STATUS=0
run() {
  local n=$1 namespaces=$2; shift 2
  local t0; t0=$(date +%s)
  say "== N=$n over $namespaces namespace(s): fresh plane"
  plane_down
  rm -f "$DIR/audit.log"
  # Exported: the outage phase restarts the API server with `e2e/cluster.sh apiserver-start`,
  # which must keep writing the same audit log.
  export KEYWARD_AUDIT_LOG=$DIR/audit.log KEYWARD_AUDIT_USERS=$AUDIT_USERS
  bash e2e/cluster.sh up
  # The plane's kubeconfig and its own kubectl first on PATH.
  eval "$(bash e2e/cluster.sh env)"
  rbac
  sa_kubeconfig keyward "$DIR/operator.kubeconfig"
  sa_kubeconfig bench-probe "$DIR/probe.kubeconfig"
  if [ "$VERIFIER" = 1 ]; then
    verifier_rbac
    sa_kubeconfig keyward-verifier "$DIR/verifier.kubeconfig"
  fi
  if ! "$BENCH" --n "$n" --namespaces "$namespaces" \
      --operator-bin "$OPERATOR" --operator-kubeconfig "$DIR/operator.kubeconfig" \
      --probe-kubeconfig "$DIR/probe.kubeconfig" --audit-log "$DIR/audit.log" \
      --operator-user "$OPERATOR_USER" --plane-dir "$DIR" --out "$DIR" --results "$RESULTS" --label "$LABEL" \
      "$@" ${EXTRA[@]+"${EXTRA[@]}"}; then
    STATUS=1
    say "N=$n FAILED (operator log: $DIR/operator-n$n.log)"
  fi
  plane_down
  say "== N=$n done in $(( $(date +%s) - t0 )) s"
}

# Everything below runs from one function, parsed whole before it starts: editing this file
# while a long benchmark runs cannot change what the running script executes.
main() {
  if [ "$SOAK" = 1 ]; then
    [ "$N_GIVEN" = 1 ] || NS_LIST=200
    run "$NS_LIST" 1 --soak-minutes "$MINUTES" --policy-agents 20 --replicas 2 \
      --verifiers "$VERIFIERS" --verifier-kubeconfig "$DIR/verifier.kubeconfig" \
      --verifier-user "$VERIFIER_USER"
  elif [ "$FULL" = 1 ]; then
    IFS=, read -r -a sizes <<<"$NS_LIST"
    for n in ${sizes[@]+"${sizes[@]}"}; do
      run "$n" 1 --reports --outages "$OUTAGES" --verifiers "$VERIFIERS" \
        --verifier-kubeconfig "$DIR/verifier.kubeconfig" --verifier-user "$VERIFIER_USER"
    done
  elif [ "$VERIFIER" = 1 ]; then
    IFS=, read -r -a sizes <<<"$NS_LIST"
    for n in ${sizes[@]+"${sizes[@]}"}; do
      run "$n" 1 --verifier --verifiers "$VERIFIERS" --verifier-kubeconfig "$DIR/verifier.kubeconfig" \
        --verifier-user "$VERIFIER_USER"
    done
  elif [ "$SMOKE" = 1 ]; then
    run 20 1 --unrelated 200 --w-sa 100 --policy-agents 4 --pa-keys 2 --herd 0 --idle 10
  else
    IFS=, read -r -a sizes <<<"$NS_LIST"
    for n in ${sizes[@]+"${sizes[@]}"}; do
      run "$n" 1
    done
    if [ "$SPREAD" = 1 ]; then
      run "$SPREAD_N" "$SPREAD_NS"
    fi
    if [ "$MEM10K" = 1 ]; then
      run 10000 1 --skip restart,rotation,herd
    fi
  fi
  say "all done in $(( $(date +%s) - T0 )) s; results: $RESULTS"
  exit $STATUS
}
main
