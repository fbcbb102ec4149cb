# shellcheck shell=bash
# Shared body of slurm/eva_g.sh and slurm/debug.sh; sourced by them, never run on its own.
# The caller sets EVA_SCRIPT (its own path), EVA_TEMPLATE (its path in the repository: under sbatch
# EVA_SCRIPT is SLURM's spool copy) and EVA_REPO (the repository root) and passes "$@".
#
# Modes:
#   (under sbatch, no arguments)  map SLURM -> torch.distributed variables, srun one process
#                                 per task, forward USR1/TERM/HUP to the step as STEP_SIGNAL,
#                                 requeue or explain after a step that died of a signal
#   --dry-run [SBATCH_FLAGS...]   validate recipe, data index, DeepSpeed config and batch sizes
#                                 for the world size NODES x TASKS_PER_NODE; print the sbatch
#                                 command; queue nothing
#   --submit  [SBATCH_FLAGS...]   the dry run, then sbatch (only if it passed); prints the job id

# --- settings (env) -----------------------------------------------------------------------
# The variables the user set (before defaults fill the rest): the printed sbatch line repeats them.
SETTINGS=(PYTHON RECIPE DATA_INDEX TEACHER DS_CONFIG OUTPUT_ROOT OUTPUT_DIR RESUME EXTRA_ARGS STEP_SIGNAL MASTER_PORT)
GIVEN_SETTINGS=()
for _name in "${SETTINGS[@]}"; do [[ -n ${!_name:-} ]] && GIVEN_SETTINGS+=("$_name"); done
: "${PYTHON:=python3}"
: "${RECIPE:=}"                 # empty = the recipe default of pretrain.py
: "${DATA_INDEX:=}"             # comma-separated Arrow index files (empty = the recipe's)
: "${TEACHER:=}"                # teacher tower weights file (teacher.checkpoint; empty = the recipe's)
: "${DS_CONFIG:=}"              # DeepSpeed JSON (empty = the recipe's train.deepspeed_config)
: "${OUTPUT_ROOT:=outputs}"     # run folders go here, one per job id
: "${RESUME:=auto}"             # auto | none | PATH
: "${EXTRA_ARGS:=}"             # more --section.key=value overrides, space-separated
# The signal the batch shell sends the step when it gets USR1/TERM/HUP. srun passes USR1/USR2 on to
# every task but turns TERM/HUP into SIGKILL; it must be one of train.save_signals.
: "${STEP_SIGNAL:=USR1}"

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
    [[ -n $TEACHER ]] && args+=("--teacher.checkpoint=$TEACHER")
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
    echo "submit with: $(given_settings)sbatch ${SBATCH_FLAGS[*]} $EVA_SCRIPT"
}

# NAME=value pairs (shell-quoted) of the settings the user gave: sbatch exports them to the job.
given_settings() {
    local name
    for name in "${GIVEN_SETTINGS[@]}"; do printf '%s=%q ' "$name" "${!name}"; done
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
OUTPUT_DIR_OF_JOB=""
SIGNALS_SEEN=()
forward_signal() {
    # The batch shell got USR1 (--signal=B:USR1@grace, scancel --batch), TERM or HUP. The step gets
    # STEP_SIGNAL, never TERM/HUP: srun answers those with SIGKILL to every task ("forcing job
    # termination"), which leaves no time to save. srun passes STEP_SIGNAL on to every task, whose
    # handler finishes the step and saves; rank 0 then asks SLURM whether to requeue.
    SIGNALS_SEEN+=("SIG$1")
    echo "$(date -u +%FT%TZ) batch shell: SIG$1, sending SIG$STEP_SIGNAL to the training step" >&2
    [[ -n $SRUN_PID ]] && kill -s "$STEP_SIGNAL" "$SRUN_PID" 2>/dev/null
    [[ $1 != USR1 ]] && note_if_ending
    return 0
}

# A TERM from SLURM itself (time limit, scancel, preemption): SIGKILL follows after KillWait, to this
# shell too, so say now what happened and how to resume, while we still can.
note_if_ending() {
    local fields state reason
    fields=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null || true)
    state=$(grep -o 'JobState=[^ ]*' <<<"$fields" | cut -d= -f2)
    reason=$(grep -o 'Reason=[^ ]*' <<<"$fields" | cut -d= -f2)
    [[ $state == RUNNING || -z $state ]] && return 0
    local why="SLURM is ending the job (scancel, preemption, or the requeue rank 0 asks for after its save)"
    [[ $reason == TimeLimit ]] && why="the job reached its time limit"
    echo "$(date -u +%FT%TZ) batch shell: $why (JobState $state, Reason $reason): the ranks save only if they" \
         "finish the step and the save before SLURM's KillWait; no requeue from this shell. Last complete checkpoint" \
         "now: $(latest_checkpoint "$OUTPUT_DIR_OF_JOB"). Resume with: $(resume_command)" >&2
}

resume_command() {
    echo "OUTPUT_DIR=$OUTPUT_DIR_OF_JOB $(given_settings)sbatch $(job_shape)$EVA_REPO/$EVA_TEMPLATE"
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

# This job's shape as sbatch flags, for the resume line (the template's #SBATCH lines hold the rest).
job_shape() {
    printf -- '--nodes=%s ' "${SLURM_JOB_NUM_NODES:-1}"
    [[ -n ${SLURM_NTASKS_PER_NODE:-} ]] && printf -- '--ntasks-per-node=%s ' "${SLURM_NTASKS_PER_NODE%%(*}"
    [[ -n ${SLURM_CPUS_PER_TASK:-} ]] && printf -- '--cpus-per-task=%s ' "$SLURM_CPUS_PER_TASK"
    [[ -n ${SLURM_GPUS_PER_NODE:-} ]] && printf -- '--gpus-per-node=%s ' "$SLURM_GPUS_PER_NODE"
    return 0
}

latest_checkpoint() {
    local latest=$1/checkpoints/latest
    if [[ -s $latest ]]; then echo "$1/checkpoints/$(<"$latest")"; else echo "none yet"; fi
}

# The step died after a signal (rc != 0): it could not save. Requeue when SLURM should bring the job
# back and still runs it (a USR1 warning during start-up, before the ranks had their handlers);
# otherwise say what happened and how to resume. Same rule as rank 0's (eva_train/train/preemption.py).
after_signal() {
    local output_dir=$1 rc=$2 state verdict
    state=$(squeue -h -j "$SLURM_JOB_ID" -o %T 2>/dev/null || true)
    if [[ $state == PENDING || $state == REQUEUE* ]]; then  # rank 0 requeued it after its save
        echo "$(date -u +%FT%TZ) batch shell: job requeued; it resumes from $(latest_checkpoint "$output_dir")" >&2
        return 0
    fi
    if verdict=$(cd "$EVA_REPO" && "$PYTHON" -m eva_train.train.preemption verdict "$SLURM_JOB_ID" "${SIGNALS_SEEN[@]}"); then
        if [[ $state == RUNNING ]]; then
            echo "$(date -u +%FT%TZ) batch shell: requeueing ($verdict)" >&2
            scontrol requeue "$SLURM_JOB_ID" && return 0
        fi
    fi
    echo "$(date -u +%FT%TZ) batch shell: the training step ended with $rc after ${SIGNALS_SEEN[*]} without" \
         "saving (${verdict:-no verdict}); job state ${state:-gone}. A TERM/HUP that reaches srun itself (plain" \
         "scancel, scancel --full, the time limit) makes it SIGKILL every task; to stop with a save use" \
         "'scancel --signal=TERM $SLURM_JOB_ID' (tasks only) or 'scancel --batch --signal=USR1 $SLURM_JOB_ID'," \
         "and keep '#SBATCH --signal=B:USR1@GRACE' for the time limit. Last complete checkpoint:" \
         "$(latest_checkpoint "$output_dir"). Resume with: $(resume_command)" >&2
    return 0
}

run_job() {
    [[ -f $EVA_REPO/eva_train/pretrain.py ]] \
        || die "no eva_train/pretrain.py under '$EVA_REPO'; submit from the repository root or set EVA_REPO"
    export_distributed_env
    local output_dir=${OUTPUT_DIR:-$OUTPUT_ROOT/$SLURM_JOB_NAME-$SLURM_JOB_ID}
    OUTPUT_DIR_OF_JOB=$output_dir
    local -a args=()
    mapfile -d '' args < <(pretrain_args "$output_dir")
    echo "$(date -u +%FT%TZ) job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $SLURM_NTASKS tasks on" \
         "$SLURM_JOB_NODELIST, master $MASTER_ADDR:$MASTER_PORT, output $output_dir"

    trap 'forward_signal USR1' USR1
    trap 'forward_signal TERM' TERM
    trap 'forward_signal HUP' HUP
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
    # rc 0: the ranks saved; rank 0 has requeued the job if SLURM should bring it back.
    if (( rc != 0 && ${#SIGNALS_SEEN[@]} > 0 )); then after_signal "$output_dir" "$rc"; fi
    return "$rc"
}

case "${1:-}" in
    --dry-run) shift; dry_run "$@" ;;
    --submit) shift; submit "$@" ;;
    "") [[ -n ${SLURM_JOB_ID:-} ]] || die "not inside a SLURM job; run: sbatch $EVA_SCRIPT, or bash $EVA_SCRIPT --dry-run|--submit"
        run_job ;;
    *) die "unknown argument '$1'; use --dry-run or --submit (settings come from environment variables)" ;;
esac
