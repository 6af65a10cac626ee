#!/bin/bash
# minitron teacher-logits (an offline teacher) on a Slurm cluster: sbatch [--nodes=N] launchers/teacher_logits.sh [--tp T] [--pp P] [--dry-run] [key=value ...]
#SBATCH --job-name=minitron-teacher-logits
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
minitron_launch teacher-logits "$@"
