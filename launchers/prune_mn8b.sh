#!/bin/bash
# Prune stage of the MN-Minitron-8B recipe (nemo_minitron/conf/recipes/mn_minitron_8b.yaml) on a Slurm cluster:
# importance of the (corrected) Mistral-NeMo-12B teacher on 1024 calibration samples of 4096 tokens,
# width pruning to hidden 4096 / FFN 11520. One node x 8 GPUs, --tp 8 by default.
#   sbatch launchers/prune_mn8b.sh [--tp T] [--pp P] [--dry-run] checkpoint=DIR output_dir=DIR calib.data=DATA
# Other key=value arguments override the recipe (see launchers/common.sh).
#SBATCH --job-name=minitron-prune-mn8b
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
MINITRON_TP=${MINITRON_TP:-8} minitron_launch prune recipe=mn_minitron_8b "$@"
