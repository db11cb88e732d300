#!/usr/bin/env bash
# One epoch of sgr train on 5120 Fashion-MNIST images, one process against MPI ranks, in
# interleaved pairs (docs/parallel.md, "Across processes"). Prints one JSON line per run:
# {"layout", "model", "k", "train_seconds", "test_accuracy"}. Needs target/release/sgr built
# with --features mpi, mpirun, and Debian's dataset-fashion-mnist.
#
# Usage: scripts/mpi_bench.sh [PAIRS] [MODEL] [K]   (defaults: 3 resnet32 4)
# REPLICAS=2 runs the 2 ranks as 2 data-parallel copies (--replicas 2) instead of 2 pipeline
# stages; their model then differs from the one process's by the shards' batch-norm
# statistics, so it is not compared bit for bit.
set -euo pipefail
cd "$(dirname "$0")/.."
pairs=${1:-3}
model=${2:-resnet32}
k=${3:-4}
sgr=${SGR:-target/release/sgr}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
args=(train --model "$model" -k "$k" --dataset fashion-mnist --train-limit 5120 --epochs 1
  --batch-size 128 --method greedy+sgr --sgr-grad finite-difference --workers 1)
report() { # LAYOUT DIR
  python3 - "$1" "$2" "$model" "$k" <<'PY'
import json, sys
layout, d, model, k = sys.argv[1:]
s = json.load(open(d + "/summary.json"))
r = {"layout": layout, "model": model, "k": int(k),
     "train_seconds": round(s["train_seconds"], 2), "test_accuracy": s["test_accuracy"]}
peaks = s.get("rank_peak_memory_bytes") or [s.get("peak_memory_bytes") or 0]
r["peak_mib"] = [p // 2**20 for p in peaks]
print(json.dumps(r))
PY
}
for i in $(seq "$pairs"); do
  RAYON_NUM_THREADS=2 "$sgr" "${args[@]}" --out "$out/one$i" > /dev/null
  report "1 process x 2 threads" "$out/one$i"
  if [[ -n ${REPLICAS:-} ]]; then
    RAYON_NUM_THREADS=1 mpirun -np 2 "$sgr" "${args[@]}" --distributed mpi --replicas "$REPLICAS" \
      --out "$out/mpi$i" > /dev/null
    report "2 MPI ranks x 1 thread, $REPLICAS replicas" "$out/mpi$i"
    continue
  fi
  RAYON_NUM_THREADS=1 mpirun -np 2 "$sgr" "${args[@]}" --distributed mpi --out "$out/mpi$i" > /dev/null
  report "2 MPI ranks x 1 thread" "$out/mpi$i"
  cmp -s "$out/one$i/model.safetensors" "$out/mpi$i/model.safetensors" \
    || { echo "error: the MPI run's model differs from the one-process run's" >&2; exit 1; }
done
