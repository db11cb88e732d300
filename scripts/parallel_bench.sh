#!/usr/bin/env bash
# Module-parallel training against the sequential schedule (docs/parallel.md, "Results"):
# `sgr bench --json` on random CIFAR-shaped batches, the sequential run on the process's threads
# against `--pipeline 2 --pipeline-threads 1`, in interleaved pairs (the order alternates), then
# one pipelined record per K in 2 4 8 for the scaling model (per-module step times and message
# sizes). Appends to OUT (default docs/results/parallel/bench.jsonl, emptied first);
# `python3 scripts/parallel_table.py` prints the tables.
# Usage: scripts/parallel_bench.sh [PAIRS]   (default 3; STEPS timed steps per record, default 6)
set -euo pipefail
cd "$(dirname "$0")/.."
sgr=${SGR:-target/release/sgr}
out=${OUT:-docs/results/parallel/bench.jsonl}
pairs=${1:-3}
steps=${STEPS:-6}
if [ ! -x "$sgr" ]; then
  cargo build --release -p sgr-cli -q
fi
mkdir -p "$(dirname "$out")"
: > "$out"
sgr_fd="--method greedy+sgr --sgr-grad forward-difference --batch-size 128"
cases=(
  "resnet32-k2|--model resnet32 -k 2 --split balanced $sgr_fd"
  "resnet32-k4|--model resnet32 -k 4 --split balanced $sgr_fd"
  "vit-cifar-k2|--model vit-cifar -k 2 $sgr_fd"
)
record() { # CASE MODE PAIR FLAGS...
  local case=$1 mode=$2 pair=$3
  shift 3
  "$sgr" bench "$@" --steps "$steps" --json |
    python3 -c 'import json,sys; r=json.load(sys.stdin); r.update(case=sys.argv[1], mode=sys.argv[2], pair=int(sys.argv[3])); print(json.dumps(r))' \
      "$case" "$mode" "$pair" >> "$out"
  echo "$case $mode pair $pair: $(tail -1 "$out" | python3 -c 'import json,sys; r=json.load(sys.stdin); print("%.1f img/s" % r["images_per_s"])')" >&2
}
for pair in $(seq 1 "$pairs"); do
  for c in "${cases[@]}"; do
    name=${c%%|*}
    flags=${c#*|}
    modes=(sequential pipeline)
    [ $((pair % 2)) -eq 0 ] && modes=(pipeline sequential)
    for mode in "${modes[@]}"; do
      if [ "$mode" = pipeline ]; then
        # shellcheck disable=SC2086
        record "$name" "$mode" "$pair" $flags --pipeline 2 --pipeline-threads 1
      else
        # shellcheck disable=SC2086
        record "$name" "$mode" "$pair" $flags
      fi
    done
  done
done
# The scaling model's inputs: K modules, one per worker (the step times that matter are the
# per-module ones, measured before the pipeline starts).
steps=2
for k in 2 4 8; do
  # shellcheck disable=SC2086
  record "resnet32-model-k$k" model 0 --model resnet32 -k "$k" --split balanced $sgr_fd \
    --pipeline "$k" --pipeline-threads 1
done
