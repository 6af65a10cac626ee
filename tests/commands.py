"""Running the `minitron` console script from tests: one process, or several under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
# The venv scripts/test.sh makes with `scripts/compat.sh 0.15.3 --no-tests`: megatron-core 0.15.3,
# transformers 4.57 and NeMo 2.7.3, the stack of the NGC NeMo containers (the `compat_python` fixture).
COMPAT_MCORE = "0.15.3"
COMPAT_PYTHON = Path(__file__).parents[1] / f".venv-mcore-{COMPAT_MCORE}" / "bin" / "python"


def minitron(*args: str, nproc: int = 1, check: bool = True, python: str = sys.executable) -> subprocess.CompletedProcess:
    """`minitron ARGS` run by `python` (another venv's interpreter runs its own environment)."""
    if nproc == 1:
        cmd = [python, "-m", "nemo_minitron.cli.main", *args]
    else:
        cmd = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "nemo_minitron.cli.main", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def last_json(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])
