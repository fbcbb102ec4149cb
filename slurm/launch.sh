# shellcheck shell=bash
# Shared body of slurm/eva_g.sh and slurm/debug.sh; sourced by them, never run on its own.
# The caller sets EVA_SCRIPT (its own path) and EVA_REPO (the repository root) and passes "$@".
#
# Modes:
#   (under sbatch, no arguments)  map SLURM -> torch.distributed variables, srun one process
#                                 per task, forward USR1/TERM to the step, requeue as fallback
#   --dry-run [SBATCH_FLAGS...]   validate recipe, data index, DeepSpeed config and batch sizes
#                                 for the world size NODES x TASKS_PER_NODE; print the sbatch
#                                 command; queue nothing
#   --submit  [SBATCH_FLAGS...]   the dry run, then sbatch (only if it passed); prints the job id

# --- settings (env) -----------------------------------------------------------------------
: "${PYTHON:=python3}"
: "${RECIPE:=}"                 # empty = the recipe default of pretrain.py
: "${DATA_INDEX:=}"             # comma-separated Arrow index files (empty = the recipe's)
: "${DS_CONFIG:=}"              # DeepSpeed JSON (empty = the recipe's train.deepspeed_config)
: "${OUTPUT_ROOT:=outputs}"     # run folders go here, one per job id
: "${RESUME:=auto}"             # auto | none | PATH
: "${EXTRA_ARGS:=}"             # more --section.key=value overrides, space-separated

die() { echo "$(basename "$EVA_SCRIPT"): $*" >&2; exit 2; }

# The value of `#SBATCH --NAME=VALUE` in the calling script: the header stays the one source of
# the defaults that the dry run needs before SLURM has parsed anything.
sbatch_default() {
    sed -n "s/^#SBATCH --$1=\\([^ ]*\\).*/\\1/p" "$EVA_SCRIPT" | head -n1
}

# pretrain.py arguments shared by the dry run and the job; $1 = output dir.
pretrain_args() {
    local -a args=()
    [[ -n $RECIPE ]] && args+=(--recipe "$RECIPE")
    [[ -n $DS_CONFIG ]] && args+=(--deepspeed_config "$DS_CONFIG")
    [[ -n $DATA_INDEX ]] && args+=("--data.index=$DATA_INDEX")
    args+=(--output_dir "$1" --resume "$RESUME")
    local -a extra=()
    read -r -a extra <<<"$EXTRA_ARGS"
    args+=("${extra[@]}")
    printf '%s\0' "${args[@]}"
}

# --- dry run / submit ----------------------------------------------------------------------
dry_run() {
    local nodes tasks gpus job_name world_size
    nodes=${NODES:-$(sbatch_default nodes)}
    tasks=${TASKS_PER_NODE:-$(sbatch_default ntasks-per-node)}
    gpus=${GPUS_PER_NODE:-$(sbatch_default gpus-per-node)}
    job_name=${JOB_NAME:-$(sbatch_default job-name)}
    [[ $nodes =~ ^[1-9][0-9]*$ ]] || die "NODES='$nodes' is not a positive integer; set NODES=N"
    [[ $tasks =~ ^[1-9][0-9]*$ ]] || die "TASKS_PER_NODE='$tasks' is not a positive integer; set TASKS_PER_NODE=N (one per GPU)"
    [[ ${gpus:-0} =~ ^[0-9]+$ ]] || die "GPUS_PER_NODE='$gpus' is not an integer; set GPUS_PER_NODE=N (0 on CPU-only clusters)"
    world_size=$(( nodes * tasks ))
    command -v "$PYTHON" >/dev/null || die "PYTHON='$PYTHON' not found; set PYTHON to the project's interpreter"

    local -a args=()
    mapfile -d '' args < <(pretrain_args "${OUTPUT_DIR:-$OUTPUT_ROOT/$job_name-JOBID}")
    echo "dry run: world size $world_size ($nodes nodes x $tasks tasks), $PYTHON eva_train/pretrain.py --dry-run ${args[*]}"
    # No process group is made in a dry run; the rendezvous variables only satisfy the checks.
    (cd "$EVA_REPO" && WORLD_SIZE=$world_size RANK=0 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 \
        "$PYTHON" eva_train/pretrain.py --dry-run "${args[@]}") || die "dry run failed (above); nothing was queued"

    SBATCH_FLAGS=("--chdir=$EVA_REPO" "--nodes=$nodes" "--ntasks-per-node=$tasks" "--gpus-per-node=${gpus:-0}" "$@")
    echo "submit with: sbatch ${SBATCH_FLAGS[*]} $EVA_SCRIPT"
}

submit() {
    dry_run "$@"
    local job_id
    job_id=$(sbatch --parsable "${SBATCH_FLAGS[@]}" "$EVA_SCRIPT") || die "sbatch failed (above)"
    echo "submitted job ${job_id%%;*}"
}

# --- inside the job -------------------------------------------------------------------------
export_distributed_env() {
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    # Same port on every node and on every restart of this job; differs between jobs sharing a node.
    MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 40000 ))}
    export MASTER_ADDR MASTER_PORT
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    # NCCL: fail a broken collective with an error instead of a silent hang (the stall watchdog
    # and the process-group timeout then end the job); WARN keeps logs readable at 128 ranks.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    export PYTHONPATH="$EVA_REPO${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1
}

SRUN_PID=""
PREEMPT_SIGNAL=""
forward_signal() {
    # Batch shell got USR1 (--signal=B:USR1@grace) or TERM: pass it to the step; srun forwards
    # it to every task, whose PreemptionHandler finishes the step, saves and requeues.
    PREEMPT_SIGNAL=$1
    echo "$(date -u +%FT%TZ) batch shell: SIG$1, forwarding to the training step" >&2
    [[ -n $SRUN_PID ]] && kill -s "$1" "$SRUN_PID" 2>/dev/null
    return 0
}

wait_for_step() {
    local rc=0
    # A trapped signal interrupts `wait` (status > 128) while srun still runs: wait again.
    while :; do
        rc=0
        wait "$SRUN_PID" || rc=$?
        kill -0 "$SRUN_PID" 2>/dev/null || break
    done
    if (( rc > 128 )); then rc=0; wait "$SRUN_PID" || rc=$?; fi
    return "$rc"
}

run_job() {
    [[ -f $EVA_REPO/eva_train/pretrain.py ]] \
        || die "no eva_train/pretrain.py under '$EVA_REPO'; submit from the repository root or set EVA_REPO"
    export_distributed_env
    local output_dir=${OUTPUT_DIR:-$OUTPUT_ROOT/$SLURM_JOB_NAME-$SLURM_JOB_ID}
    local -a args=()
    mapfile -d '' args < <(pretrain_args "$output_dir")
    echo "$(date -u +%FT%TZ) job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $SLURM_NTASKS tasks on" \
         "$SLURM_JOB_NODELIST, master $MASTER_ADDR:$MASTER_PORT, output $output_dir"

    trap 'forward_signal USR1' USR1
    trap 'forward_signal TERM' TERM
    # One process per task; RANK/LOCAL_RANK/WORLD_SIZE come from srun's per-task variables.
    # --kill-on-bad-exit: a rank that dies (or a watchdog exit) ends the others at once.
    # shellcheck disable=SC2016  # expanded by each task's shell, not here
    srun --kill-on-bad-exit=1 bash -c \
        'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; exec "$@"' \
        task "$PYTHON" "$EVA_REPO/eva_train/pretrain.py" "${args[@]}" &
    SRUN_PID=$!
    local rc=0
    wait_for_step || rc=$?
    echo "$(date -u +%FT%TZ) training step exited with $rc" >&2
    # Normally rank 0 has requeued after its save. If the step died before it could (the signal
    # came during start-up), requeue here: the job resumes from the last complete checkpoint.
    # (A job that rank 0 already requeued is no longer RUNNING: leave it alone.)
    if [[ -n $PREEMPT_SIGNAL && $rc -ne 0 && $(squeue -h -j "$SLURM_JOB_ID" -o %T) == RUNNING ]]; then
        scontrol requeue "$SLURM_JOB_ID" || echo "requeue failed; resubmit to resume from $output_dir" >&2
    fi
    return "$rc"
}

case "${1:-}" in
    --dry-run) shift; dry_run "$@" ;;
    --submit) shift; submit "$@" ;;
    "") [[ -n ${SLURM_JOB_ID:-} ]] || die "not inside a SLURM job; run: sbatch $EVA_SCRIPT, or bash $EVA_SCRIPT --dry-run|--submit"
        run_job ;;
    *) die "unknown argument '$1'; use --dry-run or --submit (settings come from environment variables)" ;;
esac
