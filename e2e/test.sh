#!/usr/bin/env bash
# Keyward's test command: every layer (unit, real-apiserver integration in tests/, end-to-end
# scenarios in e2e/) against the local control plane. On a fresh machine it sets up everything
# its tests need first: the plane (Kubernetes and etcd built from e2e/plane/go.mod, cached), a
# real OPA (e2e/opa.sh, cached) and Debian's nginx. Starts the plane if it is not running and
# stops it again afterwards (only if this script started it). Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
say() { printf '[test %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

say "a real OPA for the end-to-end scenarios (built once from Debian's packages, cached)"
bash e2e/opa.sh build
# Named explicitly: the testbed's fallback path is compiled in, and a build cached from another
# checkout location would look for e2e/opa.sh there.
KEYWARD_OPA=$(bash e2e/opa.sh path)
export KEYWARD_OPA
say "Debian's nginx (the end-to-end control plane: auth_request to keyward verifier)"
export PATH=$PATH:/usr/sbin
if ! command -v nginx >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq >/dev/null || $SUDO apt-get update -qq >/dev/null
  # Only the binary is used: the tests start their own nginx with their own config and prefix.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends nginx-light >/dev/null
fi
command -v nginx >/dev/null || { say "error: nginx is still missing after apt-get install nginx-light"; exit 1; }

started=0
if ! bash e2e/cluster.sh ready; then
  bash e2e/cluster.sh up
  started=1
fi
cleanup() { if [ "$started" = 1 ]; then bash e2e/cluster.sh down; fi; }
trap cleanup EXIT
# The plane's kubeconfig, and its own kubectl first on PATH.
eval "$(bash e2e/cluster.sh env)"
say "kubectl $(kubectl version --client -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])') against $(kubectl version -o json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])')"
# CRDs may have changed since the plane started.
kubectl apply -f crds/ >/dev/null
# Test threads per binary (libtest's default is one per core): the tests mostly wait on the API
# server, OPA and nginx. In the `plane` binary (tests/plane/) at most KEYWARD_PLANE_TESTS (default
# 4) of them use the plane at once, whatever this is.
export RUST_TEST_THREADS=${RUST_TEST_THREADS:-6}
# --no-fail-fast: one failing test binary does not hide the results of the others.
# The output is also kept in a file: when a test fails, its panic messages are printed again
# at the very end, where a CI log cut to its head and tail still shows them.
log=$(mktemp "${TMPDIR:-/tmp}/keyward-test.XXXXXX")
status=0
cargo test --workspace --features fault-injection --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
if [ "$status" != 0 ]; then
  say "failed (exit $status); each failing test's panic, again:"
  grep -E -A3 "^thread '.*' .*panicked at " "$log" | grep -v -E "^(stack backtrace:|note: )" | cut -c1-400 >&2 || true
fi
rm -f "$log"
exit "$status"
