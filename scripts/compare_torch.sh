#!/usr/bin/env bash
# candle (sgr bench) against the PyTorch reference (scripts/torch_reference.py), side by side in
# one run, same model, batch, input and thread count. Needs `pip install torch`; not part of CI.
# Usage: scripts/compare_torch.sh [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-3}
threads=${THREADS:-2}
export RAYON_NUM_THREADS=$threads
cargo build --release -p sgr-cli -q
common="--model resnet32 --batch-size 128 --input-size 32 --in-channels 3 --classes 10 --steps $steps"
printf '| method | candle img/s | PyTorch img/s | candle/PyTorch speed | candle peak MiB | PyTorch peak MiB |\n|---|---|---|---|---|---|\n'
for m in "bp" "greedy --modules 16" "sgr --modules 16 --sgr-grad exact" "sgr --modules 16 --sgr-grad finite-difference"; do
  c=$(target/release/sgr bench $common --method $m --json)
  if [[ "$m" == *finite-difference* ]]; then
    t=$(python3 scripts/torch_reference.py $common --threads "$threads" --method sgr --modules 16)
  else
    t=$(python3 scripts/torch_reference.py $common --threads "$threads" --method ${m%% --sgr-grad*})
  fi
  python3 - "$m" "$c" "$t" <<'PY'
import json, sys
m, c, t = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
mib = lambda b: b / 2**20
print(f"| {m} | {c['images_per_s']:.1f} | {t['images_per_s']:.1f} | {c['images_per_s']/t['images_per_s']:.3f} | {mib(c['peak_memory_bytes']):.0f} | {mib(t['peak_memory_bytes']):.0f} |")
PY
done
