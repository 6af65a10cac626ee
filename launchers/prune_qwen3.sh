#!/bin/bash
# Prune stage of the Qwen3 recipes on a Slurm cluster: importance of Qwen3-8B on 1024 calibration
# samples of 4096 tokens, then 30 layers / hidden 3584 / FFN 11776 (nemo_minitron/conf/recipes/qwen3_8b_to_6b.yaml),
# or with --moe (the first argument) Qwen3-30B-A3B cut to 96 of its 128 experts per layer by the
# router-weighted output norm of each expert (qwen3_30b_a3b_96_experts.yaml). One node x 8 GPUs:
# --tp 8 by default for the dense model, --tp 1 --ep 8 (experts split over the 8 GPUs) for the MoE.
#   sbatch launchers/prune_qwen3.sh [--moe] [--tp T] [--pp P] [--ep E] [--dry-run] checkpoint=DIR output_dir=DIR calib.data=DATA
# Other key=value arguments override the recipe (see launchers/common.sh).
#SBATCH --job-name=minitron-prune-qwen3
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --time=02:00:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
# sbatch runs a copy of this file from its spool directory: find common.sh from the submit dir.
. "${MINITRON_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/launchers/common.sh"
if [ "${1:-}" = --moe ]; then
  shift
  MINITRON_TP=${MINITRON_TP:-1} MINITRON_EP=${MINITRON_EP:-8} minitron_launch prune recipe=qwen3_30b_a3b_96_experts "$@"
else
  MINITRON_TP=${MINITRON_TP:-8} minitron_launch prune recipe=qwen3_8b_to_6b "$@"
fi
