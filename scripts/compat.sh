#!/usr/bin/env bash
# Check nemo-minitron against an older megatron-core: make .venv-mcore-VERSION with that
# megatron-core and transformers 4.57 (the line NeMo 2.x containers and many serving stacks pin),
# then run the core tests in it (bridge, parallel schedules, checkpoints). For megatron-core 0.15.3
# the venv is the NGC NeMo container's stack: NeMo 2.7.3 (nemo_toolkit[nlp,run]) beside nemo-minitron,
# which tests/test_nemo2.py runs NeMo's own converters in.
#
#   bash scripts/compat.sh 0.15.3             # make or update the venv, run the core tests
#   bash scripts/compat.sh 0.15.3 --no-tests  # only make the venv (scripts/install.sh does this)
#
# Idempotent and pinned to the torch CPU build as every venv here (scripts/venv.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
USAGE="usage: scripts/compat.sh MEGATRON_CORE_VERSION [--no-tests]"
MCORE=${1:?$USAGE}
TESTS=${2:-}
case "$TESTS" in ""|--no-tests) ;; *) echo "$USAGE" >&2; exit 2 ;; esac
VENV=.venv-mcore-$MCORE
PACKAGES=(-e . "megatron-core==$MCORE" "transformers==4.57.*" pytest pytest-timeout filelock)
# NeMo 2.7.3 (the last release with the LLM collection) pins megatron-core 0.15.x; it needs numpy 1
# and cannot resolve the newest pyarrow / leptonai on its own.
if [ "$MCORE" = 0.15.3 ]; then
  PACKAGES+=("nemo_toolkit[nlp,run]==2.7.3" "numpy<2" "pyarrow<23" "leptonai<0.47")
fi
install_venv "$VENV" "${PACKAGES[@]}"
[ "$TESTS" = --no-tests ] && exit 0
"$VENV/bin/python" -c 'import megatron.core, transformers, torch; print("megatron-core", megatron.core.__version__, "transformers", transformers.__version__, "torch", torch.__version__)'
start=$(date +%s)
# TP and PP together (the 2 x 2 cases) exercise what TP=2 and PP=2 alone do; the main venv runs those too.
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -m "" -k "not 2-1 and not 1-2" \
  tests/test_bridge.py tests/test_parallel.py tests/test_checkpoint.py
echo "megatron-core $MCORE: core tests passed in $(( $(date +%s) - start )) s"
