#!/bin/bash
# Distillation stage of the Nemotron-Nano-9B-v2 recipe (nemo_minitron/conf/recipes/nemotron_nano_9b_v2.yaml) on a
# Slurm cluster: the pruned hybrid student from its Nemotron-Nano-12B-v2 teacher, forward KL, peak LR 1e-4 ->
# 4.5e-7 cosine, 60 warmup steps, global batch 768 x 8192 tokens, 380B tokens (MN-Minitron-8B's schedule). 32 nodes
# x 8 GPUs, --tp 8 by default; the run spans many jobs: each checkpoints before its time limit and requeues itself.
#   sbatch launchers/distill_nemotron_nano.sh [--tp T] [--pp P] [--dry-run] teacher=DIR student=DIR output_dir=DIR data.train=DATA
# Other key=value arguments override the recipe (see launchers/common.sh).
#SBATCH --job-name=minitron-distill-nemotron-nano
#SBATCH --nodes=32
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
MINITRON_TP=${MINITRON_TP:-8} minitron_launch distill recipe=nemotron_nano_9b_v2 "$@"
