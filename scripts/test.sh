#!/usr/bin/env bash
# Install what the tests need (idempotent) and run them; CI runs `bash scripts/test.sh`.
#
#   bash scripts/test.sh            # the full suite: every tier but `measure`, two pytest-xdist workers
#   bash scripts/test.sh -m measure # the quality measurements on the embedded teacher (~34 CPU-minutes)
#   bash scripts/test.sh --fast     # the default tier only (what plain `pytest` runs), no NeMo venv
#   bash scripts/test.sh ... ARGS   # ARGS go to pytest (a file, -k EXPR, --durations=20, ...)
#
# The tiers are pytest markers (pyproject.toml): plain `pytest` leaves out `slow` (process-starting
# equivalence checks, measurements on the embedded teacher) and `nemo` (the megatron-core 0.15.3 +
# NeMo 2.7.3 venv, which scripts/compat.sh makes); `gpu` tests run only where CUDA is present
# (scripts/gpu_check.sh). Each test file runs on one worker (--dist loadfile), so a file's shared
# fixtures are built once.
set -euo pipefail
cd "$(dirname "$0")/.."
TIER=(-m "not measure")  # the `measure` tier runs on request: bash scripts/test.sh -m measure
NEED_GIB=10  # the two venvs (~5 GiB with pip's scratch) and the tests' checkpoints under the temp dir (~2 GiB)
if [ "${1:-}" = --fast ]; then TIER=(); NEED_GIB=4; shift; fi
# A full disk fails tests all over the suite, slowly: refuse at once, saying where.
for dir in . "${TMPDIR:-/tmp}"; do
  read -r free_kib mount < <(df -Pk "$dir" | awk 'NR == 2 {print $4, $6}')
  free_gib=$(( free_kib / 1048576 ))
  if [ "$free_gib" -lt "$NEED_GIB" ]; then
    echo "error: $free_gib GiB free on $mount (holding $(cd "$dir" && pwd));" \
         "the tests need about $NEED_GIB GiB there: free some space first" >&2
    exit 1
  fi
done
bash scripts/install.sh --test
if [ ${#TIER[@]} -gt 0 ]; then bash scripts/compat.sh 0.15.3 --no-tests; fi
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile "${TIER[@]}" "$@"
