#!/usr/bin/env bash
# The measurements quoted in the README, side by side in one run on one machine.
# Usage: scripts/bench_report.sh [--quick]   (needs a release build: cargo build --release -p sgr-cli)
set -euo pipefail
cd "$(dirname "$0")/.."
sgr=target/release/sgr
steps=${STEPS:-5}

echo "## SGR step cost, default job shape (ResNet-20 K=4, batch 64, 1x8x8)"
for args in "--method bp" "--method greedy" "--method sgr --sgr-grad finite-difference" "--method sgr --sgr-grad forward-difference" "--method sgr --sgr-grad exact"; do
  $sgr bench --model resnet20 --in-channels 1 --input-size 8 --batch-size 64 --steps "$steps" $args
done

if [ "${1:-}" != "--quick" ]; then
  echo "## ResNet-32, batch 128, 3x32x32 (InfoPro K=16 = one module per block)"
  for args in "--method bp" "--method greedy --modules 16" "--method sgr --modules 16 --sgr-grad finite-difference" "--method sgr --modules 16 --sgr-grad forward-difference" "--method sgr --modules 16 --sgr-grad exact"; do
    $sgr bench --model resnet32 --batch-size 128 --steps 5 $args
  done
  echo "## Activation memory, ResNet-110 batch 128, K=16 (InfoPro split)"
  $sgr inspect --model resnet110 --modules 16 --batch-size 128 | tail -n 1
fi
