#!/usr/bin/env bash
# One prepared check for a lent GPU, under 8 minutes, table last:
#   1. installs the carried wheels (.whl/, built here by tools/fetch_gpu_wheels.sh) into /tmp/site,
#   2. runs the GPU-marked tests (`pytest -m gpu`: the kernels against float64, on CUDA),
#   3. runs tools/bench_kernels.py (ours vs eager, torch.compile, SDPA backends, apex, liger),
#   4. runs tools/bench_step.py for EVA-g with our kernels and without, against timm.
# Usage on the device machine (device tool: carry [".whl"]):  bash tools/gpu_check.sh
# Writes logs, bench_kernels.csv/.png under $OUT (the device tool's folder) or ./gpu_check_out.
# Each step gets a time cap cut to what is left of TOTAL_S, so the summary always prints.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
REPO=$PWD
OUT_DIR=${OUT:-$REPO/gpu_check_out}
TOTAL_S=${TOTAL_S:-465}
START_S=$(date +%s)
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
STATUS=()

left_s() { echo $(( TOTAL_S - ($(date +%s) - START_S) )); }

step() {  # step NAME CAP_S CMD...: run with a timeout, log to $OUT_DIR/NAME.log, record rc and seconds
    local name=$1 cap=$2; shift 2
    local budget; budget=$(( $(left_s) - 25 ))  # keep time for the summary
    (( cap > budget )) && cap=$budget
    if (( cap < 10 )); then STATUS+=("$name: skipped (no time left)"); return; fi
    local t0; t0=$(date +%s)
    echo "=== $name (cap ${cap}s)"
    timeout --signal=TERM --kill-after=10 "$cap" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
    local rc=${PIPESTATUS[0]}
    STATUS+=("$name: rc=$rc in $(( $(date +%s) - t0 ))s$([[ $rc == 124 ]] && echo ' (TIMED OUT)')")
}

install_wheels() {
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    else
        echo "no .whl/ carried: deepspeed/open_clip tests and bench_step may not import"
    fi
    # the repo installs `kernels/` as `eva_kernels`: mirror that without pip
    mkdir -p /tmp/eva_shim && ln -sfn "$REPO/kernels" /tmp/eva_shim/eva_kernels
}

install_start_s=$(date +%s)
install_wheels 2>&1 | tee "$OUT_DIR/install.log"
STATUS+=("install: rc=${PIPESTATUS[0]} in $(( $(date +%s) - install_start_s ))s")
export PYTHONPATH=/tmp/eva_shim:$REPO:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export DS_ACCELERATOR=cuda WANDB_MODE=offline PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # compiled kernels on the GPU
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

step gpu_tests 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/
step bench_kernels 200 "$PY" tools/bench_kernels.py --batches 8 32 --rep-ms 40 --out-dir "$OUT_DIR"
if [[ -f tools/bench_step.py ]]; then
    common=(--variant eva_g_p14 --img_size 224 --micro_batch_size 32 --steps 6 --precision bf16)
    step bench_step_triton 100 "$PY" tools/bench_step.py "${common[@]}" --kernels triton --baseline timm
    step bench_step_torch 70 "$PY" tools/bench_step.py "${common[@]}" --kernels torch
else
    STATUS+=("bench_step: skipped (tools/bench_step.py not in this tree)")
fi

echo
echo "=================== gpu_check summary ($(( $(date +%s) - START_S ))s) ==================="
echo "gpu tests: $(tail -1 "$OUT_DIR/gpu_tests.log" 2>/dev/null)"
for name in bench_step_triton bench_step_torch; do
    [[ -f "$OUT_DIR/$name.log" ]] && { echo "--- $name (last lines)"; tail -6 "$OUT_DIR/$name.log"; }
done
if [[ -f "$OUT_DIR/bench_kernels.csv" ]]; then
    "$PY" tools/bench_kernels.py --summary-from "$OUT_DIR/bench_kernels.csv"
fi
printf '%s\n' "${STATUS[@]}"
