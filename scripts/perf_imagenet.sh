#!/usr/bin/env bash
# Issue 27's targets, side by side on this machine: sgr against PyTorch (timm's and
# torchvision's own models through scripts/torch_reference.py) at the same shapes and thread
# count, PAIRS interleaved pairs per row, and SGR against greedy on DeiT-S K=4. Appends every
# measurement to docs/results/perf27/runs.jsonl and prints the ratio tables.
# Usage: PYTHON=/path/to/python-with-torch-and-timm scripts/perf_imagenet.sh [PAIRS]
set -euo pipefail
cd "$(dirname "$0")/.."
pairs=${1:-2}
export RAYON_NUM_THREADS=${THREADS:-2}
python=${PYTHON:-python3}
sgr=${SGR_BIN:-target/release/sgr}
[ -n "${SGR_BIN:-}" ] || cargo build --release -p sgr-cli -q
out=docs/results/perf27/runs.jsonl
mkdir -p "$(dirname "$out")"
rows=(
  "deit-s|--input-size 224 --classes 1000 --batch-size 16 --steps 3"
  "resnet50|--input-size 224 --classes 1000 --batch-size 16 --steps 3"
  "vit-cifar|--input-size 32 --classes 10 --batch-size 128 --steps 5"
  "resnet32|--input-size 32 --classes 10 --batch-size 128 --steps 5"
)
for row in "${rows[@]}"; do
  model=${row%%|*}; args=${row#*|}
  for _ in $(seq "$pairs"); do
    c=$("$sgr" bench --model "$model" $args --in-channels 3 --method bp --json)
    t=$("$python" scripts/torch_reference.py --model "$model" $args --in-channels 3 --threads "$RAYON_NUM_THREADS" --method bp)
    printf '{"side":"sgr","model":"%s","report":%s}\n{"side":"torch","model":"%s","report":%s}\n' "$model" "$c" "$model" "$t" >> "$out"
  done
done
for _ in $(seq "$pairs"); do
  for m in "greedy --modules 4" "sgr --modules 4 --sgr-grad forward-difference"; do
    c=$("$sgr" bench --model deit-s --input-size 224 --classes 1000 --batch-size 16 --steps 3 --in-channels 3 --method $m --json)
    printf '{"side":"sgr","model":"deit-s","report":%s}\n' "$c" >> "$out"
  done
done
python3 scripts/perf_imagenet_table.py "$out"
