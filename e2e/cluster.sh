#!/usr/bin/env bash
# Keyward's local Kubernetes control plane: etcd + kube-apiserver + kube-controller-manager
# (upstream v1.20.2, built once from Debian's `kubernetes` source package) on 127.0.0.1.
#
#   e2e/cluster.sh up       install what is missing, build once (cached), start the plane
#   e2e/cluster.sh down     stop exactly the processes `up` started (by PID)
#   e2e/cluster.sh env      print `export KUBECONFIG=...` for this plane
#   e2e/cluster.sh status   show the processes and whether the API server is ready
#   e2e/cluster.sh ready    exit 0 if the API server answers /readyz, 1 otherwise (quiet)
#   e2e/cluster.sh build    only install packages and build/cache the binaries
#
# Settings (environment):
#   KEYWARD_CLUSTER_DIR   state directory (PKI, kubeconfig, logs, pids)  [/tmp/keyward-cluster]
#   KEYWARD_CACHE         cache for the built binaries                   [~/.cache/keyward]
#   KEYWARD_API_PORT      kube-apiserver secure port                     [26443]
#   KEYWARD_ETCD_PORT     etcd client port (peer port is +1)             [23790]
#   KEYWARD_KCM_PORT      kube-controller-manager secure port            [26257]
#   KEYWARD_CRDS          directory of CRDs installed before the controller-manager starts [<repo>/crds]
#   KEYWARD_AUDIT_LOG     opt-in: the API server writes its audit log (JSON lines, Metadata level,
#                         RequestReceived stage omitted) to this file (used by e2e/bench.sh) [off]
#   KEYWARD_AUDIT_USERS   with KEYWARD_AUDIT_LOG: audit only these users (comma-separated)  [all]
# Several planes can run at once with different ports and directories.
set -euo pipefail

K8S_VERSION=1.20.2
DEB_VERSION="1.20.5+really1.20.2-1.1+deb12u1"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
DIR=${KEYWARD_CLUSTER_DIR:-/tmp/keyward-cluster}
CACHE=${KEYWARD_CACHE:-$HOME/.cache/keyward}
BIN=$CACHE/k8s-v$K8S_VERSION
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

runtime_deps() { apt_install etcd-server openssl curl ca-certificates; }

build() {
  runtime_deps
  if [ -x "$BIN/kube-apiserver" ] && [ -x "$BIN/kube-controller-manager" ]; then
    return 0
  fi
  local t0; t0=$(now)
  say "kube-apiserver/kube-controller-manager v$K8S_VERSION not cached in $BIN: building them once (about 5 minutes on 2 cores)"
  apt_install golang-go make rsync golang-github-modern-go-reflect2-dev dpkg-dev xz-utils
  local work; work=$(mktemp -d "${TMPDIR:-/tmp}/keyward-k8s-build.XXXXXX")
  # A private apt configuration with deb-src entries derived from the machine's own sources,
  # so the system's apt setup stays untouched.
  mkdir -p "$work/apt/lists/partial" "$work/apt/sources.list.d" "$work/src"
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -e "$f" ] || continue
    sed -E 's/^Types:.*/Types: deb-src/' "$f" >"$work/apt/sources.list.d/$(basename "$f")"
  done
  if [ -s /etc/apt/sources.list ]; then
    grep -E '^deb ' /etc/apt/sources.list | sed 's/^deb /deb-src /' >"$work/apt/sources.list" || true
  fi
  touch "$work/apt/sources.list"
  local aptopts=(-o "Dir::Etc::SourceList=$work/apt/sources.list" -o "Dir::Etc::SourceParts=$work/apt/sources.list.d" -o "Dir::State::Lists=$work/apt/lists")
  say "fetching the source package kubernetes=$DEB_VERSION"
  apt-get "${aptopts[@]}" update -qq >/dev/null
  (cd "$work/src" && apt-get "${aptopts[@]}" source --download-only "kubernetes=$DEB_VERSION" >/dev/null)
  local orig; orig=$(ls "$work"/src/kubernetes_*.orig.tar.* | head -n1)
  [ -n "$orig" ] || die "no orig tarball downloaded"
  say "unpacking $(basename "$orig")"
  mkdir -p "$work/tree"
  tar -xf "$orig" -C "$work/tree" --strip-components=1
  say "patching vendored modern-go/reflect2 (v1.0.1 breaks on Go >= 1.18) with Debian's 1.0.2"
  rm -f "$work"/tree/vendor/github.com/modern-go/reflect2/*.go "$work"/tree/vendor/github.com/modern-go/reflect2/*.s
  cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.go "$work/tree/vendor/github.com/modern-go/reflect2/"
  cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.s "$work/tree/vendor/github.com/modern-go/reflect2/" 2>/dev/null || true
  rm -f "$work"/tree/vendor/github.com/modern-go/reflect2/*_test.go
  say "compiling (progress below every 30 s; log: $work/build.log)"
  (
    cd "$work/tree"
    export CGO_ENABLED=0 GOFLAGS=-mod=vendor GOTOOLCHAIN=local GOPATH="$work/gopath" HOME="$work/home" GOCACHE="$work/gocache"
    make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" GOLDFLAGS="-s -w" >"$work/build.log" 2>&1
  ) &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 30
    kill -0 "$pid" 2>/dev/null && say "  still compiling ($(elapsed "$t0") s; $(tail -n1 "$work/build.log" | cut -c1-100))"
  done
  if ! wait "$pid"; then
    tail -n 30 "$work/build.log" >&2
    die "build failed; see $work/build.log"
  fi
  mkdir -p "$BIN.tmp"
  cp "$work/tree/_output/bin/kube-apiserver" "$work/tree/_output/bin/kube-controller-manager" "$BIN.tmp/"
  rm -rf "$BIN" && mv "$BIN.tmp" "$BIN"
  rm -rf "$work"
  say "built and cached in $BIN in $(elapsed "$t0") s"
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
      die "$what not ready after ${limit}s"
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
  start etcd etcd --name keyward --data-dir "$data" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "keyward=http://127.0.0.1:$ETCD_PEER_PORT" --listen-metrics-urls "" \
    --quota-backend-bytes 4294967296 --log-level warn
  echo "$data" >"$DIR/etcd.data"
  wait_for etcd 30 curl -sf "http://127.0.0.1:$ETCD_PORT/health"
  local audit=()
  mapfile -t audit < <(audit_args)
  [ ${#audit[@]} -eq 0 ] || say "audit log: $KEYWARD_AUDIT_LOG (users: ${KEYWARD_AUDIT_USERS:-all})"
  start kube-apiserver "$BIN/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$API_PORT" --insecure-port 0 \
    --tls-cert-file "$DIR/pki/apiserver.crt" --tls-private-key-file "$DIR/pki/apiserver.key" \
    --client-ca-file "$DIR/pki/ca.crt" --authorization-mode Node,RBAC \
    --service-account-issuer https://kubernetes.default.svc --service-account-key-file "$DIR/pki/sa.pub" \
    --service-account-signing-key-file "$DIR/pki/sa.key" --api-audiences https://kubernetes.default.svc \
    --service-cluster-ip-range 127.100.0.0/24 --enable-admission-plugins NamespaceLifecycle,ServiceAccount \
    --max-requests-inflight 1000 --max-mutating-requests-inflight 500 --event-ttl 2h \
    ${audit[@]+"${audit[@]}"}
  wait_for kube-apiserver 60 api_ready
  say "kube-apiserver ready on https://127.0.0.1:$API_PORT ($(elapsed "$t0") s)"
  if ls "$CRDS"/*.yaml >/dev/null 2>&1; then
    # Client-side apply with --validate=false installs CRDs carrying CEL rules on 1.20 too
    # (1.20 ignores x-kubernetes-validations; kubectl's own schema check and server-side apply reject them).
    KUBECONFIG=$KUBECONFIG_FILE kubectl apply --validate=false -f "$CRDS" >/dev/null 2>&1
    say "installed CRDs from $CRDS before the controller-manager (so its garbage collector knows them)"
  fi
  start kube-controller-manager "$BIN/kube-controller-manager" \
    --kubeconfig "$DIR/kcm.kubeconfig" --authentication-kubeconfig "$DIR/kcm.kubeconfig" --authorization-kubeconfig "$DIR/kcm.kubeconfig" \
    --use-service-account-credentials=true --service-account-private-key-file "$DIR/pki/sa.key" \
    --root-ca-file "$DIR/pki/ca.crt" --leader-elect=false --bind-address 127.0.0.1 --secure-port "$KCM_PORT" --port 0 \
    --controllers '*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle,-service,-route,-attachdetach,-persistentvolume-binder,-persistentvolume-expander,-ttl' \
    --kube-api-qps 200 --kube-api-burst 400
  wait_for "default ServiceAccount" 60 env KUBECONFIG="$KUBECONFIG_FILE" kubectl get serviceaccount default -n default
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
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  env) echo "export KUBECONFIG=$KUBECONFIG_FILE" ;;
  status) status ;;
  ready) if [ -f "$DIR/pki/ca.crt" ] && api_ready >/dev/null 2>&1; then exit 0; else exit 1; fi ;;
  build) build ;;
  *) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
