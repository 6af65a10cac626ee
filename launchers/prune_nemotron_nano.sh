#!/bin/bash
# Prune stage of the Nemotron-Nano-9B-v2 recipe (nemo_minitron/conf/recipes/nemotron_nano_9b_v2.yaml) on a Slurm
# cluster: importance of the Nemotron-Nano-12B-v2 teacher (hybrid Mamba-Transformer) on 1024 calibration samples
# of 4096 tokens, 6 named layers dropped, hidden 5120 -> 4480, FFN 20480 -> 15680. One node x 8 GPUs, --tp 8 by
# default (the 128 Mamba heads, 8 SSM groups and 8 query groups split over 8 ranks).
#   sbatch launchers/prune_nemotron_nano.sh [--tp T] [--pp P] [--dry-run] checkpoint=DIR output_dir=DIR calib.data=DATA
# Other key=value arguments override the recipe (see launchers/common.sh).
#SBATCH --job-name=minitron-prune-nemotron-nano
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
MINITRON_TP=${MINITRON_TP:-8} minitron_launch prune recipe=nemotron_nano_9b_v2 "$@"
