#!/usr/bin/env bash
# Builds the CUDA binaries here (no GPU needed) and stages everything scripts/gpu-check.sh needs
# on the GPU machine into .gpu/ (git-ignored; carry it to the device):
#   .gpu/bin/{fluxflow,gpu-tests}.xz        the cuda build and the GPU test binary
#   .gpu/fluxref/, .gpu/bench_reference.py  the PyTorch reference's models and step benchmark
#   .gpu/prof/                              the CUPTI kernel tracer (scripts/gpu-trace/)
#
#   scripts/gpu-pack.sh CUDA_DIR REFERENCE_GIT_DIR [--compute-cap 90]
#
# CUDA_DIR is where scripts/cuda-toolchain.sh installed (it is run if needed); REFERENCE_GIT_DIR
# a clone of danny-mio/fluxflow-core (its model files are copied, never committed).
set -euo pipefail
[[ $# -ge 2 ]] || { echo "usage: $0 CUDA_DIR REFERENCE_GIT_DIR [--compute-cap N]" >&2; exit 2; }
CUDA_DIR=$1; REF=$2; shift 2
CAP=90
[[ ${1:-} == --compute-cap ]] && CAP=${2:?}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
SHARED=${FLUXFLOW_SHARED:-$ROOT/../shared}

scripts/cuda-toolchain.sh "$CUDA_DIR" --compute-cap "$CAP"
# shellcheck disable=SC1091
source "$CUDA_DIR/env.sh"
TD=target/cuda
cargo build --release --locked --features cuda --target-dir "$TD"
test_bin=$(cargo test --release --locked --features cuda --target-dir "$TD" --test gpu --no-run \
             --message-format=json 2>/dev/null |
           python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="gpu" and m.get("executable"):
        print(m["executable"])')
[[ -n $test_bin ]] || { echo "the gpu test binary was not built" >&2; exit 1; }

rm -rf .gpu && mkdir -p .gpu/bin .gpu/fluxref
# Stripped and xz-compressed (candle's PTX makes each binary ~60 MB; the device call carries
# at most 64 MiB); scripts/gpu-check.sh unpacks them.
strip -o .gpu/bin/fluxflow "$TD/release/fluxflow"
strip -o .gpu/bin/gpu-tests "$test_bin"
xz -T2 -6 -f .gpu/bin/fluxflow .gpu/bin/gpu-tests

# The test fixtures travel with the working tree (tests/fixtures, see scripts/gpu-check.sh).

for f in activations conditioning vae flow encoders; do
  git -C "$REF" show "HEAD:src/fluxflow/models/$f.py" > ".gpu/fluxref/$f.py"
done
touch .gpu/fluxref/__init__.py
# The CUPTI kernel tracer (scripts/gpu-trace/): CUPTI's headers and library from NVIDIA's wheel.
CUPTI=$CUDA_DIR/cupti
if [[ ! -f $CUPTI/.installed ]]; then
  "${PYTHON:-python3}" -m pip install --quiet --disable-pip-version-check --no-deps --no-compile \
    --upgrade --target "$CUPTI" nvidia-cuda-cupti==13.0.85
  touch "$CUPTI/.installed"
fi
mkdir -p .gpu/prof
cc -O2 -shared -fPIC -o .gpu/prof/libfluxprof.so scripts/gpu-trace/fluxprof.c \
  -I"$CUPTI/nvidia/cu13/include" -I"$CUDA_HOME/include" -L"$CUPTI/nvidia/cu13/lib" \
  -l:libcupti.so.13 -lpthread
cp "$CUPTI"/nvidia/cu13/lib/libcupti.so.13 .gpu/prof/
cp scripts/gpu-trace/summarize.py .gpu/prof/

cp "$SHARED/reference-bench/bench_reference.py" .gpu/
cp scripts/step_flops.py .gpu/
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
du -sh .gpu
