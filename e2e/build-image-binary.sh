#!/usr/bin/env bash
# Builds the operator binary with the Dockerfile's own build command, so what CI tests is what the
# image ships. No container engine runs here: the one `RUN` line after the marker
# `# keyward:build-command` is read from the Dockerfile and run in the repository, with Cargo's
# target directory outside the clone. Prints the binary's path on stdout (nothing else).
#
#   KEYWARD_IMAGE_TARGET_DIR   Cargo target directory  [~/.cache/keyward/target-release]
#                              (the benchmark builds the same release binary there)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
say() { printf '[build-image-binary %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# Exactly one marker, followed by exactly one single-line RUN instruction.
markers=$(grep -c '^# keyward:build-command$' Dockerfile || true)
[ "$markers" = 1 ] || { say "error: Dockerfile has $markers '# keyward:build-command' markers (want 1)"; exit 1; }
line=$(sed -n '/^# keyward:build-command$/{n;p;}' Dockerfile)
case "$line" in
  "RUN "*) ;;
  *) say "error: the line after the marker is not a RUN instruction: $line"; exit 1 ;;
esac
case "$line" in
  *\\) say "error: the marked RUN instruction continues on the next line; keep it on one line"; exit 1 ;;
esac
cmd=${line#RUN }
# The image builds in /src with the default target directory; here only the target moves.
export CARGO_TARGET_DIR=${KEYWARD_IMAGE_TARGET_DIR:-${KEYWARD_BENCH_TARGET:-$HOME/.cache/keyward/target-release}}
say "running the Dockerfile's build command: $cmd (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
t0=$(date +%s)
bash -ec "$cmd" >&2
bin=$CARGO_TARGET_DIR/release/keyward
[ -x "$bin" ] || { say "error: $bin was not built (the Dockerfile copies target/release/keyward)"; exit 1; }
# The Dockerfile copies target/release/keyward: check the copy line still names that path.
grep -q '^RUN install -D -m 0755 target/release/keyward /out/keyward$' Dockerfile \
  || { say "error: the Dockerfile no longer copies target/release/keyward; update this script"; exit 1; }
say "built $bin in $(( $(date +%s) - t0 )) s ($("$bin" version))"
echo "$bin"
