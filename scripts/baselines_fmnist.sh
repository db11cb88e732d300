#!/usr/bin/env bash
# The baselines with and without SGR on real data (docs/baselines.md): Fashion-MNIST padded to
# 32×32, ResNet-32 cut into K=16 modules (one per block), 10 000 training images, the full test
# set, 5 epochs, batch 128, SGD (Nesterov 0.9, wd 5e-4), lr 0.05 cosine.
#
# Usage: scripts/baselines_fmnist.sh [OUT_DIR] [PHASE...]
#   Phases, in order when none is named:
#     val    the SGR settings, chosen on 5 000 images held out of the training set
#            (--validation 5000) with greedy+sgr; the best by validation accuracy is used below
#            (greedy itself, λ = 0, runs there too, for comparison)
#     main   bp, greedy, dgl, infopro, infopro-contrast, each but bp also with +sgr, seed 0
#     seeds  the best local baseline of `main` (lowest test error) and its +sgr, seeds 1 and 2
#   A run whose summary.json exists is skipped; one with a checkpoint is resumed, so the script
#   can be stopped and started again. SGR=path picks the binary (default: a release build);
#   THREADS (default 1) is the number of compute threads of each run.
#
#   Each finished run's record (summary.json, metrics.jsonl, config.json: a few KiB, no
#   weights) is copied to RECORD (default docs/results/baselines-fmnist), which is committed, so
#   the tables survive a fresh checkout; runs recorded there are not run again.
#   SGR_FLAGS (e.g. "--sgr-distance squared-l2 --sgr-lambda 1 --sgr-grad forward-difference")
#   and BEST (e.g. dgl) give the val phase's choice and the main phase's best baseline when
#   those runs' records are not at hand (docs/baselines.md gives both). METHODS (default
#   "bp greedy dgl infopro infopro-contrast") limits the main phase to some methods.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/baselines}
shift || true
phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(val main seeds)
mkdir -p "$out"
record=${RECORD:-docs/results/baselines-fmnist}
mkdir -p "$record"
if [ -z "${SGR:-}" ]; then
  cargo build --release -p sgr-cli -q
  SGR=target/release/sgr
fi
threads=${THREADS:-1}
common="--model resnet32 --dataset fashion-mnist --epochs 5 --batch-size 128 --lr 0.05 --workers 1"
# The SGR settings tried on the validation split: distance, lambda.
candidates=("cosine 0.1" "cosine 1" "squared-l2 1")

run() { # NAME FLAGS...
  local name=$1
  shift
  local dir="$out/$name"
  if [ -f "$record/$name/summary.json" ]; then return; fi
  if [ -f "$dir/summary.json" ]; then keep "$name"; return; fi
  echo "== $name: $*" >&2
  if [ -f "$dir/config.json" ] && ls "$dir"/checkpoint* > /dev/null 2>&1; then
    RAYON_NUM_THREADS=$threads "$SGR" train --resume "$dir" --workers 1 > "$dir.log" 2>&1
  else
    RAYON_NUM_THREADS=$threads "$SGR" train $common "$@" --out "$dir" --overwrite > "$dir.log" 2>&1
  fi
  tail -1 "$dir.log" >&2
  keep "$name"
}

keep() { # NAME: copies a finished run's record (no weights) to $record
  local dir="$out/$1"
  [ -f "$dir/summary.json" ] || return 0
  mkdir -p "$record/$1"
  for f in config.json metrics.jsonl summary.json; do
    [ -f "$dir/$f" ] && cp "$dir/$f" "$record/$1/$f.tmp" && mv "$record/$1/$f.tmp" "$record/$1/$f"
  done
  return 0
}

summary() { # NAME: the run's summary.json, from the record or else the run folder
  if [ -f "$record/$1/summary.json" ]; then echo "$record/$1/summary.json"; else echo "$out/$1/summary.json"; fi
}

# The chosen SGR flags: the candidate with the best validation accuracy.
chosen() {
  if [ -n "${SGR_FLAGS:-}" ]; then echo "$SGR_FLAGS"; return; fi
  local best="" acc=-1
  for c in "${candidates[@]}"; do
    set -- $c
    local f
    f=$(summary "val-sgr-$1-$2")
    [ -f "$f" ] || continue
    local a
    a=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["test_accuracy"])' "$f")
    if python3 -c 'import sys; sys.exit(0 if float(sys.argv[1]) > float(sys.argv[2]) else 1)' "$a" "$acc"; then
      best="--sgr-distance $1 --sgr-lambda $2"
      acc=$a
    fi
  done
  [ -n "$best" ] || { echo "no validation run has finished: run the val phase first" >&2; exit 1; }
  echo "$best --sgr-grad forward-difference"
}

for phase in "${phases[@]}"; do
  case $phase in
    val)
      for c in "${candidates[@]}"; do
        set -- $c
        run "val-sgr-$1-$2" --method sgr --sgr-grad forward-difference --sgr-distance "$1" \
          --sgr-lambda "$2" --modules 16 --validation 5000 --train-limit 10000 --seed 0
      done
      run val-greedy --method greedy --modules 16 --validation 5000 --train-limit 10000 --seed 0
      ;;
    main)
      sgr_flags=$(chosen)
      echo "SGR settings chosen on the validation split: $sgr_flags" >&2
      for m in ${METHODS:-bp greedy dgl infopro infopro-contrast}; do
        if [ "$m" = bp ]; then
          run bp --method bp --modules 1 --train-limit 10000 --seed 0
          continue
        fi
        run "$m" --method "$m" --modules 16 --train-limit 10000 --seed 0
        run "$m+sgr" --method "$m+sgr" $sgr_flags --modules 16 --train-limit 10000 --seed 0
      done
      ;;
    seeds)
      sgr_flags=$(chosen)
      best=${BEST:-$(python3 - "$out" "$record" <<'EOF'
import json, os, sys
errs = {}
for m in ["greedy", "dgl", "infopro", "infopro-contrast"]:
    for folder in (sys.argv[2], sys.argv[1]):
        f = os.path.join(folder, m, "summary.json")
        if os.path.exists(f):
            break
    if os.path.exists(f):
        errs[m] = json.load(open(f))["test_error"]
if len(errs) < 4:
    sys.exit("the main phase has not finished")
print(min(errs, key=errs.get))
EOF
)}
      echo "best local baseline of the main phase: $best" >&2
      for seed in 1 2; do
        run "$best-seed$seed" --method "$best" --modules 16 --train-limit 10000 --seed "$seed"
        run "$best+sgr-seed$seed" --method "$best+sgr" $sgr_flags --modules 16 --train-limit 10000 \
          --seed "$seed"
      done
      ;;
    *)
      echo "unknown phase \`$phase\`: use val, main or seeds" >&2
      exit 2
      ;;
  esac
done
