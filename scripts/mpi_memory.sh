#!/usr/bin/env bash
# Per-rank peak resident memory of `mpirun -np 2 sgr train --distributed mpi`, one binary
# against another (OLD: a build from before ranks held only their own modules), in
# interleaved pairs that alternate which runs first (docs/parallel.md, "Across processes",
# "Memory"). One epoch of Fashion-MNIST, batch 128, greedy+sgr with the finite difference,
# 1 compute thread per rank. Prints one JSON line per run:
# {"binary", "model", "k", "train_limit", "train_seconds", "test_accuracy", "peak_mib"}, and
# checks that both binaries write the same model file bit for bit.
#
# Usage: OLD=/path/to/old/sgr scripts/mpi_memory.sh [PAIRS] [MODEL] [K] [TRAIN_LIMIT]
#   (defaults: 3 resnet32 2 5120; NEW defaults to target/release/sgr built with --features mpi;
#   EXTRA adds arguments to both runs)
set -euo pipefail
cd "$(dirname "$0")/.."
pairs=${1:-3}
model=${2:-resnet32}
k=${3:-2}
limit=${4:-5120}
new=${NEW:-target/release/sgr}
old=${OLD:?set OLD to the sgr binary to compare with}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
read -r -a extra <<< "${EXTRA:-}"
args=(train --model "$model" -k "$k" --dataset fashion-mnist --train-limit "$limit" --epochs 1
  --batch-size 128 --method greedy+sgr --sgr-grad finite-difference --workers 1 "${extra[@]}")
run() { # NAME BINARY DIR
  RAYON_NUM_THREADS=1 mpirun -np 2 "$2" "${args[@]}" --distributed mpi --out "$3" > /dev/null
  python3 - "$1" "$3" "$model" "$k" "$limit" <<'PY'
import json, sys
name, d, model, k, limit = sys.argv[1:]
s = json.load(open(d + "/summary.json"))
print(json.dumps({"binary": name, "model": model, "k": int(k), "train_limit": int(limit),
                  "train_seconds": round(s["train_seconds"], 2),
                  "test_accuracy": s["test_accuracy"],
                  "peak_mib": [p // 2**20 for p in s["rank_peak_memory_bytes"]]}))
PY
}
for i in $(seq "$pairs"); do
  if (( i % 2 )); then
    run old "$old" "$out/old$i"; run new "$new" "$out/new$i"
  else
    run new "$new" "$out/new$i"; run old "$old" "$out/old$i"
  fi
  cmp -s "$out/old$i/model.safetensors" "$out/new$i/model.safetensors" \
    || { echo "error: the two binaries' models differ" >&2; exit 1; }
done
