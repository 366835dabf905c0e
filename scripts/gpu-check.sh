#!/usr/bin/env bash
# The whole GPU verification as one command, for one call of the device tool (<= 10 minutes):
#   1. the GPU test binary (tests/gpu.rs): tiny16 fixtures on CUDA, three training steps
#      against the CPU, the cuDNN convolutions against the CPU ops; twice, with the verified
#      CUDA paths and with FLUXFLOW_CUDA_UNVERIFIED=1;
#   2. `fluxflow bench --json` and the PyTorch reference's step (gradient checkpointing on,
#      float32 with PyTorch's defaults and under bf16 autocast) side by side at each size, plus
#      the FLOPs of a step;
#   3. a table of both (images/s, peak GPU memory, share of the GPU's bf16 peak).
# Prepare on the build machine with scripts/gpu-pack.sh (the GPU machine has no Rust), then on
# the GPU machine, from the repository root, with .gpu carried:
#   scripts/gpu-check.sh            # OUT=dir for the results (default gpu-out), SIZES="256 512 1024"
#                                   # TRACE="256:bf16" TRACE_REF="256": CUPTI kernel traces
set -uo pipefail
cd "$(dirname "$0")/.."
G=${GPU_DIR:-.gpu}
OUT=${OUT:-gpu-out}
SIZES=${SIZES-256 512 1024}
BATCH=${BATCH:-2}
STEPS=${STEPS:-5}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
t0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - t0 )) s] $*"; }

# The CUDA libraries of the machine's PyTorch (cuBLAS, cuRAND, NVRTC, cuDNN, runtime).
site=$(python3 -c 'import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]))')
for d in "$site"/nvidia/cu13/lib "$site"/nvidia/cudnn/lib "$site"/nvidia/*/lib; do
  [[ -d $d ]] && LD_LIBRARY_PATH=${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d
done
export LD_LIBRARY_PATH
# Unpack the binaries (xz-compressed by scripts/gpu-pack.sh).
BIN=${BIN_DIR:-/tmp/fluxflow-gpu}
mkdir -p "$BIN"
for b in fluxflow gpu-tests; do
  python3 -c 'import lzma, sys; open(sys.argv[2], "wb").write(lzma.open(sys.argv[1]).read())' \
    "$G/bin/$b.xz" "$BIN/$b" && chmod +x "$BIN/$b" || { echo "cannot unpack $G/bin/$b.xz"; exit 1; }
done
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
missing=$(ldd "$BIN/fluxflow" | grep 'not found' || true)
if [[ -n $missing ]]; then echo "unresolved libraries:"; echo "$missing"; exit 1; fi

# Twice: the CUDA paths the last verified GPU run used (the default; the unverified kernels'
# own tests skipped), then with FLUXFLOW_CUDA_UNVERIFIED=1 (src/kernels/mod.rs): the one-launch
# optimizer/EMA/norm kernels and the chunked attention's op in training, and every test.
# The binary was built in another checkout: point it at this one's fixtures.
export FLUXFLOW_FIXTURES_DIR=$PWD/tests/fixtures
stamp "GPU tests, verified paths"
timeout "${TEST_TIMEOUT:-300}" "$BIN/gpu-tests" --test-threads 1 --skip unverified_ ${TESTS:-}
verified_rc=$?
stamp "GPU tests, verified paths: exit $verified_rc"
stamp "GPU tests, FLUXFLOW_CUDA_UNVERIFIED=1"
FLUXFLOW_CUDA_UNVERIFIED=1 timeout "${TEST_TIMEOUT:-300}" "$BIN/gpu-tests" --test-threads 1 \
  ${TESTS:-}
unverified_rc=$?
stamp "GPU tests, FLUXFLOW_CUDA_UNVERIFIED=1: exit $unverified_rc"
tests_rc=$(( verified_rc != 0 ? verified_rc : unverified_rc ))

: > "$OUT/bench.jsonl"
# fluxflow's variants (';'-separated argument sets for `fluxflow bench`).
VARIANTS=${VARIANTS:---mixed-precision bf16;--mixed-precision no}
IFS=';' read -r -a variants <<< "$VARIANTS"
# The reference in each --amp setting of REF_AMP ("no": float32 with TF32 as PyTorch defaults;
# "bf16": autocast), so that bf16 is compared with bf16 and float32 with float32; fluxflow's
# variants also with FLUXFLOW_CUDA_UNVERIFIED=1 when UNVERIFIED_BENCH=1 (the default).
REF_AMP=${REF_AMP-no bf16}
for s in $SIZES; do
  for u in 0 $([[ ${UNVERIFIED_BENCH:-1} == 1 ]] && echo 1); do
    for v in "${variants[@]}"; do
      stamp "bench ${s}x${s}: fluxflow $v (FLUXFLOW_CUDA_UNVERIFIED=$u)"
      # shellcheck disable=SC2086
      FLUXFLOW_CUDA_UNVERIFIED=$u FLUXFLOW_CUDNN_LOG=${CUDNN_LOG:-} \
        timeout "${BENCH_TIMEOUT:-150}" "$BIN/fluxflow" bench --device cuda --width "$s" \
        --height "$s" --batch "$BATCH" --steps "$STEPS" --json $v \
        2>>"$OUT/cudnn.txt" | tail -n1 | tee -a "$OUT/bench.jsonl"
    done
  done
  for amp in $REF_AMP; do
    stamp "bench ${s}x${s}: PyTorch reference, --amp $amp"
    timeout "${BENCH_TIMEOUT:-150}" python3 "$G/bench_reference.py" --models "$G" --device cuda \
      --size "$s" --batch "$BATCH" --steps "$STEPS" --checkpointing on --amp "$amp" 2>/dev/null |
      tail -n1 | tee -a "$OUT/bench.jsonl"
  done
  if [[ ${FLOPS:-1} == 1 ]]; then
    timeout 120 python3 "$G/step_flops.py" --models "$G" --size "$s" --batch "$BATCH" 2>/dev/null |
      tail -n1 | tee -a "$OUT/bench.jsonl"
  fi
done

# CUPTI kernel traces (scripts/gpu-trace/): TRACE="256:bf16 1024:no" traces fluxflow's bench at
# those sizes and precisions, TRACE_REF="256" the reference's step; each writes
# $OUT/trace-*.tsv.xz and a summary of its timed steps, trace-*.txt.
trace() {  # name window-steps command...
  local name=$1 steps=$2; shift 2
  CUDA_INJECTION64_PATH=$PWD/$G/prof/libfluxprof.so FLUXPROF_OUT=$OUT/trace-$name.tsv \
    LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$PWD/$G/prof timeout "${BENCH_TIMEOUT:-150}" "$@" |
    tail -n1 > "$OUT/trace-$name.json"
  local med
  med=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["median_step_s"])' \
    "$OUT/trace-$name.json") &&
    python3 "$G/prof/summarize.py" "$OUT/trace-$name.tsv" "$(python3 -c "print($steps * $med)")" \
      > "$OUT/trace-$name.txt" && head -n 14 "$OUT/trace-$name.txt"
  xz -T0 -1 -f "$OUT/trace-$name.tsv"
}
for t in ${TRACE:-}; do
  stamp "trace fluxflow ${t%%:*} ${t##*:}"
  trace "fluxflow-${t%%:*}-${t##*:}" "$STEPS" "$BIN/fluxflow" bench --device cuda \
    --width "${t%%:*}" --height "${t%%:*}" --batch "$BATCH" --steps "$STEPS" --json \
    --mixed-precision "${t##*:}"
done
for s in ${TRACE_REF:-}; do
  stamp "trace reference $s"
  trace "reference-$s" "$STEPS" python3 "$G/bench_reference.py" --models "$G" --device cuda \
    --size "$s" --batch "$BATCH" --steps "$STEPS" --checkpointing on
done

stamp "table"
python3 - "$OUT/bench.jsonl" > "$OUT/table.md" <<'PY'
import json, sys, subprocess
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip()
# Dense bf16 tensor-core peak (FLOP/s) by GPU name.
peaks = {"H200": 989e12, "H100": 989e12, "A6000": 154.8e12, "A100": 312e12}
peak = next((v for k, v in peaks.items() if k in gpu), None)
# FLOPs of a step (fwd + bwd, no recomputation) measured on the reference (step_flops.py);
# the 2026-11-27 H200 figures where this run did not count them.
flops = {(256, 256): 8105510273024, (512, 512): 32433315381248, (1024, 1024): 129913650151424}
ref, ours = {}, []
for r in rows:
    key = (r["height"], r["width"])
    if "step_flops" in r:
        flops[key] = r["step_flops"]
    elif r.get("impl") == "pytorch-reference":
        ref[(key, r.get("amp", "no"))] = r
    elif r.get("impl") == "fluxflow":
        ours.append(r)
print(f"GPU: {gpu}; batch 2; gradient checkpointing on in the reference; each fluxflow row "
      "against the reference in the same precision (bf16: autocast; no: float32, TF32 on)\n")
print("| size | fluxflow | img/s | reference img/s | speed | peak GPU MB | reference MB | memory "
      "| share of bf16 peak |")
print("|---|---|---|---|---|---|---|---|---|")
fmt = lambda v, p=2: "n/a" if v is None else f"{v:.{p}f}"
sizes = sorted({k for k, _ in ref} | {(o["height"], o["width"]) for o in ours})
for key in sizes:
    variants = [o for o in ours if (o["height"], o["width"]) == key] or [None]
    for o in variants:
        amp = "no" if o is None else o.get("mixed_precision", "no")
        r = ref.get((key, amp))
        ri, rm = (r["images_per_s"], r["peak_mem_mb"]) if r else (None, None)
        name = "n/a" if o is None else (f"{amp}, ckpt {'on' if o['checkpointing'] else 'off'}"
                                         f"{', unverified on' if o.get('unverified_cuda') else ''}")
        oi = o and o["images_per_s"]
        om = o and o.get("peak_gpu_mb")
        share = (flops[key] / o["median_step_s"] / peak * 100
                 if o and key in flops and peak else None)
        print(f"| {key[0]}x{key[1]} | {name} | {fmt(oi)} | {fmt(ri)} | "
              f"{fmt(oi / ri if oi and ri else None)}x | {fmt(om, 0)} | {fmt(rm, 0)} | "
              f"{fmt(om / rm if om and rm else None)}x | {fmt(share, 1)}% |")
PY
cat "$OUT/table.md"
stamp "done"
exit $tests_rc
