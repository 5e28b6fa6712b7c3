#!/usr/bin/env bash
# Checks Keyward's alerts and dashboard without a cluster:
#   - `promtool check rules` and `promtool test rules` on charts/keyward/files/keyward-rules.yaml
#     (tests: e2e/alerts.test.yaml);
#   - the Grafana dashboard is valid JSON, and every metric the rules and the dashboard use is one
#     Keyward exports (the list below; e2e/install.sh's metrics check compares it with /metrics).
# promtool comes from Debian's `prometheus` package: the .deb is downloaded (apt-get download, no
# install, so no Prometheus service is set up) and only promtool is kept, cached under
# ~/.cache/keyward/promtool-<package version>/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
say() { printf '[alerts %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
CACHE=${KEYWARD_CACHE:-$HOME/.cache/keyward}
RULES=charts/keyward/files/keyward-rules.yaml
DASHBOARD=charts/keyward/files/grafana-dashboard.json

# The metrics Keyward exports (names final: /work/plan; src/metrics once merged).
KNOWN_METRICS="keyward_key_expiration_timestamp_seconds keyward_key_next_rotation_timestamp_seconds
keyward_key_ready_status keyward_rotation_stalled keyward_rotation_verifier_silent keyward_agents_confirmed keyward_agents_total
keyward_rotations_total keyward_revocations_total keyward_rollouts_triggered_total
keyward_reconcile_total keyward_reconcile_errors_total keyward_reconcile_duration_seconds
keyward_kube_requests_total keyward_leader keyward_build_info"

promtool_bin() {
  local version dir tmp
  version=$(apt-cache policy prometheus 2>/dev/null | awk '/Candidate:/ {print $2}')
  [ -n "$version" ] && [ "$version" != "(none)" ] || { apt-get update -qq >/dev/null; version=$(apt-cache policy prometheus | awk '/Candidate:/ {print $2}'); }
  dir=$CACHE/promtool-${version//[:+~]/_}
  if [ ! -x "$dir/promtool" ]; then
    say "fetching promtool from Debian's prometheus $version"
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download -q "prometheus=$version" >/dev/null 2>&1) \
      || { rm -rf "$tmp"; say "error: apt-get download prometheus=$version failed"; return 1; }
    dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x"
    mkdir -p "$dir" && install -m 0755 "$tmp/x/usr/bin/promtool" "$dir/promtool"
    rm -rf "$tmp"
  fi
  echo "$dir/promtool"
}

t0=$(date +%s)
PROMTOOL=$(promtool_bin)
say "$("$PROMTOOL" --version 2>&1 | head -1)"
"$PROMTOOL" check rules "$RULES" >&2
"$PROMTOOL" test rules e2e/alerts.test.yaml >&2

python3 - "$RULES" "$DASHBOARD" $KNOWN_METRICS <<'PY'
import json, re, sys
rules, dashboard, known = sys.argv[1], sys.argv[2], set(sys.argv[3:])
dash = json.load(open(dashboard))
exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
text = open(rules).read() + "\n".join(exprs)
used = set(re.findall(r"\bkeyward_[a-z_]+", text))
# Histogram series and the Prometheus rule group name are not metric names of their own.
used = {re.sub(r"_(bucket|sum|count)$", "", u) for u in used} - {"keyward_rules"}
unknown = sorted(u for u in used if u not in known)
assert not unknown, f"metrics not exported by Keyward: {unknown}"
assert dash["uid"] == "keyward" and dash["panels"], "dashboard has no panels"
print(f"[alerts] dashboard: {len(dash['panels'])} panels; rules and dashboard use {len(used)} known metrics", file=sys.stderr)
PY
say "alerts and dashboard OK in $(( $(date +%s) - t0 )) s"
