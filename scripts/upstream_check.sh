#!/usr/bin/env bash
# sgr without the workspace's patched candle-core, as a project that depends on it gets it:
#   1. the tests of sgr-core, sgr-models, sgr-data and sgr-run, built against crates.io's
#      candle-core (a copy of the workspace with the [patch.crates-io] section removed);
#   2. tests/outside, a crate outside the workspace that depends on sgr's crates by path: one
#      greedy+sgr step on a zoo model and on a candle-nn model, and the exact way refused.
# Both build in the workspace's own target folder (CARGO_TARGET_DIR overrides it): crates that do
# not depend on candle are reused from the workspace build, the rest are built apart (other
# package ids), so nothing there is replaced. CI runs this after the workspace tests.
set -euo pipefail
trap 'rc=$?; echo "error: $0 stopped at line $LINENO: \`$BASH_COMMAND\` exited with status $rc" >&2' ERR
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
target=${CARGO_TARGET_DIR:-$root/target}
mkdir -p "$target"
target=$(cd "$target" && pwd)

copy=$(mktemp -d /tmp/sgr-upstream.XXXXXX)
trap 'rm -rf "$copy"' EXIT
# The workspace's members and manifest, without build outputs or the vendored candle.
tar -C "$root" --exclude=./target --exclude=./vendor --exclude=./.git --exclude=./tests/outside -cf - . |
    tar -C "$copy" -xf -
grep -q '^\[patch.crates-io\]' "$copy/Cargo.toml" ||
    { echo "error: Cargo.toml has no [patch.crates-io] section to remove (has the layout changed?)" >&2; exit 1; }
# Drop the section: from its header to the next blank line.
sed -i '/^\[patch.crates-io\]/,/^$/d' "$copy/Cargo.toml"
if grep -q 'vendor/candle-core' "$copy/Cargo.toml"; then
    echo "error: the copy still points at vendor/candle-core" >&2
    exit 1
fi

echo "== the crates' tests on crates.io's candle-core"
(cd "$copy" && CARGO_TARGET_DIR=$target cargo test -p sgr-core -p sgr-models -p sgr-data -p sgr-run)
# The copy resolved candle-core from the registry, not from a path.
grep -A2 '^name = "candle-core"$' "$copy/Cargo.lock" | grep -q 'registry+' ||
    { echo "error: the copy's Cargo.lock does not take candle-core from crates.io" >&2; exit 1; }

echo "== tests/outside: a crate outside the workspace, no [patch]"
CARGO_TARGET_DIR=$target cargo run --manifest-path tests/outside/Cargo.toml
