#!/usr/bin/env bash
# The GPU check of sgr in one command, on a machine with an NVIDIA GPU and the python3 that holds
# a CUDA build of torch (its site-packages give the CUDA 13 and cuDNN 9 libraries):
#   1. the device tests (tests/device.rs) with SGR_TEST_DEVICE=cuda;
#   2. `sgr bench` and scripts/torch_reference.py side by side, each pair back to back, on
#      ResNet-50 and DeiT-S at 224×224 (batch 64, 1000 classes) and ResNet-32 at CIFAR shapes
#      (batch 128, 10 classes), for bp, greedy K=4 and sgr K=4 (forward difference);
#   3. check.json (everything) and check.md (the table and the targets) in OUT.
# Estimated at about 5 minutes on an H200 (not yet run on a GPU). Prepare it here with
# scripts/device/pack.sh.
#
# Usage: scripts/device/check.sh [OUT]     (default: $OUT, else target/device-check)
# Environment: PACK (default target/device-pack), PYTHON (default python3), STEPS (timed steps
# per measurement, default 10), PAIRS (pairs per cell, default 1), SGR_CHECK_DEVICE (default
# cuda; cpu tries the script on a machine without a GPU), MODELS (default "resnet50 deit-s
# resnet32"), SKIP_TESTS=1.
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
out=${1:-${OUT:-target/device-check}}
pack=${PACK:-target/device-pack}
python=${PYTHON:-python3}
steps=${STEPS:-10}
pairs=${PAIRS:-1}
device=${SGR_CHECK_DEVICE:-cuda}
models=${MODELS:-resnet50 deit-s resnet32}
mkdir -p "$out"
out=$(cd "$out" && pwd)
exec > >(tee -a "$out/check.log") 2>&1

die() {
    echo "error: $1" >&2
    shift
    for h in "$@"; do echo "help: $h" >&2; done
    exit 1
}
started=$(date +%s)
stamp() { echo "[$(($(date +%s) - started)) s] $*"; }

# --- the binaries ---------------------------------------------------------------------------------
work=$(mktemp -d /tmp/sgr-check.XXXXXX)
for name in sgr device-tests; do
    [[ -f $pack/$name.xz ]] || die "$pack/$name.xz is missing" \
        "run scripts/device/pack.sh on the build machine and carry $pack"
    # Python's lzma, so that the GPU machine needs no xz.
    "$python" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        "$pack/$name.xz" "$work/$name" || die "cannot unpack $pack/$name.xz" "pack it again with scripts/device/pack.sh"
    chmod +x "$work/$name"
done
sgr=$work/sgr
tests=$work/device-tests
stamp "binaries of commit $(cat "$pack/commit" 2>/dev/null || echo unknown) unpacked into $work"

# --- the libraries --------------------------------------------------------------------------------
site=$("$python" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))') ||
    die "\`$python\` cannot import torch" "set PYTHON to the python3 that holds a CUDA build of torch"
export LD_LIBRARY_PATH=$site/nvidia/cu13/lib:$site/nvidia/cudnn/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
for bin in "$sgr" "$tests"; do
    if ldd "$bin" | grep -q "not found"; then
        ldd "$bin" | grep "not found"
        die "$(basename "$bin") misses the libraries above with LD_LIBRARY_PATH=$LD_LIBRARY_PATH" \
            "install torch's CUDA 13 wheels (nvidia-cuda-runtime, nvidia-cublas, nvidia-curand, nvidia-cudnn-cu13) for $python"
    fi
done
stamp "libraries found under $site/nvidia"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"; } > "$out/gpu.txt"
"$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())' >> "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"

# --- 1. the device tests --------------------------------------------------------------------------
if [[ ${SKIP_TESTS:-0} != 1 ]]; then
    stamp "device tests (SGR_TEST_DEVICE=$device)"
    SGR_TEST_DEVICE=$device timeout 300 "$tests" --test-threads 1 > "$out/tests.log" 2>&1
    echo "exit $?" >> "$out/tests.log"
    grep -E "^test |test result|panicked|exit" "$out/tests.log"
fi

# --- 2. sgr bench against PyTorch -----------------------------------------------------------------
shape() {
    case $1 in
        resnet32) echo "--input-size 32 --in-channels 3 --classes 10 --batch-size 128" ;;
        *) echo "--input-size 224 --in-channels 3 --classes 1000 --batch-size 64" ;;
    esac
}
methods=("bp" "greedy --modules 4" "sgr --modules 4 --sgr-grad forward-difference")
: > "$out/bench.jsonl"
for model in $models; do
    for m in "${methods[@]}"; do
        for pair in $(seq "$pairs"); do
            common="--model $model $(shape "$model") --steps $steps --method $m"
            stamp "$model $m (pair $pair)"
            # shellcheck disable=SC2086
            s=$(timeout 180 "$sgr" bench $common --device "$device" --json 2> "$work/sgr.err" | tail -n 1)
            se=$(tail -n 3 "$work/sgr.err")
            # shellcheck disable=SC2086
            t=$(timeout 180 "$python" scripts/torch_reference.py $common --device "$device" 2> "$work/torch.err" | tail -n 1)
            te=$(tail -n 3 "$work/torch.err")
            "$python" - "$model" "$m" "$pair" "$s" "$se" "$t" "$te" >> "$out/bench.jsonl" <<'PY'
import json, sys
model, method, pair, s, se, t, te = sys.argv[1:]
def parse(text, err):
    try:
        return json.loads(text), None
    except ValueError:
        return None, (err or text or "no output").strip()
sv, serr = parse(s, se)
tv, terr = parse(t, te)
print(json.dumps({"model": model, "method": method, "pair": int(pair), "sgr": sv, "sgr_error": serr,
                  "torch": tv, "torch_error": terr}))
PY
            tail -n 1 "$out/bench.jsonl" | "$python" -c 'import json, sys
r = json.loads(sys.stdin.read())
f = lambda v: "%.1f img/s" % v["images_per_s"] if v else "failed"
print("   sgr", f(r["sgr"]), r["sgr_error"] or "", "| torch", f(r["torch"]), r["torch_error"] or "")'
        done
    done
done

# --- 3. the report --------------------------------------------------------------------------------
"$python" scripts/device/report.py "$out" || die "report.py failed" "the raw results are in $out/bench.jsonl"
stamp "done: $out/check.md, $out/check.json"
rm -rf "$work"
