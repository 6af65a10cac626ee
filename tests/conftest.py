import os
import sys
import tempfile
from pathlib import Path

# No test may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Prunes keep their teachers' scores in a cache; the tests' own, fresh each session.
os.environ.setdefault("NEMO_MINITRON_SCORES_CACHE", tempfile.mkdtemp(prefix="minitron-scores-"))
sys.path.insert(0, str(Path(__file__).parent))  # the shared helpers: tiny.py, distributed.py, cli.py
sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))  # config_reference.py, the docs generator

import pytest  # noqa: E402

from commands import COMPAT_MCORE, COMPAT_PYTHON  # noqa: E402


@pytest.fixture(scope="session")
def compat_python() -> Path:
    if not COMPAT_PYTHON.is_file():
        pytest.fail(f"{COMPAT_PYTHON} is missing: run `bash scripts/install.sh` (it makes the venv of "
                    f"megatron-core {COMPAT_MCORE}, transformers 4.57 and NeMo 2.7.3)")
    return COMPAT_PYTHON


@pytest.fixture(scope="session")
def embedded_teacher(tmp_path_factory) -> Path:
    """The embedded teacher (SmolLM2-135M from its GGUF) imported once per session; tests only read it."""
    from commands import minitron

    out = tmp_path_factory.mktemp("embedded_teacher") / "teacher"
    minitron("import", "model=smollm2-135m", f"output_dir={out}")
    return out
