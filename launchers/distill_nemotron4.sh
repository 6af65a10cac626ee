#!/bin/bash
# Distillation stage of the Nemotron-4 Minitron recipes on a Slurm cluster (15B -> 8B -> 4B, the paper
# prunes iteratively): Minitron-8B from Nemotron-4-15B (nemo_minitron/conf/recipes/nemotron4_minitron_8b.yaml), or
# with --4b (the first argument) Minitron-4B from the distilled 8B (nemotron4_minitron_4b.yaml):
# forward KL, peak LR 1e-4 -> 1e-5 cosine, 40 warmup steps, global batch 1152 x 4096 tokens, 94B
# tokens. 16 nodes x 8 GPUs, --tp 8 by default; the run spans several jobs: each checkpoints before
# its time limit and requeues itself.
#   sbatch launchers/distill_nemotron4.sh [--4b] [--tp T] [--pp P] [--dry-run] teacher=DIR student=DIR output_dir=DIR data.train=DATA
# Other key=value arguments override the recipe (see launchers/common.sh).
#SBATCH --job-name=minitron-distill-nemotron4
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
recipe=nemotron4_minitron_8b
if [ "${1:-}" = --4b ]; then recipe=nemotron4_minitron_4b; shift; fi
MINITRON_TP=${MINITRON_TP:-8} minitron_launch distill "recipe=$recipe" "$@"
