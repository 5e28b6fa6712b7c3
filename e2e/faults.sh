#!/usr/bin/env bash
# The fault suite (e2e/faults.rs) on a plane of its own: its scenarios SIGSTOP, kill and restart
# the API server, compact etcd, delete the CRDs and throttle the operator with API Priority and
# Fairness, so they never run on the plane other tests use.
#
#   bash e2e/faults.sh            the short form (CI): each scenario once, 10 s outages, 3
#                                 rotations under random SIGKILLs; a few minutes warm
#   bash e2e/faults.sh --long     the long form: 30 s outages, 50 rotations under SIGKILLs
#   bash e2e/faults.sh -- <filter> [cargo test args]   only some scenarios
#
# Settings (environment): KEYWARD_FAULTS_DIR (the plane's state directory)
# [/tmp/keyward-faults-cluster], KEYWARD_FAULTS_API_PORT / _ETCD_PORT / _KCM_PORT [29443 /
# 25890 / 29257], KEYWARD_FAULTS_OUTAGE_SECS (overrides the outage), KEYWARD_FAULTS_SEED (the
# SIGKILL scenario's seed, printed by each run). Installs libfaketime (the clock scenario) from
# Debian when it is missing. Stops the plane it started, even when a scenario fails.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
say() { printf '[faults %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

export KEYWARD_FAULTS_LONG=0
if [ "${1:-}" = --long ]; then KEYWARD_FAULTS_LONG=1; shift; fi
[ "${1:-}" = -- ] && shift

export KEYWARD_CLUSTER_DIR=${KEYWARD_FAULTS_DIR:-/tmp/keyward-faults-cluster}
export KEYWARD_API_PORT=${KEYWARD_FAULTS_API_PORT:-29443}
export KEYWARD_ETCD_PORT=${KEYWARD_FAULTS_ETCD_PORT:-25890}
export KEYWARD_KCM_PORT=${KEYWARD_FAULTS_KCM_PORT:-29257}
export KEYWARD_FAULTS_PLANE=$KEYWARD_CLUSTER_DIR

lib=$(find /usr/lib -name libfaketime.so.1 -path '*faketime*' 2>/dev/null | head -n1 || true)
if [ -z "$lib" ]; then
  say "installing libfaketime from Debian (the clock scenario)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq >/dev/null || $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends libfaketime >/dev/null
  lib=$(find /usr/lib -name libfaketime.so.1 -path '*faketime*' 2>/dev/null | head -n1 || true)
fi
[ -n "$lib" ] || { say "error: no libfaketime.so.1 after apt-get install libfaketime"; exit 1; }
export KEYWARD_LIBFAKETIME=$lib

say "building the fault suite"
cargo test --features fault-injection --test faults --no-run 2>&1 | grep -v '^ *\(Compiling\|Running\|Executable\)' >&2 || true

bash e2e/cluster.sh down >/dev/null 2>&1 || true
bash e2e/cluster.sh up
trap 'bash e2e/cluster.sh down' EXIT
eval "$(bash e2e/cluster.sh env)"

say "the scenarios (form: $([ "$KEYWARD_FAULTS_LONG" = 1 ] && echo long || echo short)); one at a time: they share the plane they break"
t0=$(date +%s)
# The bed's own components log errors only (an outage makes every watch fail); the operator
# processes keep their logs in files, shown when a scenario fails.
export RUST_LOG=${RUST_LOG:-error,kube_client=off}
cargo test --features fault-injection --test faults -- --ignored --test-threads=1 --nocapture "$@"
say "fault suite passed in $(( $(date +%s) - t0 )) s"
