#!/bin/bash
# Distillation stage of the Llama-3.1-Minitron-4B recipes on a Slurm cluster: the 4B-Width student
# (nemo_minitron/conf/recipes/llama31_minitron_4b_width.yaml), or with --depth (the first argument) the 4B-Depth one
# (llama31_minitron_4b_depth.yaml), from Llama-3.1-8B: forward KL, peak LR 1e-4 -> 1e-5 cosine, 40
# warmup steps, global batch 1152 x 8192 tokens, 94B tokens. 16 nodes x 8 GPUs, --tp 8 by default;
# the run spans several jobs: each checkpoints before its time limit and requeues itself.
#   sbatch launchers/distill_llama31_4b.sh [--depth] [--tp T] [--pp P] [--dry-run] teacher=DIR student=DIR output_dir=DIR data.train=DATA
# Other key=value arguments override the recipe (see launchers/common.sh).
#SBATCH --job-name=minitron-distill-llama31-4b
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
# sbatch runs a copy of this file from its spool directory: find common.sh from the submit dir.
. "${MINITRON_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/launchers/common.sh"
recipe=llama31_minitron_4b_width
if [ "${1:-}" = --depth ]; then recipe=llama31_minitron_4b_depth; shift; fi
MINITRON_TP=${MINITRON_TP:-8} minitron_launch distill "recipe=$recipe" "$@"
