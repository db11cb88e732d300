#!/usr/bin/env bash
# Builds sgr with `--features cuda,cudnn` from PyPI's CUDA 13.0 wheels: no system CUDA, no GPU
# and no NVIDIA driver needed on the building machine.
#
#   scripts/cuda/build.sh           release build of sgr-cli; the last line printed is the
#                                   binary's absolute path
#   scripts/cuda/build.sh --check   clippy (-D warnings) of the whole workspace with the
#                                   cuda/cudnn features, in the same target dir: use it on every
#                                   change that touches device (cfg(feature = "cuda")) code
#   scripts/cuda/build.sh --tests   release build of the device tests (tests/device.rs) with
#                                   the cudnn feature; the last line printed is the test binary's
#                                   absolute path (run it with SGR_TEST_DEVICE=cuda)
#
# Environment:
#   SGR_CUDA_VENV        the venv that holds the wheels (default: target/cuda-venv)
#   SGR_CUDA_TARGET_DIR  cargo's target dir for CUDA builds (default: target/cuda)
#   CUDA_COMPUTE_CAP     GPU architecture the kernels are compiled for (default: 90, H100/H200)
#   PYTHON               the Python 3 that creates the venv (default: python3)
#
# The first build compiles candle-kernels with nvcc (~30 min on 2 cores, libmoe.a alone ~17 min).
# Everything goes to one dedicated target dir so that this happens once; `--check` reuses it
# (it runs in the release profile on purpose: the kernels are build-script output of that profile).
# On busy machines run it as `nice -n 10 env CARGO_BUILD_JOBS=2 scripts/cuda/build.sh`.
#
# Running the binary needs the CUDA 13 and cuDNN 9 libraries on the loader path (on a machine
# with the wheels: LD_LIBRARY_PATH=<venv>/.../nvidia/cu13/lib:<venv>/.../nvidia/cudnn/lib) and the
# NVIDIA driver's libcuda.so.1 for --device cuda only: cudarc loads it at first use (vendor/README.md,
# change 3), so without a driver the binary still trains on the CPU.
set -euo pipefail
# Every early exit says why: `die` below for the expected ones, this trap for any other command
# that fails under `set -e` (a bare `$(...)` failure would otherwise end the script silently).
trap 'rc=$?; echo "error: $0 stopped at line $LINENO: \`$BASH_COMMAND\` exited with status $rc" >&2' ERR

# The wheels, pinned exactly; nvcc stays on 13.0.x.
WHEELS=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-cccl==13.0.85
    nvidia-cuda-runtime==13.0.96
    nvidia-cublas==13.1.0.3
    nvidia-curand==10.4.0.35
    nvidia-cuda-nvrtc==13.0.88
    nvidia-cudnn-cu13==9.19.0.56
)
# Each crate's cudnn feature (which implies its cuda feature).
FEATURES=sgr-kernels/cudnn,sgr-core/cudnn,sgr-models/cudnn,sgr-data/cudnn,sgr-run/cudnn,sgr-cli/cudnn

die() {
    # error: what went wrong / help: what to do about it (ripgrep style)
    echo "error: $1" >&2
    shift
    for h in "$@"; do echo "help: $h" >&2; done
    exit 1
}

mode=build
case ${1:-} in
    "") ;;
    --check) mode=check ;;
    --tests) mode=tests ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *) die "unknown argument \`$1\`" "run \`$0 --help\` for usage" ;;
esac
[[ $# -le 1 ]] || die "too many arguments" "run \`$0 --help\` for usage"

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
venv=${SGR_CUDA_VENV:-$root/target/cuda-venv}
target_dir=${SGR_CUDA_TARGET_DIR:-$root/target/cuda}
mkdir -p "$target_dir"
target_dir=$(cd "$target_dir" && pwd)

# --- 1. the wheels --------------------------------------------------------------------------------
python=${PYTHON:-python3}
if [[ ! -x $venv/bin/python ]]; then
    command -v "$python" >/dev/null 2>&1 ||
        die "\`$python\` not found: it is needed to install the CUDA 13.0 wheels from PyPI" \
            "install Python 3 with venv and pip (Debian: apt-get install python3 python3-venv python3-pip)" \
            "or set PYTHON to a Python 3 interpreter, or SGR_CUDA_VENV to a venv that has the wheels"
    echo "creating venv $venv" >&2
    "$python" -m venv "$venv" ||
        die "\`$python -m venv $venv\` failed" \
            "install the venv module (Debian: apt-get install python3-venv), or set SGR_CUDA_VENV to an existing venv"
fi
vpy=$venv/bin/python
"$vpy" -m pip --version >/dev/null 2>&1 ||
    die "pip is missing from the venv $venv" \
        "run \`$vpy -m ensurepip\` (Debian: apt-get install python3-pip python3-venv), or delete $venv and rerun"

# Prints the wheels that are not installed at exactly the pinned version.
missing=$("$vpy" - "${WHEELS[@]}" <<'EOF'
import sys
from importlib import metadata
for spec in sys.argv[1:]:
    name, want = spec.split("==")
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        have = None
    if have != want:
        print(spec)
EOF
)
if [[ -n $missing ]]; then
    echo "installing CUDA 13.0 wheels into $venv:" $missing >&2
    # --no-deps: the wheels' own dependencies are the other wheels pinned above, nothing else.
    "$vpy" -m pip install --no-deps --no-input --disable-pip-version-check "${WHEELS[@]}" >&2 ||
        die "pip could not install the CUDA 13.0 wheels (its output is above)" \
            "check that PyPI is reachable and that ~2 GB are free under $venv, then rerun $0" \
            "or set SGR_CUDA_VENV to a venv that has exactly: ${WHEELS[*]}"
else
    echo "CUDA 13.0 wheels already installed in $venv" >&2
fi

site=$("$vpy" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cuda=$site/nvidia/cu13
cudnn=$site/nvidia/cudnn
for f in "$cuda/bin/nvcc" "$cuda/nvvm/bin/cicc" "$cuda/include/cuda_runtime.h" "$cuda/lib/libcudart.so.13" \
    "$cuda/lib/libcublas.so.13" "$cudnn/include/cudnn_version.h" "$cudnn/lib/libcudnn.so.9"; do
    [[ -e $f ]] || die "$f is missing: the wheels in $venv are incomplete" \
        "delete $venv and rerun $0 to reinstall them"
done

# --- 2. what the linker needs that no wheel has ---------------------------------------------------
# Unversioned names (libcublas.so -> libcublas.so.13), which `-lcublas` looks for.
for lib in "$cuda"/lib/lib*.so.* "$cudnn"/lib/lib*.so.*; do
    base=$(basename "$lib")
    link=$(dirname "$lib")/${base%%.so.*}.so
    [[ -e $link || -L $link ]] || ln -s "$base" "$link"
done

# A link-only libcuda.so (the driver's library), in a folder of its own that only the link search
# path (LIBRARY_PATH) sees. NEVER ship it: never copy it next to the binary, never add it to an
# rpath or LD_LIBRARY_PATH; at run time the binary must get the real driver's libcuda.so.1.
cudarc_version=$(awk '/^name = "cudarc"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)
[[ -n $cudarc_version ]] || die "cudarc is not in Cargo.lock" "this script expects candle-core's cuda feature to pull in cudarc"
# Prints cudarc's source folder in the cargo registry, or nothing (and still succeeds) when it is
# not there yet: a failing `$(...)` would end the script under `set -e` before the fetch below.
find_cudarc() {
    local dir
    for dir in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"cudarc-$cudarc_version"; do
        if [[ -d $dir ]]; then
            echo "$dir"
            return 0
        fi
    done
    return 0
}
cudarc_src=$(find_cudarc)
if [[ -z $cudarc_src ]]; then
    cargo fetch --locked >&2 || die "\`cargo fetch\` failed, so cudarc's source is not available" "check that crates.io is reachable"
    cudarc_src=$(find_cudarc)
    [[ -n $cudarc_src ]] || die "cudarc $cudarc_version's source not found in the cargo registry" "run \`cargo fetch\` and rerun $0"
fi
stub_dir=$target_dir/libcuda-stub
sys_rs=$cudarc_src/src/driver/sys/mod.rs
if [[ ! -f $stub_dir/libcuda.so || $sys_rs -nt $stub_dir/libcuda.so || $root/scripts/cuda/libcuda_stub.sh -nt $stub_dir/libcuda.so ]]; then
    "$root/scripts/cuda/libcuda_stub.sh" "$stub_dir" "$sys_rs"
fi

# --- 3. the environment the build scripts read ----------------------------------------------------
# cudarc's build.rs: link search under $CUDA_HOME, $CUDA_PATH, $CUDA_ROOT, $CUDNN_LIB (each /lib);
# `nvcc --version` from PATH gives the CUDA version. candle-kernels (cudaforge): nvcc from NVCC /
# PATH / CUDA_HOME; the GPU architecture from CUDA_COMPUTE_CAP (there is no nvidia-smi here).
export CUDA_HOME=$cuda CUDA_PATH=$cuda CUDA_ROOT=$cuda CUDNN_LIB=$cudnn
export NVCC=$cuda/bin/nvcc
export PATH=$cuda/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
# The wheels' libraries for the linker: candle-kernels links libcudart itself, and with cudarc's
# dynamic loading (vendor/README.md, change 3) no crate adds the CUDA library folder any more.
export LIBRARY_PATH=$stub_dir:$cuda/lib:$cudnn/lib${LIBRARY_PATH:+:$LIBRARY_PATH}
export CARGO_TARGET_DIR=$target_dir

# --- 4. cargo -------------------------------------------------------------------------------------
if [[ $mode == check ]]; then
    if cargo clippy --version >/dev/null 2>&1; then
        cargo clippy --release --workspace --all-targets --features "$FEATURES" -- -D warnings
    else
        echo "note: clippy is not installed (rustup component add clippy); running cargo check" >&2
        cargo check --release --workspace --all-targets --features "$FEATURES"
    fi
    exit 0
fi

if [[ $mode == tests ]]; then
    # The test binary's path is in cargo's JSON messages (its name carries a hash).
    bin=$(cargo test --release -p sgr-integration-tests --features sgr-integration-tests/cudnn \
        --test device --no-run --message-format=json |
        "$vpy" -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "device":
        print(m["executable"])')
    [[ -n $bin && -x $bin ]] || die "cargo finished but the device test binary was not reported" \
        "run \`cargo test -p sgr-integration-tests --features cudnn --test device --no-run\` by hand"
    echo "run it with: SGR_TEST_DEVICE=cuda LD_LIBRARY_PATH=$cuda/lib:$cudnn/lib $bin --test-threads 1" >&2
    echo "$bin"
    exit 0
fi

cargo build --release -p sgr-cli --features sgr-cli/cuda,sgr-cli/cudnn
bin=$target_dir/release/sgr
[[ -x $bin ]] || die "cargo finished but $bin is missing" "look for the binary's name under $target_dir/release"
echo "run it with: LD_LIBRARY_PATH=$cuda/lib:$cudnn/lib (and, for --device cuda, the NVIDIA driver)" >&2
echo "$bin"
