#!/usr/bin/env bash
# Encryption at rest, shown: Keyward's private keys (its key Secrets `<pk>-k<seq>` and the agent
# Secret) are encrypted in etcd when the API server encrypts Secrets, and Keyward keeps working
# through a rotation of the encryption key and with a KMS v2 plugin. On a plane of its own, with
# kube-apiserver's --encryption-provider-config (e2e/cluster.sh's KEYWARD_APISERVER_EXTRA_ARGS):
#
#   0. identity first: a Secret holding a real Ed25519 PEM is plaintext in etcd (the check below
#      does see a private key where there is one)
#   A. aescbc (key1) first: the real operator (`keyward run`) mints a key; its key Secret and
#      agent Secret are read raw from etcd with the plane's etcdctl: prefix
#      `k8s:enc:aescbc:v1:key1:`, no PEM header, no private key, no token
#   B. the encryption key rotated: key2 added first, API server restarted, every Secret rewritten,
#      key1 removed, restarted again; every Secret in etcd is under key2; Keyward rotates its key
#      (`<pk>-k2` active, the agent Secret's key-id changed) and the new Secrets are under key2
#   C. KMS v2: the project's own plugin (e2e/kms-plugin, k8s.io/kms, AES-GCM under a local key
#      file, built once and cached under ~/.cache/keyward) first; restarted, rewritten: every
#      Secret is `k8s:enc:kms:v2:<name>:` and names the plugin's key id; Keyward rotates again;
#      with the plugin stopped the API server reports kms-providers unhealthy and, restarted,
#      cannot read a Secret; with the plugin back it can
#
#   bash e2e/encryption.sh          about 80 s warm; one `[enc] ok: ...` line per check (25)
#
# Never prints key bytes: lengths, prefixes up to the key name, yes/no. Settings (environment):
# KEYWARD_BIN (the keyward binary; default: `cargo build --features fault-injection --bin keyward`
# into ${CARGO_TARGET_DIR:-~/.cache/keyward/target}, a no-op when fresh), KEYWARD_ENC_DIR (the
# plane's state directory) [/tmp/keyward-enc-cluster], KEYWARD_ENC_API_PORT / _ETCD_PORT /
# _KCM_PORT [31443 / 26090 / 31257], KEYWARD_CACHE [~/.cache/keyward]. Stops everything it
# started (operator, plugin, plane), even when a check fails.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
T0=$(date +%s)

export KEYWARD_CLUSTER_DIR=${KEYWARD_ENC_DIR:-/tmp/keyward-enc-cluster}
export KEYWARD_API_PORT=${KEYWARD_ENC_API_PORT:-31443}
export KEYWARD_ETCD_PORT=${KEYWARD_ENC_ETCD_PORT:-26090}
export KEYWARD_KCM_PORT=${KEYWARD_ENC_KCM_PORT:-31257}
CACHE=${KEYWARD_CACHE:-$HOME/.cache/keyward}
ENC=$KEYWARD_CLUSTER_DIR/enc           # encryption configs and keys (0600), plugin socket, logs
CONF=$ENC/encryption-config.yaml
SOCK=$ENC/kms.sock
KMS_NAME=keyward-local-kms
NS=keyward-enc
PK=enc-demo                            # its agent Secret is named after it; key Secrets $PK-k<seq>

say() { printf '[enc %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
ok() { printf '[enc] ok: %s\n' "$*"; }
fail() { printf '[enc] FAIL: %s\n' "$*" >&2; exit 1; }
wait_until() { # description timeout-seconds cmd...
  local what=$1 limit=$2; shift 2
  local end=$(($(date +%s) + limit))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || fail "gave up after ${limit}s waiting for: $what (operator log: $ENC/operator.log)"
    sleep 0.5
  done
}

# ---- the keyward binary and the KMS v2 plugin (built once, cached) -------------------------
if [ -z "${KEYWARD_BIN:-}" ]; then
  target=${CARGO_TARGET_DIR:-$CACHE/target}
  say "building keyward (cargo build --features fault-injection --bin keyward; a no-op when fresh) into $target"
  CARGO_TARGET_DIR=$target cargo build -q --features fault-injection --bin keyward
  KEYWARD_BIN=$target/debug/keyward
fi
[ -x "$KEYWARD_BIN" ] || fail "KEYWARD_BIN=$KEYWARD_BIN is not an executable"

GO=$(command -v go || true)
[ -n "$GO" ] || GO=/usr/local/go/bin/go
[ -x "$GO" ] || fail "no Go on PATH or in /usr/local/go (the KMS plugin is built with the machine's Go, like the plane)"
PLUGIN_SRC=$REPO/e2e/kms-plugin
plugin_hash=$({ cat "$PLUGIN_SRC/go.mod" "$PLUGIN_SRC/go.sum" "$PLUGIN_SRC/main.go"; GOTOOLCHAIN=local "$GO" version; } | sha256sum | cut -c1-12)
PLUGIN=$CACHE/kms-plugin-$plugin_hash/keyward-kms-plugin
if [ ! -x "$PLUGIN" ]; then
  say "building the KMS v2 plugin (e2e/kms-plugin) once into $PLUGIN"
  t=$(date +%s)
  mkdir -p "$CACHE/go/mod" "$CACHE/go/build"
  (cd "$PLUGIN_SRC" && GOTOOLCHAIN=local CGO_ENABLED=0 GOMODCACHE=$CACHE/go/mod GOCACHE=$CACHE/go/build \
    GOFLAGS="-mod=readonly -buildvcs=false" nice -n 10 "$GO" build -trimpath -ldflags="-s -w" -o "$PLUGIN.tmp" .) \
    || fail "the KMS plugin did not build (e2e/kms-plugin)"
  mv "$PLUGIN.tmp" "$PLUGIN"
  say "  built in $(($(date +%s) - t)) s"
fi

# ---- the plane, with an encryption config from the start -------------------------------------
op_pid=""
plugin_pid=""
bg_pid=""
stop_pid() { # pid signal
  [ -n "$1" ] && kill -0 "$1" 2>/dev/null || return 0
  kill "-$2" "$1" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$1" 2>/dev/null || true
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_pid "$op_pid" INT
  stop_pid "$bg_pid" TERM
  stop_pid "$plugin_pid" TERM
  bash e2e/cluster.sh down >/dev/null 2>&1 || true
  if [ "$rc" = 0 ]; then
    say "encryption at rest: all checks passed in $(($(date +%s) - T0)) s"
  else
    say "failed (exit $rc); logs: $ENC/operator.log, $ENC/kms-plugin.log, $KEYWARD_CLUSTER_DIR/kube-apiserver.log"
  fi
  exit "$rc"
}
bash e2e/cluster.sh down >/dev/null 2>&1 || true
trap cleanup EXIT
trap 'exit 130' INT TERM
rm -rf "$ENC"
mkdir -p "$ENC"
chmod 700 "$ENC"

newkey() { head -c 32 /dev/urandom | base64 -w0; } # 32 random bytes: an aescbc or plugin key
KEY1=$(newkey)
KEY2=$(newkey)

# EncryptionConfiguration for Secrets, providers in order (the first one writes, all read).
identity() { printf '  - identity: {}\n'; }
aescbc() { # name=secret...
  printf '  - aescbc:\n      keys:\n'
  local k
  for k in "$@"; do printf '      - name: %s\n        secret: %s\n' "${k%%=*}" "${k#*=}"; done
}
kms() { printf '  - kms:\n      apiVersion: v2\n      name: %s\n      endpoint: unix://%s\n      timeout: 3s\n' "$KMS_NAME" "$SOCK"; }
write_config() { # provider printers, as one string each
  {
    printf 'apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n- resources: [secrets]\n  providers:\n'
    local p
    for p in "$@"; do eval "$p"; done
  } >"$CONF.tmp"
  chmod 600 "$CONF.tmp"
  mv "$CONF.tmp" "$CONF"
}
restarts=0
restart_apiserver() {
  restarts=$((restarts + 1))
  bash e2e/cluster.sh apiserver-kill
  bash e2e/cluster.sh apiserver-start
}

write_config identity "aescbc key1=$KEY1"
export KEYWARD_APISERVER_EXTRA_ARGS="--encryption-provider-config=$CONF"
bash e2e/cluster.sh up
eval "$(bash e2e/cluster.sh env)"
export KEYWARD_ENC_ETCDCTL=$KEYWARD_PLANE_BIN/etcdctl
export ETCDCTL_ENDPOINTS=http://127.0.0.1:$KEYWARD_ETCD_PORT
[ -x "$KEYWARD_ENC_ETCDCTL" ] || fail "no etcdctl in $KEYWARD_PLANE_BIN"
kubectl create namespace "$NS" >/dev/null

# ---- raw reads from etcd (never printing key bytes) ------------------------------------------
# rawcheck NS NAME WHAT PREFIX [KMS_KEY_ID]: the Secret's value in etcd starts with PREFIX and
# holds none of its secret data in the clear (PEM header, PEM base64 body, the base64 kubectl
# shows, the token); PREFIX "plain" expects the opposite: a plaintext object with the PEM in it.
rawcheck() {
  python3 - "$@" <<'PY'
import base64, json, os, subprocess, sys
ns, name, what, prefix = sys.argv[1:5]
kms_key_id = sys.argv[5] if len(sys.argv) > 5 else ""
out = subprocess.run([os.environ["KEYWARD_ENC_ETCDCTL"], "get", f"/registry/secrets/{ns}/{name}", "-w", "json"],
                     check=True, capture_output=True).stdout
kvs = json.loads(out).get("kvs") or []
if not kvs:
    sys.exit(f"[enc] FAIL: {ns}/{name}: no key /registry/secrets/{ns}/{name} in etcd")
raw = base64.b64decode(kvs[0]["value"])
secret = json.loads(subprocess.run(["kubectl", "get", "secret", "-n", ns, name, "-o", "json"],
                                   check=True, capture_output=True).stdout)
needles = {}  # what must not appear -> bytes
pem_count = 0
for k, v in (secret.get("data") or {}).items():
    val = base64.b64decode(v)
    if b"-----BEGIN PRIVATE KEY-----" in val:
        pem_count += 1
        body = b"".join(l for l in val.splitlines() if l and not l.startswith(b"-----"))
        needles[f"{k}: PEM"] = val
        needles[f"{k}: private key base64"] = body
        needles[f"{k}: base64 of the PEM"] = v.encode()
    elif k == "token":
        needles["token"] = val
if pem_count == 0:
    sys.exit(f"[enc] FAIL: {ns}/{name}: the Secret holds no private key (nothing to look for)")
header = b"-----BEGIN PRIVATE KEY-----" in raw
found = [n for n, b in needles.items() if b and b in raw]
yn = lambda b: "yes" if b else "no"
if prefix == "plain":
    if not raw.startswith(b"k8s\x00") or not header or not found:
        sys.exit(f"[enc] FAIL: {what} {ns}/{name} was expected in plaintext (k8s protobuf with the PEM), "
                 f"got {len(raw)} bytes starting {raw[:4]!r}, PEM header: {yn(header)}")
    print(f"[enc] ok: {what} {ns}/{name} is plaintext in etcd: {len(raw)} bytes, k8s protobuf, "
          f"PEM header: yes, in the clear: {', '.join(found)}")
    sys.exit(0)
if not raw.startswith(prefix.encode()):
    shown = raw[:len(prefix)] if raw.startswith(b"k8s:enc:") else raw[:4]
    sys.exit(f"[enc] FAIL: {what} {ns}/{name}: etcd value starts {shown!r}, not {prefix!r}")
if header or found:
    sys.exit(f"[enc] FAIL: {what} {ns}/{name}: secret data in the clear in etcd (PEM header: {yn(header)}; {', '.join(found)})")
extra = ""
if kms_key_id:
    if kms_key_id.encode() not in raw:
        sys.exit(f"[enc] FAIL: {what} {ns}/{name}: the stored object does not name the plugin's key id {kms_key_id}")
    extra = f", names KMS key id {kms_key_id}"
print(f"[enc] ok: {what} {ns}/{name} in etcd: {len(raw)} bytes, prefix {prefix}{extra}, "
      f"PEM header: no, private key (PEM, its base64 body, the PEM's base64) and token in the clear: no "
      f"({len(needles)} values looked for)")
PY
}

# allcheck PREFIX WHAT: every Secret in etcd starts with PREFIX (prints how many there are).
allcheck() {
  python3 - "$@" <<'PY'
import base64, json, os, subprocess, sys
prefix, what = sys.argv[1:3]
out = subprocess.run([os.environ["KEYWARD_ENC_ETCDCTL"], "get", "--prefix", "/registry/secrets/", "-w", "json"],
                     check=True, capture_output=True).stdout
kvs = json.loads(out).get("kvs") or []
bad = []
for kv in kvs:
    if not base64.b64decode(kv["value"]).startswith(prefix.encode()):
        bad.append(base64.b64decode(kv["key"]).decode())
if not kvs:
    sys.exit("[enc] FAIL: no Secrets in etcd at all")
if bad:
    sys.exit(f"[enc] FAIL: {len(bad)} of {len(kvs)} Secrets in etcd not under {prefix}: {', '.join(bad[:5])}")
print(f"[enc] ok: all {len(kvs)} Secrets in etcd start with {prefix} ({what})")
PY
}

rewrite_secrets() { # the documented way: read every Secret and write it back unchanged
  local i
  for i in 1 2 3 4 5; do
    if kubectl get secrets -A -o json | kubectl replace -f - >"$ENC/replace.log" 2>&1; then return 0; fi
    sleep 1 # a conflict with the operator's own write: read and write again
  done
  tail -n 3 "$ENC/replace.log" >&2
  fail "kubectl replace of every Secret failed 5 times"
}

key_id() { kubectl get secret -n "$NS" "$PK" -o jsonpath='{.data.key-id}' | base64 -d; }
key_state() { kubectl get secret -n "$NS" "$PK-k$1" -o jsonpath='{.metadata.labels.keyward\.dev/key-state}'; }
rotate_and_check() { # seq prefix [kms key id]: request a rotation, wait for <pk>-k<seq> active
  local seq=$1 prefix=$2 before
  before=$(key_id)
  say "requesting a rotation of $NS/$PK (annotation keyward.dev/rotate)"
  kubectl annotate pk -n "$NS" "$PK" keyward.dev/rotate="enc-$seq-$(date +%s)" --overwrite >/dev/null
  rotated() { [ "$(key_state "$seq")" = active ] && [ -n "$(key_id)" ] && [ "$(key_id)" != "$before" ]; }
  wait_until "$PK-k$seq active and the agent Secret on it" 90 rotated
  ok "Keyward rotated: $NS/$PK-k$seq is active, the agent Secret's key-id changed ($(printf %s "$before" | cut -c1-10)... -> $(key_id | cut -c1-10)...)"
  rawcheck "$NS" "$PK-k$seq" "new key Secret" "$prefix" "${3:-}"
  rawcheck "$NS" "$PK" "agent Secret" "$prefix" "${3:-}"
}

# ---- 0. identity first: plaintext, and the check sees a private key where there is one -------
openssl genpkey -algorithm ed25519 -out "$ENC/plain.pem" 2>/dev/null
kubectl create secret generic -n "$NS" plain-before --from-file=private-key.pem="$ENC/plain.pem" >/dev/null
rm -f "$ENC/plain.pem"
rawcheck "$NS" plain-before "a Secret written with identity first" plain

# ---- A. aescbc first --------------------------------------------------------------------------
say "phase A: aescbc (key1) first, identity last; the API server restarted"
write_config "aescbc key1=$KEY1" identity
restart_apiserver
"$KEYWARD_BIN" run --namespaces "$NS" \
  --min-rotation-interval 1m --min-min-interval 0s --min-overlap 0s --min-publish-delay 0s \
  --metrics-address 127.0.0.1:0 --health-address 127.0.0.1:0 >"$ENC/operator.log" 2>&1 &
op_pid=$!
kubectl apply -f - >/dev/null <<EOF
apiVersion: keyward.dev/v1alpha1
kind: ProvisioningKey
metadata:
  name: $PK
  namespace: $NS
spec:
  algorithm: Ed25519
  includePrivateKey: true     # the agent Secret holds the private key too: both must be encrypted
  rotation:
    interval: 720h
    minInterval: 1s
    publishDelay: 0s
    overlap: 5s                 # short, so the next rotation need not wait (one retiring key at a time)
  token:
    audience: bundle-service
    ttl: 1h
EOF
has_token() { [ -n "$(kubectl get secret -n "$NS" "$PK" -o jsonpath='{.data.token}')" ]; }
wait_until "the agent Secret $NS/$PK with a token" 60 has_token
kill -0 "$op_pid" 2>/dev/null || fail "keyward run exited (log: $ENC/operator.log)"
ok "keyward run minted $NS/$PK-k1 ($(key_state 1)) and handed out a token in $NS/$PK"
rawcheck "$NS" "$PK-k1" "key Secret" "k8s:enc:aescbc:v1:key1:"
rawcheck "$NS" "$PK" "agent Secret" "k8s:enc:aescbc:v1:key1:"
rawcheck "$NS" plain-before "the Secret written before (not rewritten yet)" plain

# ---- B. rotating the encryption key -----------------------------------------------------------
say "phase B: key2 added first, restarted, every Secret rewritten"
write_config "aescbc key2=$KEY2 key1=$KEY1" identity
restart_apiserver
rewrite_secrets
allcheck "k8s:enc:aescbc:v1:key2:" "rewritten under the new key"
say "phase B: key1 removed, restarted"
write_config "aescbc key2=$KEY2" identity
restart_apiserver
n=$(kubectl get secrets -n "$NS" -o name | wc -l)
[ "$n" -ge 3 ] || fail "only $n Secrets readable in $NS after key1 was removed"
ok "with key1 removed from the config, the API server reads all $n Secrets of $NS"
rawcheck "$NS" plain-before "the Secret once written in plaintext" "k8s:enc:aescbc:v1:key2:"
rotate_and_check 2 "k8s:enc:aescbc:v1:key2:"
allcheck "k8s:enc:aescbc:v1:key2:" "nothing left under key1 or in plaintext"

# ---- C. KMS v2 ---------------------------------------------------------------------------------
say "phase C: the KMS v2 plugin ($PLUGIN) first"
newkey >"$ENC/kms.key"
chmod 600 "$ENC/kms.key"
KMS_KEY_ID=$("$PLUGIN" -key-file "$ENC/kms.key" -print-key-id)
start_plugin() {
  setsid "$PLUGIN" -listen "$SOCK" -key-file "$ENC/kms.key" >>"$ENC/kms-plugin.log" 2>&1 </dev/null &
  plugin_pid=$!
  wait_until "the KMS plugin's socket $SOCK" 10 test -S "$SOCK"
}
start_plugin
write_config kms "aescbc key2=$KEY2" identity
restart_apiserver
api() { curl -s --cacert "$KEYWARD_CLUSTER_DIR/pki/ca.crt" --cert "$KEYWARD_CLUSTER_DIR/pki/admin.crt" \
  --key "$KEYWARD_CLUSTER_DIR/pki/admin.key" "https://127.0.0.1:$KEYWARD_API_PORT$1"; }
[ "$(api /readyz/kms-providers)" = ok ] || fail "the API server's kms-providers check is not ok with the plugin running"
ok "kube-apiserver's /readyz/kms-providers: ok (KMS v2 provider $KMS_NAME, plugin key id $KMS_KEY_ID)"
rewrite_secrets
allcheck "k8s:enc:kms:v2:$KMS_NAME:" "rewritten through the KMS v2 plugin"
rawcheck "$NS" "$PK-k2" "key Secret" "k8s:enc:kms:v2:$KMS_NAME:" "$KMS_KEY_ID"
rotate_and_check 3 "k8s:enc:kms:v2:$KMS_NAME:" "$KMS_KEY_ID"
enc_calls=$(grep -c ' encrypt #' "$ENC/kms-plugin.log" || true)
[ "$enc_calls" -ge 1 ] || fail "the plugin logged no Encrypt call"
ok "the plugin served $enc_calls Encrypt call(s) (data-encryption-key seeds; KMS v2 does not call it per object)"

say "phase C: the plugin stopped"
stop_pid "$plugin_pid" TERM
plugin_pid=""
kms_down() { [ "$(api /readyz/kms-providers)" != ok ]; }
wait_until "the API server to report kms-providers unhealthy" 40 kms_down
ok "plugin stopped: /readyz/kms-providers is failing"
if kubectl get secret -n "$NS" "$PK" -o name >/dev/null 2>&1; then
  say "  (as designed in KMS v2, the running API server still reads: it caches the decrypted data-encryption key)"
fi
bash e2e/cluster.sh apiserver-kill
restarts=$((restarts + 1))
# Not ready without its KMS plugin: started in the background, `apiserver-start` waits up to 60 s.
bash e2e/cluster.sh apiserver-start >"$ENC/apiserver-start.log" 2>&1 &
bg_pid=$!
serving() { kubectl get --raw /version; }
wait_until "the restarted API server to serve requests" 40 serving
sleep 1
if err=$(kubectl get secret -n "$NS" "$PK" -o name 2>&1); then
  fail "the API server restarted without its KMS plugin still read $NS/$PK"
fi
printf '%s\n' "$err" >"$ENC/read-without-plugin.txt"
case $err in
  *StorageError*) ;; # no KMS state, no transformer: the storage layer cannot decrypt
  *) fail "reading $NS/$PK without the plugin failed, but not in storage: $(head -n1 <<<"$err" | cut -c1-160)" ;;
esac
ok "API server restarted without the plugin: reading $NS/$PK fails ($(printf %s "$err" | head -n1 | cut -c1-90)...; whole error: $ENC/read-without-plugin.txt)"
if kubectl get secrets -n "$NS" -o name >/dev/null 2>&1; then
  fail "the API server restarted without its KMS plugin still listed the Secrets of $NS"
fi
ok "API server restarted without the plugin: listing the Secrets of $NS fails"
start_plugin
wait "$bg_pid" || { cat "$ENC/apiserver-start.log" >&2; fail "the API server did not become ready once the plugin was back"; }
bg_pid=""
readable() { kubectl get secret -n "$NS" "$PK" -o name; }
wait_until "Secrets readable again" 30 readable
ok "plugin started again: the API server is ready and reads $NS/$PK"
rawcheck "$NS" "$PK" "agent Secret" "k8s:enc:kms:v2:$KMS_NAME:" "$KMS_KEY_ID"
kill -0 "$op_pid" 2>/dev/null || fail "keyward run exited (log: $ENC/operator.log)"
pk_ready() { [ "$(kubectl get pk -n "$NS" "$PK" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]; }
wait_until "ProvisioningKey $NS/$PK Ready" 30 pk_ready
ok "keyward run kept running through $restarts API server restarts; $NS/$PK is Ready on $(key_id | cut -c1-10)..."
