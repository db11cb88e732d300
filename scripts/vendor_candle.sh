#!/usr/bin/env bash
# Regenerates vendor/candle-core: candle-core from the cargo registry (the version pinned in the
# workspace Cargo.toml), its library sources only, with vendor/candle-core.patch applied.
# The workspace uses it through `[patch.crates-io]`. See vendor/README.md for why.
# Usage: scripts/vendor_candle.sh          (needs the crate in ~/.cargo/registry: `cargo fetch`
#                                            with the [patch] line removed, or any build of it)
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^candle-core = "\(.*\)"$/\1/p' Cargo.toml)
src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/candle-core-"$version" 2>/dev/null | head -1)
if [ -z "$src" ]; then
  echo "candle-core $version is not in the cargo registry; fetch it first" >&2
  exit 1
fi
dst=vendor/candle-core
rm -rf "$dst"
mkdir -p "$dst"
cp -r "$src/src" "$src/LICENSE" "$src/README.md" "$dst/"
# The library only: drop the examples, tests, benches and dev-dependencies of the manifest.
python3 - "$src/Cargo.toml" "$dst/Cargo.toml" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
blocks = re.split(r'\n(?=\[)', text)
keep = [b for b in blocks
        if not re.match(r'\[\[(example|test|bench)\]\]|\[dev-dependencies', b)]
# cudarc loads the CUDA libraries when first used instead of at start-up, so a CUDA build still
# starts, and trains on the CPU, where no NVIDIA driver is installed (vendor/README.md, change 3).
out = '\n'.join(keep).rstrip() + '\n'
assert out.count('"dynamic-linking"') == 1, 'cudarc features changed upstream'
out = out.replace('"dynamic-linking"', '"dynamic-loading"')
open(sys.argv[2], 'w').write(out)
PY
patch -d "$dst" -p1 --quiet < vendor/candle-core.patch
echo "vendored candle-core $version into $dst with vendor/candle-core.patch"
