#!/usr/bin/env bash
# sgr against its PyTorch twin (scripts/torch_train.py) on real data: the same model, split,
# heads, recipe and seed, trained on Fashion-MNIST padded to 32×32, final test accuracy on the
# full test set. Needs a Python with torch, torchvision and timm (PYTHON=...); not part of CI.
#
# Usage: scripts/compare_accuracy.sh [OUT_DIR]
#   LIMIT=10000 EPOCHS=3 BATCH=128 by default; ONLY=REGEX keeps the jobs whose label matches
#   (e.g. ONLY=vit). The sgr jobs and the PyTorch jobs run as two streams side by side, one
#   thread each (the comparison is of accuracy, not time).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/compare-accuracy}
python=${PYTHON:-python3}
limit=${LIMIT:-10000}
epochs=${EPOCHS:-3}
mkdir -p "$out"
cargo build --release -p sgr-cli -q
sgr=target/release/sgr
common="--dataset fashion-mnist --train-limit $limit --epochs $epochs --batch-size ${BATCH:-128} --seed 0"
resnet="--model resnet18 --lr 0.05"
vit="--model vit-cifar --optimizer adamw --lr 1e-3 --weight-decay 0.05 --warmup-epochs 0.5"
# label|flags (the same flags for both implementations)
jobs=(
  "resnet18 bp|$resnet --method bp"
  "resnet18 sgr K=2|$resnet --method sgr --modules 2"
  "vit-cifar bp|$vit --method bp"
  "vit-cifar sgr K=2 (lambda 0.01)|$vit --method sgr --modules 2 --sgr-lambda 0.01"
)
if [ -n "${ONLY:-}" ]; then
  kept=()
  for j in "${jobs[@]}"; do
    if [[ "${j%%|*}" =~ $ONLY ]]; then kept+=("$j"); fi
  done
  jobs=("${kept[@]}")
fi
run_sgr() {
  local i=0
  for j in "${jobs[@]}"; do
    RAYON_NUM_THREADS=1 "$sgr" train ${j#*|} $common --workers 1 --out "$out/sgr-$i" --overwrite \
      > "$out/sgr-$i.log" 2>&1
    i=$((i + 1))
  done
}
run_torch() {
  local i=0
  for j in "${jobs[@]}"; do
    "$python" scripts/torch_train.py ${j#*|} $common --threads 1 > "$out/torch-$i.jsonl" 2> "$out/torch-$i.log"
    i=$((i + 1))
  done
}
run_sgr &
a=$!
run_torch &
b=$!
wait $a $b
printf '| model, method | sgr test acc | PyTorch test acc | difference (points) |\n|---|---|---|---|\n'
i=0
for j in "${jobs[@]}"; do
  "$python" - "${j%%|*}" "$out/sgr-$i/summary.json" "$out/torch-$i.jsonl" <<'PY'
import json, sys
label, s, t = sys.argv[1], json.load(open(sys.argv[2])), None
for line in open(sys.argv[3]):
    line = line.strip()
    if line.startswith("{") and "final_test_accuracy" in line:
        t = json.loads(line)
a, b = s["test_accuracy"], t["final_test_accuracy"]
print(f"| {label} | {a:.4f} | {b:.4f} | {100 * (a - b):+.2f} |")
PY
  i=$((i + 1))
done
