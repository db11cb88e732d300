#!/usr/bin/env bash
# Packs what scripts/device/check.sh needs on a GPU machine into target/device-pack/ (ignored by
# git): the cuda+cudnn `sgr` and the device test binary (tests/device.rs), xz-compressed so that
# they travel with the working tree (at most 64 MiB in all; the pack is refused over 40 MiB).
#
#   scripts/device/pack.sh      builds both with scripts/cuda/build.sh (the first build takes
#                               about an hour here), packs them, prints the command to run
#
# SGR_BIN and SGR_TESTS_BIN pack binaries built already (e.g. CPU builds, to try check.sh with
# SGR_CHECK_DEVICE=cpu on a machine without a GPU).
set -euo pipefail
# Every early exit says why, also of a command that fails under `set -e` without a message.
trap 'rc=$?; echo "error: $0 stopped at line $LINENO: \`$BASH_COMMAND\` exited with status $rc" >&2' ERR
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
pack=target/device-pack
limit=$((40 * 1024 * 1024)) # leaves room for the working tree in the 64 MiB trip

die() {
    echo "error: $1" >&2
    shift
    for h in "$@"; do echo "help: $h" >&2; done
    exit 1
}

command -v xz >/dev/null || die "xz is not installed" "apt-get install xz-utils"
sgr=${SGR_BIN:-$(scripts/cuda/build.sh | tail -n 1)}
tests=${SGR_TESTS_BIN:-$(scripts/cuda/build.sh --tests | tail -n 1)}
for f in "$sgr" "$tests"; do
    [[ -x $f ]] || die "$f is not an executable" "build it with scripts/cuda/build.sh (--tests for the test binary)"
done
mkdir -p "$pack"
for pair in "sgr:$sgr" "device-tests:$tests"; do
    name=${pair%%:*}
    xz -T0 -6 -c "${pair#*:}" > "$pack/$name.xz.tmp"
    mv "$pack/$name.xz.tmp" "$pack/$name.xz"
done
git rev-parse HEAD > "$pack/commit" 2>/dev/null || echo unknown > "$pack/commit"
size=$(cat "$pack"/*.xz | wc -c)
((size <= limit)) || die "the packed binaries take $((size >> 20)) MiB, over the $((limit >> 20)) MiB that leave room for the working tree" \
    "build without debug info (the release profile has none) or strip them: strip $sgr $tests"
echo "packed $((size >> 20)) MiB into $pack (commit $(cat "$pack/commit"))" >&2
echo "on the GPU machine, from the repository root, with $pack carried:" >&2
echo "  scripts/device/check.sh \"\$OUT\""
