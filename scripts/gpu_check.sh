#!/usr/bin/env bash
# The GPU checks in one command, under 10 minutes on one node: tests/test_gpu.py (the Transformer
# Engine layer spec against the local spec, dense, MoE and hybrid, TE norms under sequence parallelism at TP=2, importance
# on grouped-GEMM experts, a bf16 distillation step, `minitron pipeline`), then one summary line.
#
#   bash scripts/gpu_check.sh                      # in the NGC NeMo container, or any Python with CUDA
#                                                  # torch and this package's dependencies
#   bash scripts/gpu_check.sh --fetch-wheels DIR   # here, with network: the wheels a bare CUDA-torch
#                                                  # Python 3.12 lacks, to carry to a node that has none
#   bash scripts/gpu_check.sh --wheels DIR         # there: install them into /tmp, then check
#
# On a machine without CUDA every test is reported as skipped, with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# What the NGC container has and a bare CUDA-torch image lacks (megatron-core pinned as in install.sh).
MISSING=("megatron-core==0.16.1" "hydra-core==1.3.2" "omegaconf==2.3.0" "antlr4-python3-runtime==4.9.3" "gguf" "einops")
case "${1:-}" in
  --fetch-wheels)
    DIR=${2:?usage: scripts/gpu_check.sh --fetch-wheels DIR}
    mkdir -p "$DIR"
    # antlr4's 4.9.3 (the one hydra 1.3 takes) is a source release: build its pure-Python wheel here.
    "$PY" -m pip wheel -q --no-deps -w "$DIR" "antlr4-python3-runtime==4.9.3"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$DIR" "${MISSING[@]:0:3}" "${MISSING[@]:4}"
    ls "$DIR"
    exit 0 ;;
  --wheels)
    DIR=${2:?usage: scripts/gpu_check.sh --wheels DIR}
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/minitron-site "$DIR"/*.whl
    export PYTHONPATH=/tmp/minitron-site${PYTHONPATH:+:$PYTHONPATH} ;;
  "") ;;
  *) echo "usage: scripts/gpu_check.sh [--fetch-wheels DIR | --wheels DIR]" >&2; exit 2 ;;
esac
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1
ENVIRONMENT=$("$PY" - <<'EOF'
import importlib.metadata as md, torch
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "absent"
gpus = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
print(f"{gpus}, torch {torch.__version__} (CUDA {torch.version.cuda}), megatron-core {version('megatron-core')}, "
      f"Transformer Engine {version('transformer-engine')}")
EOF
)
LOG=$(mktemp)
start=$(date +%s)
set +e
"$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_gpu.py 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
set -e
echo "gpu check: $ENVIRONMENT: $(grep -E '(passed|failed|skipped|error)' "$LOG" | tail -1 | tr -d '=' | xargs) ($(( $(date +%s) - start )) s)"
rm -f "$LOG"
exit "$status"
