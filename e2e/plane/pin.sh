#!/usr/bin/env bash
# Writes the Go module that pins a plane: k8s.io/kubernetes at K8S_VERSION with every staging
# module (the `replace` block of that release's own go.mod) mapped to its published twin
# (v1.37.2 -> v0.37.2), etcd's server and etcdctl at ETCD_VERSION, then `go mod tidy` fills
# go.sum. Used to move e2e/plane to a new release and to make e2e/plane/oldest.
#
#   bash e2e/plane/pin.sh 1.37.2 3.7.0 e2e/plane
#   bash e2e/plane/pin.sh 1.34.4 3.6.4 e2e/plane/oldest
set -euo pipefail
[ $# -eq 3 ] || { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
k8s=${1#v} etcd=${2#v} dir=$3
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${KEYWARD_CACHE:-$HOME/.cache/keyward}
export GOTOOLCHAIN=${GOTOOLCHAIN:-local} GOMODCACHE=$CACHE/go/mod GOCACHE=$CACHE/go/build GOFLAGS=-mod=mod
mkdir -p "$dir/etcd"
dir=$(cd "$dir" && pwd)
upstream=$(go mod download -json "k8s.io/kubernetes@v$k8s" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
go_line=$(awk '/^go /{print $2; exit}' "$upstream")
staging=$(sed -n '/^replace (/,/^)/p' "$upstream" | awk '$2 == "=>" && $3 ~ /^\.\/staging\// {print $1}')
[ -n "$staging" ] || { echo "no staging modules in the replace block of k8s.io/kubernetes v$k8s" >&2; exit 1; }
{
  echo "// The local control plane of Keyward's tests: Kubernetes and etcd, built from their Go modules"
  echo "// by e2e/cluster.sh. Written by e2e/plane/pin.sh $k8s $etcd; k8s.io/kubernetes requires its"
  echo "// staging modules at v0.0.0, each mapped here to the same release's published version."
  echo "module keyward.dev/e2e/plane"
  echo
  echo "go $go_line"
  echo
  # The release's own GODEBUG defaults (a main module's go.mod decides them, not a dependency's).
  if grep -q '^godebug' "$upstream"; then grep '^godebug' "$upstream"; echo; fi
  echo "require ("
  echo "	go.etcd.io/etcd/etcdctl/v3 v$etcd"
  echo "	go.etcd.io/etcd/server/v3 v$etcd"
  echo "	k8s.io/kubernetes v$k8s"
  echo ")"
  echo
  echo "replace ("
  for m in $staging; do printf '\t%s => %s v0.%s\n' "$m" "$m" "${k8s#*.}"; done
  echo ")"
} >"$dir/go.mod"
[ "$dir" = "$HERE" ] || { cp "$HERE/etcd/main.go" "$dir/etcd/main.go"; cp "$HERE/tools.go" "$dir/tools.go"; }
(cd "$dir" && go mod tidy)
echo "pinned k8s.io/kubernetes v$k8s and etcd v$etcd in $dir/go.mod" >&2
