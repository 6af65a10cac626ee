#!/bin/bash
# Distillation stage of the Qwen3 recipes on a Slurm cluster: the 6B student pruned from Qwen3-8B
# (nemo_minitron/conf/recipes/qwen3_8b_to_6b.yaml), or with --moe (the first argument) Qwen3-30B-A3B
# with 96 experts per layer (qwen3_30b_a3b_96_experts.yaml): forward KL, peak LR 1e-4 -> 1e-5 cosine,
# 40 warmup steps, global batch 1152 x 8192 tokens, 94B tokens. 16 nodes x 8 GPUs; --tp 8 by default
# for the dense student, --tp 1 --ep 8 for the MoE (its experts, most of its weights, split over 8
# ranks; --tp > 1 works too, training with sequence parallelism). The run spans several jobs: each
# checkpoints before its time limit and requeues itself.
#   sbatch launchers/distill_qwen3.sh [--moe] [--tp T] [--pp P] [--ep E] [--dry-run] teacher=DIR student=DIR output_dir=DIR data.train=DATA
# Other key=value arguments override the recipe (see launchers/common.sh).
#SBATCH --job-name=minitron-distill-qwen3
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
if [ "${1:-}" = --moe ]; then
  shift
  MINITRON_TP=${MINITRON_TP:-1} MINITRON_EP=${MINITRON_EP:-8} minitron_launch distill recipe=qwen3_30b_a3b_96_experts "$@"
else
  MINITRON_TP=${MINITRON_TP:-8} minitron_launch distill recipe=qwen3_8b_to_6b "$@"
fi
