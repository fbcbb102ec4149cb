#!/usr/bin/env bash
# The GPU check, for any CUDA machine with the project installed (pip install -e .[dev]); under
# 8 minutes on one H100/H200, one summary table last:
#   1. selfcheck      python -m eva_kernels: each Triton kernel checked against the float64 reference
#                     and raced against PyTorch at EVA-g and EVA-02-L shapes (what `auto` picks)
#   2. gpu_tests      pytest -m "gpu and not slow": the kernels against float64 on the card, their self-check
#   3. bench_kernels  tools/bench_kernels.py at EVA-g and EVA-02-L shapes: ours vs eager, torch.compile,
#                     every SDPA backend, apex/liger where importable (each checked before timed)
#   4. bench_step     tools/bench_step.py: the EVA-g/14 bf16 step with activation checkpointing,
#                     our kernels (+ timm's Eva) and the torch kernels; ZeRO-3 and CSV when it has them
#   5. plan           tools/plan.py's prediction for that run, when the planner is in the tree
# Logs, CSV and PNG go to the output folder. Without a CUDA device it lists the steps and exits 0.
#   usage: bash tools/gpu_check.sh [--out DIR] [--wheels DIR] [--dry-run]
#     --out DIR      output folder (default runs/gpu_check)
#     --wheels DIR   offline: pip-install the wheels in DIR (tools/fetch_gpu_wheels.sh --dest DIR) into a
#                    temporary folder first, without the registry; also $EVA_GPU_WHEELS
#     --dry-run      list the steps with their commands and exit
#   env: PYTHON (interpreter, default python3), TOTAL_S (time budget in s, default 465)
set -uo pipefail

usage() { sed -n '2,18s/^# \{0,1\}//p' "$0"; }
fail() { echo "gpu_check.sh: $*" >&2; exit 2; }
absolute() { if [[ -z $1 || $1 == /* ]]; then echo "$1"; else echo "$PWD/$1"; fi; }  # as the caller meant it

OUT_DIR=
WHEELS=${EVA_GPU_WHEELS:-}
DRY_RUN=0
while (( $# )); do
    case $1 in
        --out) OUT_DIR=${2:?--out needs a folder}; shift 2 ;;
        --wheels) WHEELS=${2:?--wheels needs a folder}; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) fail "unknown argument '$1'; see --help" ;;
    esac
done
OUT_DIR=$(absolute "$OUT_DIR") WHEELS=$(absolute "$WHEELS") PY=${PYTHON:-python3}
[[ $PY == */* ]] && PY=$(absolute "$PY")  # a path, not a name looked up on PATH
cd "$(dirname "$0")/.." || exit 1
REPO=$PWD
OUT_DIR=${OUT_DIR:-$REPO/runs/gpu_check}
TOTAL_S=${TOTAL_S:-465}
command -v "$PY" >/dev/null || fail "no Python interpreter '$PY'; set PYTHON=/path/to/python"
[[ $TOTAL_S =~ ^[0-9]+$ ]] || fail "TOTAL_S=$TOTAL_S is not a number of seconds"
if [[ -n $WHEELS ]]; then
    [[ -d $WHEELS ]] || fail "--wheels $WHEELS is not a folder; build one with tools/fetch_gpu_wheels.sh --dest $WHEELS"
    compgen -G "$WHEELS/*.whl" >/dev/null || fail "no .whl files in $WHEELS; build them with tools/fetch_gpu_wheels.sh --dest $WHEELS"
fi
START_S=$(date +%s)
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || fail "cannot create a temporary folder"
trap 'rm -rf "$SCRATCH"' EXIT

install_wheels() {  # the carried wheels into a scratch site (no registry, no change to the environment)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
        --target "$SCRATCH/site" "$WHEELS"/*.whl || fail "pip could not install the wheels in $WHEELS"
    export PYTHONPATH=$SCRATCH/site${PYTHONPATH:+:$PYTHONPATH}
    local installed=("$SCRATCH"/site/*.dist-info)
    installed=("${installed[@]##*/}")
    echo "offline wheels from $WHEELS: ${installed[*]%.dist-info}"
}

cuda_state() {  # prints "cuda <card>" or "cpu" and the steps' modules that are missing; fails when the project does not import
    "$PY" -c "import importlib.util, eva_train, eva_kernels, torch
print('cuda ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')
print(' '.join(m for m in ('deepspeed', 'timm', 'open_clip', 'pytest', 'matplotlib') if not importlib.util.find_spec(m)))" \
        2>"$SCRATCH/import.err"
}

import_project() {  # a checkout that is not pip-installed: mirror setup.py (kernels/ installs as eva_kernels)
    STATE=$(cuda_state) && return
    mkdir -p "$SCRATCH/shim" && ln -s "$REPO/kernels" "$SCRATCH/shim/eva_kernels"
    export PYTHONPATH=$SCRATCH/shim:$REPO${PYTHONPATH:+:$PYTHONPATH}
    STATE=$(cuda_state) || fail "the project does not import with $PY ($(tail -1 "$SCRATCH/import.err")); \
run pip install -e .[dev] (or pass --wheels DIR offline)"
}

[[ -n $WHEELS ]] && install_wheels
import_project
MISSING=$(sed -n 2p <<<"$STATE") STATE=$(head -1 <<<"$STATE")
[[ -n $MISSING ]] && echo "note: not importable with $PY: $MISSING; the steps that need it will fail \
(pip install -e .[dev], or --wheels DIR offline)"
export WANDB_MODE=offline PYTHONUNBUFFERED=1
if [[ $STATE == cuda* ]]; then
    DEVICE=${STATE#cuda }
    export DS_ACCELERATOR=cuda
    unset TRITON_INTERPRET  # compiled kernels on the card
elif (( ! DRY_RUN )); then
    echo "no CUDA device here (torch.cuda.is_available() is False with $PY): nothing run. On a CUDA machine:"
    DRY_RUN=1
fi
(( DRY_RUN )) || mkdir -p "$OUT_DIR" || fail "cannot create the output folder $OUT_DIR"

NAMES=() RCS=() SECS=()
left_s() { echo $(( TOTAL_S - ($(date +%s) - START_S) )); }

step() {  # step NAME CAP_S CMD...: run under a time cap cut to what is left, log to OUT_DIR/NAME.log
    local name=$1 cap=$2; shift 2
    if (( DRY_RUN )); then printf '  %-18s (cap %3ss) %s\n' "$name" "$cap" "$*"; return; fi
    local budget; budget=$(( $(left_s) - 15 ))  # the summary always prints
    (( cap > budget )) && cap=$budget
    NAMES+=("$name")
    if (( cap < 10 )); then RCS+=("-"); SECS+=(0); echo "skipped: no time left" >"$OUT_DIR/$name.log"; return; fi
    local t0; t0=$(date +%s)
    echo "=== $name (cap ${cap}s): $*"
    timeout --signal=TERM --kill-after=10 "$cap" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
    RCS+=("${PIPESTATUS[0]}"); SECS+=($(( $(date +%s) - t0 )))
}

# Another engineer is extending bench_step.py and writing plan.py: pass only the options their
# argparse declares (read from the source: no interpreter start per probe), so a missing one
# cannot break this script.
has_option() { grep -qE -- "[\"']$2[\"']" "$1" 2>/dev/null; }  # has_option SCRIPT --flag

bench_step_args() {  # KERNELS CSV: the EVA-g/14 bf16 step, with the options this tree's bench_step.py has
    local kernels=$1 csv=$2 tool=tools/bench_step.py zero
    STEP_ARGS=(--variant eva_g_p14 --img_size 224 --micro_batch_size 32 --steps 6 --warmup_steps 3
               --precision bf16 --kernels "$kernels")
    has_option $tool --checkpoint_fraction && STEP_ARGS+=(--checkpoint_fraction 1.0)  # the recipe's
    has_option $tool --engine && STEP_ARGS+=(--engine deepspeed)  # the real ZeRO engine, one rank
    for zero in --zero_stage --zero-stage --zero; do
        if has_option $tool $zero; then STEP_ARGS+=("$zero" 3); break; fi
    done
    if has_option $tool --csv; then STEP_ARGS+=(--csv "$csv"); fi
}

planner_card() {  # the planner's name for this card (its --gpu), empty when it does not know the card
    if (( DRY_RUN )); then echo "<this card>"; return; fi
    "$PY" -c "import torch
from eva_train.plan.gpus import GPUS, spec_for_device
spec = spec_for_device(torch.cuda.get_device_name())
print(next((name for name, known in GPUS.items() if known is spec), ''))" 2>/dev/null
}

plan_args() {  # the planner's view of the bench_step run (recipe micro batch 32, one rank), with the options it has
    local tool=tools/plan.py option card measured=$STEP_CSV
    PLAN_ARGS=()
    has_option $tool --recipe && PLAN_ARGS+=(--recipe eva_g_p14_m30m)
    has_option $tool --world-size && PLAN_ARGS+=(--world-size 1)
    card=$(planner_card)
    if [[ -z $card ]]; then  # a card it has no entry for: plan with this card's memory, assume the rest
        has_option $tool --gpu-mem && PLAN_ARGS+=(--gpu-mem \
            "$("$PY" -c "import torch; print(torch.cuda.get_device_properties(0).total_memory / 2**30)")")
        return 0  # bench_step's MFU is refused for a card the planner does not know
    fi
    has_option $tool --gpu && PLAN_ARGS+=(--gpu "$card")
    [[ -f $measured ]] || (( DRY_RUN )) || return 0  # bench_step wrote none: the planner's assumed MFU
    for option in --measured --bench-csv --csv; do
        if has_option $tool $option; then PLAN_ARGS+=("$option" "$measured"); break; fi
    done
}

if (( ! DRY_RUN )); then
    { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
      "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', \
torch.backends.cudnn.version(), 'triton', triton.__version__)"
    } | tee "$OUT_DIR/environment.txt"
fi
if [[ -f kernels/__main__.py ]]; then
    step selfcheck 45 "$PY" -m eva_kernels --preset eva_g eva02_l --batch 32 --json "$OUT_DIR/selfcheck.json"
fi
step gpu_tests 90 "$PY" -m pytest -q -m "gpu and not slow" -p no:cacheprovider tests/
step bench_kernels 140 "$PY" tools/bench_kernels.py --batches 8 32 --rep-ms 40 --out-dir "$OUT_DIR"
if has_option tools/bench_step.py --impls; then  # one process: our kernels, our model on torch's, timm's Eva
    STEP_CSV=$OUT_DIR/bench_step.csv
    bench_step_args triton "$STEP_CSV"
    step bench_step 170 "$PY" tools/bench_step.py "${STEP_ARGS[@]}" --impls eva_train,eva_train_torch,timm
else  # an older bench_step: one run per kernel backend
    STEP_CSV=$OUT_DIR/bench_step_triton.csv
    bench_step_args triton "$STEP_CSV"
    step bench_step_triton 100 "$PY" tools/bench_step.py "${STEP_ARGS[@]}" --baseline timm
    bench_step_args torch "$OUT_DIR/bench_step_torch.csv"
    step bench_step_torch 70 "$PY" tools/bench_step.py "${STEP_ARGS[@]}"
fi
if [[ -f tools/plan.py ]]; then
    plan_args
    step plan 20 "$PY" tools/plan.py "${PLAN_ARGS[@]}"
fi
(( DRY_RUN )) && exit 0

step_rows() {  # CSV of bench_step -> "ours 128.0 img/s 41.2% 30.5 GiB; torch ...; timm ..."
    "$PY" - "$1" <<'PYTHON'
import csv, sys
short = {"eva_train": "ours", "eva_train_torch": "torch"}
with open(sys.argv[1], newline="") as f:
    print("; ".join(f"{short.get(r['impl'], r['impl'])} {float(r['images_per_s']):.1f} img/s "
                    f"{float(r['mfu']):.1%} {float(r['peak_mem_gib']):.1f} GiB" if r["mfu"] else r["impl"]
                    for r in csv.DictReader(f)))
PYTHON
}

result_of() {  # NAME: one line for the closing table, read from the step's log or outputs
    local log=$OUT_DIR/$1.log
    case $1 in
        gpu_tests) grep -E "passed|failed|error|no tests ran" "$log" | tail -1 | tr -d '=' | xargs ;;
        plan) grep -E '^[[:space:]]*peak[[:space:]]' "$log" | tail -1 | xargs ;;  # beside bench_step's peak
        bench_kernels) if [[ -f $OUT_DIR/bench_kernels.summary ]]; then tail -1 "$OUT_DIR/bench_kernels.summary"
                       else grep -v '^[[:space:]]*$' "$log" | tail -1; fi ;;
        bench_step*) if [[ -f $OUT_DIR/$1.csv ]]; then step_rows "$OUT_DIR/$1.csv"
                     else grep -v '^[[:space:]]*$' "$log" | tail -1; fi ;;
        *) grep -v '^[[:space:]]*$' "$log" | tail -1 ;;
    esac
}

if [[ -f $OUT_DIR/bench_kernels.csv ]]; then
    echo
    "$PY" tools/bench_kernels.py --summary-from "$OUT_DIR/bench_kernels.csv" | tee "$OUT_DIR/bench_kernels.summary"
fi
echo
echo "outputs: $OUT_DIR (logs, environment.txt, gpu_check.csv, selfcheck.json, bench_kernels.csv/.png, bench_step*.csv)"
echo "=== gpu_check on $DEVICE: $(( $(date +%s) - START_S ))s ==="
printf '%-18s %3s %5s  %s\n' check rc secs result
failed=0
echo "device,check,rc,seconds,result" >"$OUT_DIR/gpu_check.csv"
for i in "${!NAMES[@]}"; do
    [[ ${RCS[$i]} == 0 ]] || failed=1
    case ${RCS[$i]} in
        -) result="skipped: no time left" ;;
        124|137) result="TIMED OUT; $(result_of "${NAMES[$i]}" 2>/dev/null)" ;;
        *) result=$(result_of "${NAMES[$i]}" 2>/dev/null) ;;
    esac
    printf '%-18s %3s %5s  %s\n' "${NAMES[$i]}" "${RCS[$i]}" "${SECS[$i]}" "${result:0:110}"
    printf '"%s",%s,%s,%s,"%s"\n' "${DEVICE//\"/\"\"}" "${NAMES[$i]}" "${RCS[$i]}" "${SECS[$i]}" "${result//\"/\"\"}" \
        >>"$OUT_DIR/gpu_check.csv"
done
exit $failed
