#!/bin/bash
# minitron export-megatron on a Slurm cluster: sbatch [--nodes=N] launchers/export_megatron.sh [--tp T] [--pp P] [--dry-run] [key=value ...]
#SBATCH --job-name=minitron-export-megatron
#SBATCH --nodes=1
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
minitron_launch export-megatron "$@"
