#!/usr/bin/env bash
# candle (sgr bench) against the PyTorch reference (scripts/torch_reference.py), side by side in
# one run, same model, batch, input and thread count; each method's two measurements run back to
# back. Needs `pip install torch`; not part of CI.
# Usage: scripts/compare_torch.sh [STEPS]        (MODEL=resnet32 THREADS=2 BATCH=128
#        INPUT_SIZE=32 CLASSES=10 PAIRS=1 by default; PAIRS=n repeats each pair n times;
#        SGR_BIN=path/to/sgr measures another build, e.g. an older commit's, instead of this one;
#        PYTHON=path/to/python picks the interpreter that has torch, torchvision and timm)
#   e.g. MODEL=resnet50 INPUT_SIZE=224 CLASSES=1000 BATCH=16 \
#        METHODS="bp|sgr --modules 4 --sgr-grad forward-difference" scripts/compare_torch.sh 3
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-5}
threads=${THREADS:-2}
model=${MODEL:-resnet32}
export RAYON_NUM_THREADS=$threads
sgr=${SGR_BIN:-}
if [ -z "$sgr" ]; then
  cargo build --release -p sgr-cli -q
  sgr=target/release/sgr
fi
python=${PYTHON:-python3}
pairs=${PAIRS:-1}
common="--model $model --batch-size ${BATCH:-128} --input-size ${INPUT_SIZE:-32} --in-channels 3 --classes ${CLASSES:-10} --steps $steps"
printf '| %s method | candle img/s | PyTorch img/s | candle/PyTorch speed | candle peak MiB | PyTorch peak MiB | candle/PyTorch memory |\n|---|---|---|---|---|---|---|\n' "$model"
methods=${METHODS:-"bp|greedy --modules 16|sgr --modules 16 --sgr-grad finite-difference|sgr --modules 16 --sgr-grad forward-difference|sgr --modules 16 --sgr-grad exact"}
IFS='|' read -ra list <<< "$methods"
for m in "${list[@]}"; do
 for _ in $(seq "$pairs"); do
  c=$("$sgr" bench $common --method $m --json)
  t=$("$python" scripts/torch_reference.py $common --threads "$threads" --method $m)
  python3 - "$m" "$c" "$t" <<'PY'
import json, sys
m, c, t = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
mib = lambda b: b / 2**20
print(f"| {m} | {c['images_per_s']:.1f} | {t['images_per_s']:.1f} | {c['images_per_s']/t['images_per_s']:.2f} | "
      f"{mib(c['peak_memory_bytes']):.0f} | {mib(t['peak_memory_bytes']):.0f} | {c['peak_memory_bytes']/t['peak_memory_bytes']:.2f} |")
PY
 done
done
