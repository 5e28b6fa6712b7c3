#!/usr/bin/env bash
# Runs docs/verifier.md's nginx `auth_request` config for real: the operator binary mints a
# key, `keyward verifier` watches it, nginx (Debian's) serves a bundle file behind
# auth_request. Checks: the agent Secret's token gets the file (200) and nginx logs the key
# and kid; no token and a forged token get 401. Needs a running plane (e2e/cluster.sh up,
# KUBECONFIG set), the CRDs applied, nginx on PATH, and a built `keyward` binary ($KEYWARD_BIN).
set -euo pipefail
BIN=${KEYWARD_BIN:?set KEYWARD_BIN to the keyward binary}
NS=${NS:-kw-nginx-$$}
VPORT=${VPORT:-18443}
NPORT=${NPORT:-18080}
WORK=$(mktemp -d)
chmod 755 "$WORK"   # nginx workers run as another user
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [[ -f $WORK/nginx.pid ]] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  kubectl delete namespace "$NS" --wait=false >/dev/null 2>&1 || true
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

kubectl create namespace "$NS" >/dev/null
"$BIN" run --namespaces "$NS" --metrics-address 0 --health-address 0 >"$WORK/operator.log" 2>&1 &
pids+=($!)
"$BIN" verifier --namespaces "$NS" --address "127.0.0.1:$VPORT" --replica-id nginx-0 --lease-namespace "$NS" >"$WORK/verifier.log" 2>&1 &
pids+=($!)
kubectl -n "$NS" apply -f - >/dev/null <<YAML
apiVersion: keyward.dev/v1alpha1
kind: ProvisioningKey
metadata: {name: opa-bundles}
spec: {}
YAML
for _ in $(seq 100); do
  kubectl -n "$NS" get secret opa-bundles >/dev/null 2>&1 && break; sleep 0.2
done
TOKEN=$(kubectl -n "$NS" get secret opa-bundles -o jsonpath='{.data.token}' | base64 -d)
KID=$(kubectl -n "$NS" get secret opa-bundles -o jsonpath='{.data.key-id}' | base64 -d)
[[ -n $TOKEN ]] || fail "no agent token"

mkdir -p "$WORK/srv/bundles" "$WORK/logs"
echo bundle >"$WORK/srv/bundles/authz.tar.gz"
cat >"$WORK/nginx.conf" <<CONF
pid $WORK/nginx.pid;
error_log $WORK/logs/error.log;
events {}
http {
  access_log off;
  client_body_temp_path $WORK/tmp; proxy_temp_path $WORK/tmp;
  log_format keyward '\$remote_addr "\$request" \$status key=\$keyward_key kid=\$keyward_kid';
  server {
    listen 127.0.0.1:$NPORT;
    access_log $WORK/logs/bundles.log keyward;
    location /bundles/ {
      auth_request /_keyward;
      auth_request_set \$keyward_key \$upstream_http_x_keyward_key;
      auth_request_set \$keyward_kid \$upstream_http_x_keyward_kid;
      root $WORK/srv;
    }
    location = /_keyward {
      internal;
      # The route names the one key this location accepts: the client cannot change it.
      proxy_pass http://127.0.0.1:$VPORT/auth/$NS/opa-bundles;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
    }
  }
}
CONF
mkdir -p "$WORK/tmp"
nginx -p "$WORK" -c "$WORK/nginx.conf"

url=http://127.0.0.1:$NPORT/bundles/authz.tar.gz
code=000
for _ in $(seq 100); do
  code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $TOKEN" "$url" || true)
  [[ $code == 200 ]] && break; sleep 0.2
done
[[ $code == 200 ]] || fail "agent token: $code (verifier log: $(tail -3 "$WORK/verifier.log"))"
# nginx writes the access log line after the response: give it a moment.
for _ in $(seq 20); do grep -q "key=$NS/opa-bundles kid=$KID" "$WORK/logs/bundles.log" && break; sleep 0.1; done
grep -q "key=$NS/opa-bundles kid=$KID" "$WORK/logs/bundles.log" || fail "nginx did not log key and kid: $(cat "$WORK/logs/bundles.log")"
code=$(curl -s -o /dev/null -w '%{http_code}' "$url")
[[ $code == 401 ]] || fail "no token: $code"
sig=${TOKEN##*.}; first=${sig:0:1}; [[ $first == A ]] && flip=B || flip=A
FORGED="${TOKEN%.*}.$flip${sig:1}"
code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $FORGED" "$url")
[[ $code == 401 ]] || fail "forged token: $code"
# Another key's genuine token (minted by hand with a key the verifier trusts for another
# ProvisioningKey would need a second key; the unbound route shows the binding instead).
code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$VPORT/auth")
[[ $code == 403 ]] || fail "unbound /auth without --accept-any-key: $code (want 403)"
echo "ok: nginx auth_request with keyward verifier (200 with the agent token, key and kid logged; 401 without, 401 forged; 403 unbound)"
