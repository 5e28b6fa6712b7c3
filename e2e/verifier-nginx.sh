#!/usr/bin/env bash
# Runs docs/verifier.md's nginx `auth_request` config for real: the operator binary mints a
# key, `keyward verifier` watches it, nginx (Debian's) serves a bundle file behind
# auth_request. Checks: the agent Secret's token gets the file (200) and nginx logs the key
# and kid; no token and a forged token get 401. The verifier serves TLS (a CA and a server
# certificate made here with openssl) and nginx checks it (`proxy_ssl_verify on`): a second
# location trusting another CA fails closed (not 200). Needs a running plane (e2e/cluster.sh up,
# KUBECONFIG set), the CRDs applied, nginx and openssl on PATH, and a built `keyward` binary
# ($KEYWARD_BIN).
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

# A CA, the verifier's certificate (for verifier.test and 127.0.0.1), and a CA nginx must not
# accept.
pki() { openssl "$@" >>"$WORK/openssl.log" 2>&1 || fail "openssl $1 (see $WORK/openssl.log)"; }
for ca in ca wrong-ca; do
  pki req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj "/CN=keyward e2e $ca" -keyout "$WORK/$ca.key" -out "$WORK/$ca.crt"
done
pki req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=verifier.test \
  -keyout "$WORK/tls.key" -out "$WORK/tls.csr"
printf 'subjectAltName=DNS:verifier.test,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' >"$WORK/tls.ext"
pki x509 -req -in "$WORK/tls.csr" -CA "$WORK/ca.crt" -CAkey "$WORK/ca.key" -CAcreateserial \
  -days 2 -extfile "$WORK/tls.ext" -out "$WORK/tls.crt"
chmod 644 "$WORK/ca.crt" "$WORK/wrong-ca.crt"   # nginx workers read the trusted CA

kubectl create namespace "$NS" >/dev/null
"$BIN" run --namespaces "$NS" --metrics-address 0 --health-address 0 >"$WORK/operator.log" 2>&1 &
pids+=($!)
"$BIN" verifier --tls-cert-file "$WORK/tls.crt" --tls-key-file "$WORK/tls.key" --namespaces "$NS" --address "127.0.0.1:$VPORT" --replica-id nginx-0 --lease-namespace "$NS" >"$WORK/verifier.log" 2>&1 &
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
      proxy_pass https://127.0.0.1:$VPORT/auth/$NS/opa-bundles;
      # nginx does not check an upstream's certificate unless told to.
      proxy_ssl_verify on;
      proxy_ssl_trusted_certificate $WORK/ca.crt;
      proxy_ssl_name verifier.test;
      proxy_ssl_server_name on;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
    }
    # The same, trusting another CA: the handshake fails, so must the request.
    location /wrong-ca/ {
      auth_request /_keyward_wrong_ca;
      alias $WORK/srv/bundles/;
    }
    location = /_keyward_wrong_ca {
      internal;
      proxy_pass https://127.0.0.1:$VPORT/auth/$NS/opa-bundles;
      proxy_ssl_verify on;
      proxy_ssl_trusted_certificate $WORK/wrong-ca.crt;
      proxy_ssl_name verifier.test;
      proxy_ssl_server_name on;
      # nginx keeps TLS sessions per upstream address, and both locations proxy to the same
      # one: a resumed session is not verified again, so without this the wrong CA would ride
      # on the session the first location verified (docs/verifier.md).
      proxy_ssl_session_reuse off;
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
code=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$WORK/ca.crt" -H "Authorization: Bearer $TOKEN" "https://127.0.0.1:$VPORT/auth")
[[ $code == 403 ]] || fail "unbound /auth without --accept-any-key: $code (want 403)"
# TLS: nginx trusting another CA fails closed; curl with the CA gets /healthz, without it not;
# plain HTTP to the TLS port gets no HTTP answer.
code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$NPORT/wrong-ca/authz.tar.gz")
[[ $code == 5* ]] || fail "nginx trusting the wrong CA: $code (want a 5xx)"
grep -q 'certificate verify failed\|upstream SSL certificate verify error' "$WORK/logs/error.log" \
  || fail "nginx logged no certificate verify failure: $(tail -3 "$WORK/logs/error.log")"
wrong=$code
code=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$WORK/ca.crt" --resolve "verifier.test:$VPORT:127.0.0.1" "https://verifier.test:$VPORT/healthz")
[[ $code == 200 ]] || fail "https /healthz with the CA: $code"
code=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$WORK/wrong-ca.crt" "https://127.0.0.1:$VPORT/healthz" || true)
[[ $code == 000 ]] || fail "https /healthz trusting the wrong CA: $code (want a failed handshake)"
code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "http://127.0.0.1:$VPORT/healthz" || true)
[[ $code != 200 ]] || fail "plain HTTP to the TLS port: 200"
grep -q 'scheme.*https\|"scheme":"https"' "$WORK/verifier.log" || fail "the verifier did not log its https mode: $(head -3 "$WORK/verifier.log")"
echo "ok: nginx auth_request with keyward verifier over TLS (200 with the agent token, key and kid logged; 401 without, 401 forged; 403 unbound; $wrong through nginx trusting another CA; /healthz over https with the CA only)"
