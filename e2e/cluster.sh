#!/usr/bin/env bash
# Keyward's local Kubernetes control plane: etcd + kube-apiserver + kube-controller-manager on
# 127.0.0.1, built once from their Go modules (e2e/plane/go.mod pins k8s.io/kubernetes and
# go.etcd.io/etcd; kubectl and etcdctl come from the same pins) and cached.
#
#   e2e/cluster.sh up       install what is missing, build once (cached), start the plane
#   e2e/cluster.sh down     stop exactly the processes `up` started (by PID)
#   e2e/cluster.sh env      print `export KUBECONFIG=... PATH=<the plane's kubectl first>:...`
#   e2e/cluster.sh status   show the processes, whether the API server is ready, and the client
#                           and server versions actually used
#   e2e/cluster.sh bin      print the directory of the cached binaries (and manifest.txt)
#   e2e/cluster.sh ready    exit 0 if the API server answers /readyz, 1 otherwise (quiet)
#   e2e/cluster.sh build    only install packages and build/cache the binaries
#   e2e/cluster.sh apiserver-kill   SIGKILL the API server (faults: e2e/faults.sh)
#   e2e/cluster.sh apiserver-start  start it again with the same flags, wait until ready
#   e2e/cluster.sh etcd-compact     compact etcd at its current revision (prints it): every
#                           watch resumed after an API server restart then gets 410 Gone
#
# Settings (environment):
#   KEYWARD_CLUSTER_DIR   state directory (PKI, kubeconfig, logs, pids)  [/tmp/keyward-cluster]
#   KEYWARD_CACHE         cache for the built binaries, GOMODCACHE and GOCACHE [~/.cache/keyward]
#   KEYWARD_PLANE_MODULE  the Go module that pins the plane's versions  [<repo>/e2e/plane]
#                         (e2e/oldest-smoke.sh points it at the oldest supported release)
#   KEYWARD_API_PORT      kube-apiserver secure port                     [26443]
#   KEYWARD_ETCD_PORT     etcd client port (peer port is +1)             [23790]
#   KEYWARD_KCM_PORT      kube-controller-manager secure port            [26257]
#   KEYWARD_CRDS          directory of CRDs installed before the controller-manager starts [<repo>/crds]
#   KEYWARD_AUDIT_LOG     opt-in: the API server writes its audit log (JSON lines, Metadata level,
#                         RequestReceived stage omitted) to this file (used by e2e/bench.sh) [off]
#   KEYWARD_AUDIT_USERS   with KEYWARD_AUDIT_LOG: audit only these users (comma-separated)  [all]
#   KEYWARD_APISERVER_EXTRA_ARGS  opt-in: more kube-apiserver flags, split on whitespace (no
#                         quoting), appended to its command line by `up` and `apiserver-start`;
#                         e.g. --encryption-provider-config=FILE (used by e2e/encryption.sh) [none]
# Several planes can run at once with different ports and directories.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
DIR=${KEYWARD_CLUSTER_DIR:-/tmp/keyward-cluster}
CACHE=${KEYWARD_CACHE:-$HOME/.cache/keyward}
PLANE=${KEYWARD_PLANE_MODULE:-$HERE/plane}
API_PORT=${KEYWARD_API_PORT:-26443}
ETCD_PORT=${KEYWARD_ETCD_PORT:-23790}
ETCD_PEER_PORT=$((ETCD_PORT + 1))
KCM_PORT=${KEYWARD_KCM_PORT:-26257}
CRDS=${KEYWARD_CRDS:-$REPO/crds}
KUBECONFIG_FILE=$DIR/admin.kubeconfig

say() { printf '[cluster %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { say "error: $*"; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

apt_install() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  say "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq >/dev/null || $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

runtime_deps() { apt_install openssl curl ca-certificates; }

# The oldest Go that go.mod accepts.
go_wanted() { awk '/^go /{print $2; exit}' "$PLANE/go.mod"; }

# Puts a Go at least as new as go.mod wants first on PATH: the one on PATH, else the machine's
# /usr/local/go (a distribution's older golang-go may come first on some PATHs). False if none.
find_go() {
  local want c v; want=$(go_wanted)
  for c in "$(command -v go 2>/dev/null)" /usr/local/go/bin/go; do
    [ -n "$c" ] && [ -x "$c" ] || continue
    v=$(GOTOOLCHAIN=local "$c" env GOVERSION 2>/dev/null) || continue
    v=${v#go}
    if [ "$(printf '%s\n%s\n' "$want" "$v" | sort -V | head -n1)" = "$want" ]; then
      PATH=$(dirname "$c"):$PATH
      export PATH
      return 0
    fi
  done
  return 1
}

# The Go environment of the plane's build: the machine's own Go (go.mod names the oldest it
# accepts), module and build caches under the cache directory, no cgo, go.sum as committed.
go_env() {
  export GOTOOLCHAIN=${GOTOOLCHAIN:-local} CGO_ENABLED=0
  export GOMODCACHE=$CACHE/go/mod GOCACHE=$CACHE/go/build GOFLAGS="-mod=readonly -buildvcs=false"
}

# Which version of a module go.mod requires.
module_version() { awk -v m="$1" '$1 == m && $2 ~ /^v/ {print $2; exit}' "$PLANE/go.mod"; }

# The cache key: the pinned modules (go.mod, go.sum), our etcd main, this script's build recipe
# and the Go version. Anything else that changes the binaries changes one of these.
plane_hash() {
  { cat "$PLANE/go.mod" "$PLANE/go.sum" "$PLANE/etcd/main.go"; sed -n '/^build() {/,/^}/p' "$0"; go version; } \
    | sha256sum | cut -c1-12
}

K8S_VERSION=$(module_version k8s.io/kubernetes)
K8S_VERSION=${K8S_VERSION#v}
ETCD_VERSION=$(module_version go.etcd.io/etcd/server/v3)
ETCD_VERSION=${ETCD_VERSION#v}
[ -n "$K8S_VERSION" ] && [ -n "$ETCD_VERSION" ] || die "no k8s.io/kubernetes or etcd version in $PLANE/go.mod"

# The directory of the cached binaries for this exact pin ($BIN); empty if go is missing.
bin_dir() {
  find_go || return 0
  go_env
  echo "$CACHE/k8s-v$K8S_VERSION-$(plane_hash)"
}

# Runs one build step in the background, printing progress every 30 s; on failure, the last
# lines of its log and one line naming the step.
step() { # name log cmd...
  local name=$1 log=$2; shift 2
  local t0; t0=$(now)
  say "$name"
  "$@" >"$log" 2>&1 &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -0 "$pid" 2>/dev/null && say "  ... $name: $(elapsed "$t0") s"
  done
  if ! wait "$pid"; then
    tail -n 30 "$log" >&2
    die "plane build failed at step: $name (log: $log)"
  fi
  say "  done in $(elapsed "$t0") s"
}

build() {
  runtime_deps
  find_go || die "no Go $(go_wanted) or newer on PATH or in /usr/local/go: the plane is built from Go modules with the machine's Go"
  go_env
  BIN=$(bin_dir)
  local want=(etcd etcdctl kube-apiserver kube-controller-manager kubectl)
  local b ok=1
  for b in "${want[@]}"; do [ -x "$BIN/$b" ] || ok=0; done
  [ -f "$BIN/manifest.txt" ] || ok=0
  [ "$ok" = 1 ] && return 0
  local t0; t0=$(now)
  say "Kubernetes v$K8S_VERSION and etcd v$ETCD_VERSION not cached in $BIN: building them once from Go modules"
  say "(about 8-13 minutes on 2 cores when nothing is cached; module cache $GOMODCACHE, build cache $GOCACHE)"
  mkdir -p "$GOMODCACHE" "$GOCACHE"
  local work; work=$(mktemp -d "${TMPDIR:-/tmp}/keyward-plane-build.XXXXXX")
  step "1/3 downloading the modules go.sum pins" "$work/download.log" \
    bash -c "cd '$PLANE' && go mod download && go mod verify"
  say "  module cache: $(du -sh "$GOMODCACHE" | cut -f1)"
  local minor=${K8S_VERSION#*.}; minor=${minor%%.*}
  local date; date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  local x=() pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    x+=("-X $pkg.gitVersion=v$K8S_VERSION" "-X $pkg.gitMajor=1" "-X $pkg.gitMinor=$minor"
      "-X $pkg.gitTreeState=clean" "-X $pkg.buildDate=$date")
  done
  mkdir -p "$work/bin"
  step "2/3 compiling kube-apiserver, kube-controller-manager, kubectl, etcd, etcdctl" "$work/build.log" \
    env LDFLAGS="-s -w ${x[*]}" OUT="$work/bin/" PLANE="$PLANE" bash -c 'cd "$PLANE" && go build -trimpath \
      -ldflags="$LDFLAGS" -o "$OUT" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kubectl go.etcd.io/etcd/etcdctl/v3 ./etcd'
  step "3/3 checking the binaries' versions" "$work/check.log" bash -c "
    set -e
    '$work/bin/kube-apiserver' --version | grep -qx 'Kubernetes v$K8S_VERSION'
    '$work/bin/kube-controller-manager' --version | grep -qx 'Kubernetes v$K8S_VERSION'
    '$work/bin/kubectl' version --client -o json | grep -q '\"gitVersion\": \"v$K8S_VERSION\"'
    '$work/bin/etcd' --version | grep -q 'etcd Version: $ETCD_VERSION'
    '$work/bin/etcdctl' version | grep -q 'etcdctl version: $ETCD_VERSION'"
  {
    echo "# Keyward's local control plane, built by e2e/cluster.sh from e2e/plane/go.mod"
    echo "kubernetes=v$K8S_VERSION"
    echo "etcd=v$ETCD_VERSION"
    echo "etcdctl=$(module_version go.etcd.io/etcd/etcdctl/v3)"
    echo "go=$(go env GOVERSION)"
    echo "go.sum.sha256=$(sha256sum "$PLANE/go.sum" | cut -d' ' -f1)"
    echo "built=$date"
    echo "build.seconds=$(elapsed "$t0")"
    for b in "${want[@]}"; do echo "$b.sha256=$(sha256sum "$work/bin/$b" | cut -d' ' -f1)"; done
  } >"$work/bin/manifest.txt"
  rm -rf "$BIN.tmp" && mv "$work/bin" "$BIN.tmp"
  rm -rf "$BIN" && mv "$BIN.tmp" "$BIN"
  rm -rf "$work"
  say "built and cached in $BIN in $(elapsed "$t0") s (manifest: $BIN/manifest.txt)"
}

pki() {
  local p=$DIR/pki
  [ -f "$p/admin.crt" ] && return 0
  mkdir -p "$p"
  (
    cd "$p"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=keyward-local-ca" -keyout ca.key -out ca.crt 2>/dev/null
    cat >apiserver.ext <<EXT
subjectAltName=IP:127.0.0.1,IP:127.100.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
extendedKeyUsage=serverAuth
EXT
    openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" -keyout apiserver.key -out apiserver.csr 2>/dev/null
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -extfile apiserver.ext -out apiserver.crt 2>/dev/null
    echo "extendedKeyUsage=clientAuth" >client.ext
    for who in "admin:/O=system:masters/CN=keyward-admin" "kcm:/CN=system:kube-controller-manager"; do
      local name=${who%%:*} subj=${who#*:}
      openssl req -newkey rsa:2048 -nodes -subj "$subj" -keyout "$name.key" -out "$name.csr" 2>/dev/null
      openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -extfile client.ext -out "$name.crt" 2>/dev/null
    done
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  )
}

kubeconfig() { # name cert key file
  cat >"$4" <<KC
apiVersion: v1
kind: Config
clusters:
- name: keyward-local
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority: $DIR/pki/ca.crt
users:
- name: $1
  user:
    client-certificate: $2
    client-key: $3
contexts:
- name: keyward-local
  context: {cluster: keyward-local, user: $1}
current-context: keyward-local
KC
}

running() { [ -f "$DIR/$1.pid" ] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }

start() { # name cmd...
  local name=$1; shift
  if running "$name"; then say "$name already running (pid $(cat "$DIR/$name.pid"))"; return 0; fi
  setsid "$@" >"$DIR/$name.log" 2>&1 </dev/null &
  echo $! >"$DIR/$name.pid"
  say "started $name (pid $!, log $DIR/$name.log)"
}

wait_for() { # what timeout-seconds cmd...
  local what=$1 limit=$2; shift 2
  local t0; t0=$(now)
  until "$@" >/dev/null 2>&1; do
    if awk -v a="$t0" -v b="$(now)" -v l="$limit" 'BEGIN{exit !(b-a>l)}'; then
      [ -f "$DIR/$what.log" ] && tail -n 5 "$DIR/$what.log" | cut -c1-400 >&2
      die "$what not ready after ${limit}s (log: $DIR/$what.log)"
    fi
    sleep 0.2
  done
}

# Opt-in audit log (KEYWARD_AUDIT_LOG): the API server's own record of every request, so a
# benchmark can count a client's requests by verb and resource without help from the client.
audit_args() {
  [ -n "${KEYWARD_AUDIT_LOG:-}" ] || return 0
  local policy=$DIR/audit-policy.yaml
  {
    echo "apiVersion: audit.k8s.io/v1"
    echo "kind: Policy"
    echo "omitStages: [RequestReceived]"
    echo "rules:"
    if [ -n "${KEYWARD_AUDIT_USERS:-}" ]; then
      echo "- level: Metadata"
      echo "  users: [\"${KEYWARD_AUDIT_USERS//,/\", \"}\"]"
      echo "- level: None"
    else
      echo "- level: Metadata"
    fi
  } >"$policy"
  mkdir -p "$(dirname "$KEYWARD_AUDIT_LOG")"
  # --audit-log-maxsize is in MB; 0 does not mean "never rotate" but the rotation library's
  # default of 100 MB, and a reader that follows the file by offset (keyward-bench) then misses
  # everything after a rotation (N >= 5,000 writes more than 100 MB). 1,000,000 MB: never.
  printf '%s\n' --audit-policy-file "$policy" --audit-log-path "$KEYWARD_AUDIT_LOG" --audit-log-format json --audit-log-maxsize 1000000
}

api_ready() { curl -sf --cacert "$DIR/pki/ca.crt" --cert "$DIR/pki/admin.crt" --key "$DIR/pki/admin.key" "https://127.0.0.1:$API_PORT/readyz"; }

# The API server with this plane's flags (used by `up`, and by `apiserver-start` after a fault).
start_apiserver() {
  local audit=() extra=()
  mapfile -t audit < <(audit_args)
  [ ${#audit[@]} -eq 0 ] || say "audit log: $KEYWARD_AUDIT_LOG (users: ${KEYWARD_AUDIT_USERS:-all})"
  [ -z "${KEYWARD_APISERVER_EXTRA_ARGS:-}" ] || read -r -a extra <<<"$KEYWARD_APISERVER_EXTRA_ARGS"
  [ ${#extra[@]} -eq 0 ] || say "extra kube-apiserver flags: ${extra[*]}"
  start kube-apiserver "$BIN/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$API_PORT" \
    --tls-cert-file "$DIR/pki/apiserver.crt" --tls-private-key-file "$DIR/pki/apiserver.key" \
    --client-ca-file "$DIR/pki/ca.crt" --authorization-mode Node,RBAC \
    --service-account-issuer https://kubernetes.default.svc --service-account-key-file "$DIR/pki/sa.pub" \
    --service-account-signing-key-file "$DIR/pki/sa.key" --api-audiences https://kubernetes.default.svc \
    --endpoint-reconciler-type none \
    --service-cluster-ip-range 127.100.0.0/24 --enable-admission-plugins NamespaceLifecycle,ServiceAccount \
    --max-requests-inflight 1000 --max-mutating-requests-inflight 500 --event-ttl 2h \
    ${audit[@]+"${audit[@]}"} ${extra[@]+"${extra[@]}"}
}

up() {
  local t0; t0=$(now)
  build
  mkdir -p "$DIR"
  pki
  kubeconfig keyward-admin "$DIR/pki/admin.crt" "$DIR/pki/admin.key" "$KUBECONFIG_FILE"
  kubeconfig system:kube-controller-manager "$DIR/pki/kcm.crt" "$DIR/pki/kcm.key" "$DIR/kcm.kubeconfig"
  local data=/dev/shm/keyward-etcd-$ETCD_PORT
  [ -w /dev/shm ] || data=$DIR/etcd-data
  if ! running etcd; then rm -rf "$data"; fi
  start etcd "$BIN/etcd" --name keyward --data-dir "$data" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "keyward=http://127.0.0.1:$ETCD_PEER_PORT" --listen-metrics-urls "" \
    --quota-backend-bytes 4294967296 --log-level warn
  echo "$data" >"$DIR/etcd.data"
  wait_for etcd 30 curl -sf "http://127.0.0.1:$ETCD_PORT/health"
  start_apiserver
  wait_for kube-apiserver 60 api_ready
  say "kube-apiserver ready on https://127.0.0.1:$API_PORT ($(elapsed "$t0") s)"
  if ls "$CRDS"/*.yaml >/dev/null 2>&1; then
    # A plain apply, validated by the server like any user's (CEL rules included).
    KUBECONFIG=$KUBECONFIG_FILE "$BIN/kubectl" apply -f "$CRDS" >"$DIR/crds.log" 2>&1 \
      || { cat "$DIR/crds.log" >&2; die "the API server refused the CRDs in $CRDS"; }
    KUBECONFIG=$KUBECONFIG_FILE "$BIN/kubectl" wait --for condition=Established --timeout 30s -f "$CRDS" >/dev/null
    say "installed CRDs from $CRDS before the controller-manager (so its garbage collector knows them)"
  fi
  start kube-controller-manager "$BIN/kube-controller-manager" \
    --kubeconfig "$DIR/kcm.kubeconfig" --authentication-kubeconfig "$DIR/kcm.kubeconfig" --authorization-kubeconfig "$DIR/kcm.kubeconfig" \
    --use-service-account-credentials=true --service-account-private-key-file "$DIR/pki/sa.key" \
    --root-ca-file "$DIR/pki/ca.crt" --leader-elect=false --bind-address 127.0.0.1 --secure-port "$KCM_PORT" \
    --controllers '*,-node-ipam-controller,-node-lifecycle-controller,-persistentvolume-attach-detach-controller,-persistentvolume-binder-controller,-persistentvolume-expander-controller,-ttl-controller' \
    --kube-api-qps 200 --kube-api-burst 400
  wait_for "default ServiceAccount" 60 env KUBECONFIG="$KUBECONFIG_FILE" "$BIN/kubectl" get serviceaccount default -n default
  say "plane up in $(elapsed "$t0") s; use it with: export KUBECONFIG=$KUBECONFIG_FILE"
}

down() {
  local name pid
  for name in kube-controller-manager kube-apiserver etcd; do
    [ -f "$DIR/$name.pid" ] || continue
    pid=$(cat "$DIR/$name.pid")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
      say "stopped $name (pid $pid)"
    fi
    rm -f "$DIR/$name.pid"
  done
  if [ -f "$DIR/etcd.data" ]; then rm -rf "$(cat "$DIR/etcd.data")"; rm -f "$DIR/etcd.data"; fi
}

status() {
  local name
  for name in etcd kube-apiserver kube-controller-manager; do
    if running "$name"; then echo "$name: running (pid $(cat "$DIR/$name.pid"))"; else echo "$name: stopped"; fi
  done
  if api_ready >/dev/null 2>&1; then echo "kube-apiserver: ready at https://127.0.0.1:$API_PORT"; else echo "kube-apiserver: not ready"; fi
  echo "KUBECONFIG=$KUBECONFIG_FILE"
  BIN=$(bin_dir)
  if [ -x "$BIN/kubectl" ]; then
    echo "kubectl: $BIN/kubectl"
    KUBECONFIG=$KUBECONFIG_FILE "$BIN/kubectl" version 2>/dev/null | sed 's/^/  /' || true
    [ -f "$BIN/manifest.txt" ] && grep -E '^(kubernetes|etcd|go)=' "$BIN/manifest.txt" | sed 's/^/  manifest: /'
  else
    echo "kubectl: not built yet ($BIN)"
  fi
}

# For `eval "$(e2e/cluster.sh env)"`: the plane's kubeconfig and its own kubectl first on PATH
# (a machine may ship another kubectl, or none).
print_env() {
  BIN=$(bin_dir)
  echo "export KUBECONFIG=$KUBECONFIG_FILE"
  [ -n "$BIN" ] && echo "export PATH=$BIN:\$PATH KEYWARD_PLANE_BIN=$BIN"
  return 0
}

# Faults for e2e/faults.rs: the API server killed (SIGKILL, as a crash) and started again with
# the same flags, and etcd compacted to its current revision (so every watch resumed from an
# older resourceVersion gets 410 Gone once the API server's watch cache is rebuilt).
apiserver_kill() {
  running kube-apiserver || { say "kube-apiserver is not running"; return 0; }
  local pid; pid=$(cat "$DIR/kube-apiserver.pid")
  kill -KILL "$pid"
  while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
  rm -f "$DIR/kube-apiserver.pid"
  say "killed kube-apiserver (pid $pid)"
}

apiserver_start() {
  BIN=$(bin_dir)
  local t0; t0=$(now)
  start_apiserver
  wait_for kube-apiserver 60 api_ready
  say "kube-apiserver ready again ($(elapsed "$t0") s)"
}

etcd_compact() {
  BIN=$(bin_dir)
  local ep="http://127.0.0.1:$ETCD_PORT" rev
  rev=$("$BIN/etcdctl" --endpoints "$ep" endpoint status -w json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["Status"]["header"]["revision"])')
  "$BIN/etcdctl" --endpoints "$ep" compact "$rev" --physical >/dev/null
  say "etcd compacted at revision $rev"
  echo "$rev"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  env) print_env ;;
  bin) bin_dir ;;
  status) status ;;
  ready) if [ -f "$DIR/pki/ca.crt" ] && api_ready >/dev/null 2>&1; then exit 0; else exit 1; fi ;;
  build) build ;;
  apiserver-kill) apiserver_kill ;;
  apiserver-start) apiserver_start ;;
  etcd-compact) etcd_compact ;;
  *) sed -n '2,34p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
