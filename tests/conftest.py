import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

# No test may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Prunes keep their teachers' scores in a cache; the tests' own, fresh each session and removed by
# the process that made it (xdist's workers inherit the controller's).
if "NEMO_MINITRON_SCORES_CACHE" not in os.environ:
    os.environ["NEMO_MINITRON_SCORES_CACHE"] = tempfile.mkdtemp(prefix="minitron-scores-")
    atexit.register(shutil.rmtree, os.environ["NEMO_MINITRON_SCORES_CACHE"], ignore_errors=True)
sys.path.insert(0, str(Path(__file__).parent))  # the shared helpers: tiny.py, distributed.py, cli.py
sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))  # config_reference.py, the docs generator

import pytest  # noqa: E402

from commands import COMPAT_MCORE, COMPAT_PYTHON  # noqa: E402
from shared import built_once  # noqa: E402


@pytest.fixture(scope="session")
def compat_python() -> Path:
    if not COMPAT_PYTHON.is_file():
        pytest.fail(f"{COMPAT_PYTHON} is missing: run `bash scripts/test.sh` (it makes the venv of "
                    f"megatron-core {COMPAT_MCORE}, transformers 4.57 and NeMo 2.7.3)")
    return COMPAT_PYTHON


def pytest_configure(config):
    """In-process tests use this worker's share of the cores (`distributed.core_share`)."""
    import torch

    from distributed import core_share

    torch.set_num_threads(core_share())


def pytest_collection_modifyitems(config, items):
    """Tests that use the NeMo venv (the `compat_python` fixture, directly or through another
    fixture) are `nemo` tests; `gpu` tests are skipped, saying why, where CUDA is absent."""
    import torch

    no_gpu = pytest.mark.skip(reason="needs CUDA: no GPU here (scripts/gpu_check.sh runs these where there is one)")
    for item in items:
        if "compat_python" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.nemo)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)


@pytest.fixture(scope="session")
def shared_dir(request, tmp_path_factory) -> Path:
    """A directory all pytest-xdist workers of this run share (their base directories' parent), for
    `shared.built_once`. Asked of pytest's config, not the environment: a pytest started by a test
    inherits PYTEST_XDIST_WORKER without being a worker."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if hasattr(request.config, "workerinput") else base


@pytest.fixture(scope="session")
def tiny_teacher_source(shared_dir) -> Path:
    """`hf/`, the tiny teacher `tiny_arch(tie=True)` as a Hugging Face directory, and `teacher/`, its
    import, made once per run. Read-only: a module that writes beside them copies the directory
    (`copy_tiny_teacher`), which takes milliseconds where an import takes seconds."""
    from nemo_minitron.convert import ImportConfig, import_checkpoint
    from tiny import tiny_arch, write_hf_dir

    def build(root: Path) -> None:
        write_hf_dir(root / "hf", tiny_arch(tie=True))
        import_checkpoint(ImportConfig(hf_path=str(root / "hf"), output_dir=str(root / "teacher")))

    return built_once(shared_dir, "tiny_teacher", build)


@pytest.fixture(scope="session")
def embedded_teacher(shared_dir) -> Path:
    """The embedded teacher (SmolLM2-135M from its GGUF) imported once per run, by the first
    worker that needs it; tests only read it."""
    from nemo_minitron.convert import ImportConfig, import_checkpoint

    return built_once(shared_dir, "embedded_teacher",
                      lambda out: import_checkpoint(ImportConfig(model="smollm2-135m", output_dir=str(out))))
