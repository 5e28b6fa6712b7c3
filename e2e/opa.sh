#!/usr/bin/env bash
# A real Open Policy Agent for the end-to-end tests and the demo, built once from Debian's own
# packages (OPA's Go source and every library it needs are `golang-*-dev` packages in sid) and
# cached beside the local control plane's binaries. Nothing is installed into the system and
# /etc/apt is not touched: apt runs on a private configuration (APT_CONFIG) whose archive URI is
# read from the machine's own /etc/apt/sources.list.d/*.sources. Facts: ../shared/notes/opa.md.
#
#   e2e/opa.sh build      build and cache `opa` unless it is cached
#   e2e/opa.sh path       print the cached binary's path (building it first if needed)
#   e2e/opa.sh manifest   print the version manifest of the cached build (package=version lines)
#
# Settings (environment):
#   KEYWARD_CACHE    cache for the built binaries  [~/.cache/keyward]
#
# Versions: e2e/opa-versions.txt pins every package=version a build used (sid moves). A pinned
# version that the archive no longer has is replaced by the current one, and the script says so;
# the manifest written beside the binary records what was really used.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${KEYWARD_CACHE:-$HOME/.cache/keyward}
PINS=$HERE/opa-versions.txt
OPA_PKG=golang-github-open-policy-agent-opa-dev
TABLEWRITER=golang-github-olekukonko-tablewriter-dev

say() { printf '[opa %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
# One clear line on failure, then exit.
die() {
  printf '[opa] error: %s\n' "$*" >&2
  exit 1
}
now() { date +%s; }

# The OPA version pinned in e2e/opa-versions.txt (upstream part, e.g. 1.4.2), or empty.
pinned_opa_version() {
  [ -s "$PINS" ] || return 0
  sed -n "s/^$OPA_PKG=\([^+~-]*\).*/\1/p" "$PINS" | head -n1
}

# The cached binary: the pinned version's if present, else the newest cached one, else empty.
cached_binary() {
  local v; v=$(pinned_opa_version)
  if [ -n "$v" ] && [ -x "$CACHE/opa-$v/opa" ]; then
    echo "$CACHE/opa-$v/opa"
    return 0
  fi
  local b
  b=$(ls -1d "$CACHE"/opa-*/opa 2>/dev/null | sort -V | tail -n1 || true)
  [ -n "$b" ] && [ -x "$b" ] && echo "$b"
  return 0
}

# The archive's URI from the machine's own deb822 sources (the first one that is not the
# security archive). No host name is written in this script.
archive_uri() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -e "$f" ] || continue
    awk '/^URIs:/{for(i=2;i<=NF;i++) print $i}' "$f"
  done | grep -v -- '-security' | head -n1
}

archive_keyring() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -e "$f" ] || continue
    awk '/^Signed-By:/{print $2}' "$f"
  done | head -n1
}

build() {
  local have; have=$(cached_binary)
  if [ -n "$have" ]; then
    say "cached: $have"
    return 0
  fi
  local t0; t0=$(now)
  command -v apt-get >/dev/null || die "apt-get is not available: opa is built from Debian's packages"
  command -v dpkg-deb >/dev/null || die "dpkg-deb is not available"
  local uri keyring
  uri=$(archive_uri)
  [ -n "$uri" ] || die "no archive URI found in /etc/apt/sources.list.d/*.sources"
  keyring=$(archive_keyring)
  [ -n "$keyring" ] || keyring=/usr/share/keyrings/debian-archive-keyring.gpg

  mkdir -p "$CACHE"
  work=$(mktemp -d "$CACHE/opa-build.XXXXXX")
  # The unpacked tree is about 2.5 GB: it goes whatever happens.
  trap 'rm -rf "${work:-}"' EXIT
  say "building a real opa once from Debian's packages in $work (about 3 minutes on 2 cores)"

  # 1. A private apt configuration: sid and trixie, main, from the machine's own archive.
  local apt=$work/apt
  mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/empty.d" "$apt/prefs.d"
  : >"$apt/status"
  : >"$apt/preferences"
  cat >"$apt/sources.list" <<EOF
deb [signed-by=$keyring] $uri sid main
deb [signed-by=$keyring] $uri trixie main
EOF
  cat >"$apt/apt.conf" <<EOF
Dir::Etc::SourceList "$apt/sources.list";
Dir::Etc::SourceParts "$apt/empty.d";
Dir::Etc::Preferences "$apt/preferences";
Dir::Etc::PreferencesParts "$apt/prefs.d";
Dir::State::Lists "$apt/lists";
Dir::State::status "$apt/status";
Dir::Cache "$apt/cache";
Acquire::IndexTargets::deb::DEP-11::DefaultEnabled "false";
Acquire::Languages "none";
APT::Architecture "$(dpkg --print-architecture)";
EOF
  export APT_CONFIG=$apt/apt.conf
  say "1/5 apt-get update (sid + trixie indexes, private configuration)"
  apt-get update -qq >"$work/update.log" 2>&1 || apt-get update -qq >"$work/update.log" 2>&1 ||
    die "apt-get update on the private sid/trixie configuration failed: $(grep -m1 -E '^(E|W):' "$work/update.log" || tail -n1 "$work/update.log")"
  apt-cache show "$OPA_PKG" >/dev/null 2>&1 || die "$OPA_PKG is not in the archive's sid any more"

  # 2. The closure: OPA's source package and every golang-*-dev it depends on.
  say "2/5 dependency closure of $OPA_PKG"
  apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
    --no-replaces --no-enhances "$OPA_PKG" 2>/dev/null |
    grep -E '^golang-[^ ]*-dev$' | sort -u >"$work/closure.txt"
  [ -s "$work/closure.txt" ] || die "the dependency closure of $OPA_PKG came out empty"
  # The Go toolchain sid's golang-go points to (sid's libraries need Go >= 1.25).
  local gopkg
  gopkg=$(apt-cache show golang-go/sid 2>/dev/null | sed -n 's/^Depends:.*\(golang-1\.[0-9]*-go\).*/\1/p' | head -n1)
  [ -n "$gopkg" ] || die "cannot tell which Go toolchain sid's golang-go depends on"
  local gover=${gopkg#golang-}
  gover=${gover%-go}
  say "   $(wc -l <"$work/closure.txt") golang-*-dev packages; Go toolchain $gopkg"

  # 3. Versions: the pin where the archive still has it, else the current one (said aloud).
  local all=("$(cat "$work/closure.txt")" "$gopkg" "golang-$gover-src")
  # shellcheck disable=SC2206
  all=($(printf '%s\n' ${all[@]} | sort -u))
  apt-cache madison "${all[@]}" "$TABLEWRITER" 2>/dev/null |
    awk -F'|' '{gsub(/ /,"",$1); gsub(/ /,"",$2); print $1"="$2}' | sort -u >"$work/available.txt"
  local want=() p pin fell=0
  for p in "${all[@]}"; do
    pin=$( [ -s "$PINS" ] && grep -m1 "^$p=" "$PINS" || true)
    if [ -n "$pin" ] && grep -qxF "$pin" "$work/available.txt"; then
      want+=("$pin")
    else
      if [ -n "$pin" ]; then
        say "   pinned $pin is gone from the archive: taking the current $p"
        fell=$((fell + 1))
      fi
      want+=("$p")
    fi
  done
  # Sid's tablewriter 1.1.x breaks OPA 1.4.2 (SetHeader undefined); trixie's 0.0.5 works.
  local tw
  pin=$( [ -s "$PINS" ] && grep -m1 "^$TABLEWRITER@trixie=" "$PINS" || true)
  if [ -n "$pin" ] && grep -qxF "${pin/@trixie/}" "$work/available.txt"; then
    tw="$TABLEWRITER=${pin#*=}"
  else
    [ -n "$pin" ] && say "   pinned ${pin/@trixie/} (trixie) is gone: taking trixie's current one" && fell=$((fell + 1))
    tw="$TABLEWRITER/trixie"
  fi

  say "3/5 downloading ${#want[@]} packages + trixie's tablewriter"
  mkdir -p "$work/debs" "$work/overlay-debs"
  (cd "$work/debs" && apt-get download -qq "${want[@]}" >"$work/download.log" 2>&1) ||
    die "apt-get download failed: $(grep -m1 -E '^(E|W):' "$work/download.log" || tail -n1 "$work/download.log")"
  (cd "$work/overlay-debs" && apt-get download -qq "$tw" >>"$work/download.log" 2>&1) ||
    die "apt-get download of trixie's $TABLEWRITER failed: $(grep -m1 -E '^E:' "$work/download.log" || tail -n1 "$work/download.log")"
  say "   $(du -sh "$work/debs" | cut -f1) downloaded in $(($(now) - t0)) s"

  say "4/5 unpacking into a private root (never /)"
  local deb
  mkdir -p "$work/root" "$work/overlay"
  for deb in "$work"/debs/*.deb; do dpkg-deb -x "$deb" "$work/root" || die "dpkg-deb -x $(basename "$deb") failed"; done
  for deb in "$work"/overlay-debs/*.deb; do dpkg-deb -x "$deb" "$work/overlay" || die "dpkg-deb -x $(basename "$deb") failed"; done
  # The manifest: every package=version actually used (read from the .deb files themselves).
  {
    for deb in "$work"/debs/*.deb; do dpkg-deb -f "$deb" Package Version | paste -sd= | sed 's/Package: //; s/=Version: /=/'; done | sort
    for deb in "$work"/overlay-debs/*.deb; do dpkg-deb -f "$deb" Package Version | paste -sd= | sed 's/Package: //; s/=Version: /@trixie=/'; done
  } >"$work/manifest.txt"
  local opaver
  opaver=$(sed -n "s/^$OPA_PKG=\([^+~-]*\).*/\1/p" "$work/manifest.txt")
  [ -n "$opaver" ] || die "the manifest has no $OPA_PKG"

  say "5/5 go build (GOPATH mode, offline, Go $gover, OPA $opaver)"
  local goroot=$work/root/usr/lib/go-$gover
  [ -x "$goroot/bin/go" ] || die "no go binary in $goroot"
  local gocache=$work/gocache
  (
    export GOROOT=$goroot GOPATH=$work/overlay/usr/share/gocode:$work/root/usr/share/gocode \
      GO111MODULE=off CGO_ENABLED=0 GOTOOLCHAIN=local GOPROXY=off GOFLAGS= GOCACHE=$gocache \
      HOME=$work
    cd "$work" && "$goroot/bin/go" build -trimpath -ldflags='-s -w' -o "$work/opa" github.com/open-policy-agent/opa
  ) >"$work/build.log" 2>&1 || die "go build of OPA $opaver failed: $(grep -m1 -vE '^#' "$work/build.log" || echo 'see no output')"
  "$work/opa" version >/dev/null 2>&1 || die "the built opa does not run"

  local dest=$CACHE/opa-$opaver
  rm -rf "$dest.tmp"
  mkdir -p "$dest.tmp"
  mv "$work/opa" "$dest.tmp/opa"
  cp "$work/manifest.txt" "$dest.tmp/versions.txt"
  rm -rf "$dest"
  mv "$dest.tmp" "$dest"
  if [ "$fell" -gt 0 ]; then
    say "   $fell pinned version(s) were gone: the versions used are in $dest/versions.txt (copy it to e2e/opa-versions.txt to pin them)"
  fi
  [ -s "$PINS" ] || say "   no pins yet: cp $dest/versions.txt $PINS to pin this build"
  say "built $dest/opa ($(du -h "$dest/opa" | cut -f1)) in $(($(now) - t0)) s; manifest $dest/versions.txt; unpacked tree removed"
}

case "${1:-}" in
build) build ;;
path)
  b=$(cached_binary)
  if [ -z "$b" ]; then
    build
    b=$(cached_binary)
  fi
  [ -n "$b" ] || die "no opa binary after the build"
  echo "$b"
  ;;
manifest)
  b=$(cached_binary)
  [ -n "$b" ] || die "opa is not built yet: run bash e2e/opa.sh build"
  cat "$(dirname "$b")/versions.txt"
  ;;
*)
  echo "usage: $0 build|path|manifest" >&2
  exit 2
  ;;
esac
