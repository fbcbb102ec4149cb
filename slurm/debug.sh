#!/bin/bash
# One-node debug run of eva-train: same launcher as slurm/eva_g.sh (see its header for every
# setting), one node, a short time limit, the CPU demo recipe unless RECIPE says otherwise.
#
#   bash slurm/debug.sh --dry-run | --submit [SBATCH ...]
#   sbatch slurm/debug.sh                              # from the repository root
#   RECIPE=eva_g_p14_m30m EXTRA_ARGS="--model.variant=eva_l_p14" sbatch slurm/debug.sh
# CPU-only cluster: sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 slurm/debug.sh
#
#SBATCH --job-name=eva-debug
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=01:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.err
set -euo pipefail

: "${RECIPE:=demo}"
if [[ -n ${SLURM_JOB_ID:-} ]]; then
    # sbatch runs a copy of this file from its spool folder: the repository is the job's cwd.
    EVA_SCRIPT=$0 EVA_REPO=${EVA_REPO:-$PWD}
else
    EVA_SCRIPT=${BASH_SOURCE[0]} EVA_REPO=${EVA_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
fi
EVA_TEMPLATE=slurm/debug.sh
export RECIPE EVA_REPO
# shellcheck source=slurm/launch.sh
source "$EVA_REPO/slurm/launch.sh" "$@"
