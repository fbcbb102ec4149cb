#!/bin/bash
# EVA-g/14 masked-image-modeling pretraining on a multi-node SLURM cluster (default: 16 nodes x
# 8 H100, global batch 4096). One training process per GPU, started by srun (no ssh/pdsh); the
# run folder is keyed by the job id, so a preempted job that is requeued resumes its own run.
#
# Validate before queueing (recipe, data index, DeepSpeed config, world size vs batch sizes):
#   bash slurm/eva_g.sh --dry-run              # prints the sbatch command, queues nothing
#   bash slurm/eva_g.sh --submit [SBATCH ...]  # the dry run, then sbatch only if it passed
# Or submit directly from the repository root:  sbatch slurm/eva_g.sh
#
# Settings (environment variables; sbatch exports them to the job):
#   PYTHON        project interpreter                              (python3 on PATH)
#   RECIPE        recipe name or .toml path                        (eva_g_p14_m30m)
#   DATA_INDEX    comma-separated Arrow index files                (the recipe's data.index)
#   TEACHER       teacher tower weights (open_clip state dict)     (the recipe's teacher.checkpoint)
#   DS_CONFIG     DeepSpeed JSON (ZeRO stage, precision)           (the recipe's)
#   OUTPUT_ROOT   run folders go to OUTPUT_ROOT/<job name>-<job id> (outputs)
#   OUTPUT_DIR    exact run folder instead (resume a run from another job)
#   RESUME        auto | none | checkpoint path                    (auto)
#   EXTRA_ARGS    more overrides, e.g. "--train.total_steps=1000 --logging.wandb=false"
#   EVA_REPO      repository root                                  (the submit directory)
#   NODES, TASKS_PER_NODE, GPUS_PER_NODE, JOB_NAME: shape for --dry-run/--submit (the #SBATCH
#                 lines below); with plain sbatch use --nodes/--ntasks-per-node/--gpus-per-node.
#   MASTER_PORT   rendezvous port                                  (20000 + job id % 40000)
#   STEP_SIGNAL   what the batch shell sends the ranks on USR1/TERM/HUP (USR1; srun passes USR1/USR2
#                 through but turns TERM/HUP into SIGKILL); must be in train.save_signals
# The dry run loads the teacher file and the data index (pretrain.py --dry-run) and prints the sbatch
# command with every setting given to it, ready to paste.
# CPU-only cluster, unchanged script:
#   sbatch --nodes=1 --ntasks-per-node=2 --gpus-per-node=0 --cpus-per-task=1 slurm/eva_g.sh
#
# Network settings that matter (export before sbatch; defaults are NCCL's own unless noted):
#   NCCL_SOCKET_IFNAME=<iface>   bootstrap/socket interface, e.g. the fabric's, not docker0/lo
#   NCCL_IB_HCA=mlx5             which InfiniBand/RoCE adapters to use (all by default)
#   NCCL_DEBUG=INFO              set once on a new cluster to see the chosen transport (WARN here)
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (set here): a failed collective raises instead of hanging
#   GPUDirect RDMA / NVLink SHARP are picked by NCCL automatically; check NCCL_DEBUG=INFO output
#   for "NET/IB" (good) versus "NET/Socket" (slow, fix NCCL_SOCKET_IFNAME/NCCL_IB_HCA).
# Stopping: SLURM sends USR1 to this shell GRACE seconds before the time limit (--signal below); it
# reaches every rank, which finishes its step, saves, requeues the job and exits 0. Keep GRACE above
# one step plus one checkpoint save. `scancel --signal=TERM JOBID` (tasks only) saves and stops for
# good; `scancel --batch --signal=USR1 JOBID` saves and requeues. A plain `scancel`, `scancel --full`,
# a time limit without the warning or a preemption send TERM to srun itself, which SIGKILLs every
# task at once (SLURM's srun, not ours): nothing is saved after the last periodic checkpoint; the
# log says so and names the command that resumes. A user's cancel is never requeued.
#
#SBATCH --job-name=eva-g
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.err
set -euo pipefail

: "${RECIPE:=eva_g_p14_m30m}"
if [[ -n ${SLURM_JOB_ID:-} ]]; then
    # sbatch runs a copy of this file from its spool folder: the repository is the job's cwd.
    EVA_SCRIPT=$0 EVA_REPO=${EVA_REPO:-$PWD}
else
    EVA_SCRIPT=${BASH_SOURCE[0]} EVA_REPO=${EVA_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
fi
EVA_TEMPLATE=slurm/eva_g.sh
export RECIPE EVA_REPO
# shellcheck source=slurm/launch.sh
source "$EVA_REPO/slurm/launch.sh" "$@"
