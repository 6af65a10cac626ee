#!/bin/bash
# Prune stage of the Llama-3.1-Minitron-4B recipes on a Slurm cluster: importance of the (corrected)
# Llama-3.1-8B teacher on 1024 calibration samples of 4096 tokens, then width pruning to hidden 3072 /
# FFN 9216 (nemo_minitron/conf/recipes/llama31_minitron_4b_width.yaml), or with --depth (the first argument) depth
# pruning to 16 layers, the contiguous block whose removal costs least (llama31_minitron_4b_depth.yaml).
# One node x 8 GPUs, --tp 8 by default.
#   sbatch launchers/prune_llama31_4b.sh [--depth] [--tp T] [--pp P] [--dry-run] checkpoint=DIR output_dir=DIR calib.data=DATA
# Other key=value arguments override the recipe (see launchers/common.sh).
#SBATCH --job-name=minitron-prune-llama31-4b
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
recipe=llama31_minitron_4b_width
if [ "${1:-}" = --depth ]; then recipe=llama31_minitron_4b_depth; shift; fi
MINITRON_TP=${MINITRON_TP:-8} minitron_launch prune "recipe=$recipe" "$@"
