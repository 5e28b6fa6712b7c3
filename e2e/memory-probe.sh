#!/usr/bin/env bash
# The operator's memory as a base plus a cost per key, on the developer's plane (e2e/cluster.sh up),
# with nothing else in its namespace: no PolicyAgents, no pods, no unrelated Secrets (for those, the
# benchmark's fixture: bash e2e/bench.sh). One command per point:
#
#   bash e2e/memory-probe.sh <keyward binary> <N> [VAR=value ...]
#
# starts `<binary> run --namespaces <a new namespace>` (the environment assignments go to it, e.g.
# MALLOC_ARENA_MAX=1), waits 6 s, takes the median VmRSS over 5 s (the base: watches open, nothing
# to manage), creates N ProvisioningKeys in one `kubectl apply`, waits until all have a current
# key, waits 15 s, takes the median over 10 s (steady), stops the operator and deletes the
# namespace. Prints one line: base and steady RSS with their anonymous and file-backed parts
# (RssAnon, RssFile: the binary's own pages), VmHWM, (steady - base) / N, and the time to Ready.
# The cost per key without the code paged in by the first reconciles is the slope between two
# runs: (steady(N2) - steady(N1)) / (N2 - N1). docs/performance.md has the figures.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 <keyward binary> <N> [VAR=value ...]" >&2; exit 2; }
BIN=$1 N=$2
shift 2
cd "$(dirname "${BASH_SOURCE[0]}")/.."
eval "$(bash e2e/cluster.sh env)"
ns=kw-memory-$RANDOM
kubectl create namespace "$ns" >/dev/null
pid=""
log=$(mktemp "${TMPDIR:-/tmp}/keyward-memory.XXXXXX")
manifest=$(mktemp "${TMPDIR:-/tmp}/keyward-memory.XXXXXX")
# Whatever happens (a failed apply, Ctrl-C), the operator is stopped and the namespace goes.
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -f "$manifest"
  kubectl delete namespace "$ns" --wait=false >/dev/null 2>&1 || true
}
trap cleanup EXIT
env "$@" KEYWARD_METRICS_ADDRESS=127.0.0.1:0 KEYWARD_HEALTH_ADDRESS=127.0.0.1:0 \
  "$BIN" run --namespaces "$ns" >"$log" 2>&1 &
pid=$!
field() { awk -v f="$1:" '$1 == f { printf "%.1f", $2 / 1024 }' "/proc/$pid/status"; }
median() { # samples VmRSS once a second for $1 s
  for _ in $(seq 1 "$1"); do field VmRSS; echo; sleep 1; done | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'
}
sleep 6
kill -0 "$pid" 2>/dev/null || { echo "the operator exited; log: $log" >&2; exit 1; }
base=$(median 5) base_anon=$(field RssAnon) base_file=$(field RssFile)
for i in $(seq 0 $((N - 1))); do
  printf -- '---\napiVersion: keyward.dev/v1alpha1\nkind: ProvisioningKey\nmetadata: {name: k%d, namespace: %s}\nspec: {rotation: {publishDelay: 2s, overlap: 1m}}\n' "$i" "$ns"
done >"$manifest"
t0=$(date +%s.%N)
kubectl apply -f "$manifest" >/dev/null
while [ "$(kubectl get provisioningkeys -n "$ns" -o jsonpath='{range .items[*]}{.status.currentKey.kid}{"\n"}{end}' | grep -c . || true)" -lt "$N" ]; do
  kill -0 "$pid" 2>/dev/null || { echo "the operator exited; log: $log" >&2; exit 1; }
  sleep 2
done
t1=$(date +%s.%N)
sleep 15
steady=$(median 10) anon=$(field RssAnon) file=$(field RssFile) hwm=$(field VmHWM)
kill "$pid"
wait "$pid" || true
pid=""
rm -f "$log"
echo "binary=$BIN env=[$*] base=${base} MiB (anon $base_anon, file $base_file) N=$N steady=${steady} MiB (anon $anon, file $file) VmHWM=${hwm} MiB (steady-base)/N=$(awk -v s="$steady" -v b="$base" -v n="$N" 'BEGIN { printf "%.1f", (s - b) * 1024 / n }') KiB ready_in=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s"
