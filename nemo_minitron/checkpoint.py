"""Checkpoint directories: what every stage reads and writes.

    DIR/
      model_config.json   the ModelArch (readable, editable by hand)
      metadata.json       which stage wrote it, from what, at which parallel layout, extra info
      tokenizer/          Hugging Face tokenizer files
      weights/            megatron distributed checkpoint (loads at any TP/PP)

A save is written into `DIR.partial` and renamed to `DIR` only when complete, so a killed save
never leaves a directory that looks finished; `is_complete(DIR)` is what resumable stages check.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nemo_minitron import parallel
from nemo_minitron.models.config import ModelArch

CONFIG_FILE = "model_config.json"
METADATA_FILE = "metadata.json"
WEIGHTS_DIR = "weights"
TOKENIZER_DIR = "tokenizer"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or inconsistent."""


def is_complete(path: str | Path) -> bool:
    path = Path(path)
    return (path / METADATA_FILE).is_file() and (path / CONFIG_FILE).is_file() and (path / WEIGHTS_DIR).is_dir()


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def start_partial(path: str | Path, subdir: str) -> tuple[Path, Path]:
    """(absolute `path`, a fresh `path.partial/subdir` to write into) for an atomic save (collective);
    `replace_dir(partial, path)` publishes it."""
    path = Path(path).absolute()
    partial = path.with_name(path.name + ".partial")
    if parallel.is_main_process():
        shutil.rmtree(partial, ignore_errors=True)
        (partial / subdir).mkdir(parents=True)
    _barrier()
    return path, partial


def save_checkpoint(model, path: str | Path, tokenizer=None, metadata: dict[str, Any] | None = None) -> Path:
    """Save `model` (collective: every rank calls it) with its config, tokenizer and metadata."""
    from megatron.core import dist_checkpointing

    path, partial = start_partial(path, WEIGHTS_DIR)
    dist_checkpointing.save(model.sharded_state_dict(), str(partial / WEIGHTS_DIR))
    _barrier()
    if parallel.is_main_process():
        model.arch.save(partial / CONFIG_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(partial / TOKENIZER_DIR)
        layout = parallel.layout()
        info = {
            "format": "nemo_minitron/1",
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "saved_with": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp},
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            **(metadata or {}),
        }
        (partial / METADATA_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
        replace_dir(partial, path)
    _barrier()
    return path


def replace_dir(new: Path, target: Path) -> None:
    """Swap `new` into place as `target`; an old `target` is only removed after the swap."""
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def read_arch(path: str | Path) -> ModelArch:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint={path} does not exist")
    if not is_complete(path):
        hint = " (an interrupted save left it incomplete)" if path.name.endswith(".partial") else ""
        raise CheckpointError(f"checkpoint={path} is not a nemo-minitron checkpoint directory{hint}")
    return ModelArch.load(path / CONFIG_FILE)


def read_metadata(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / METADATA_FILE).read_text())


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tok_dir = Path(path) / TOKENIZER_DIR
    if not tok_dir.is_dir():
        raise CheckpointError(f"checkpoint={path} has no tokenizer/ directory")
    return AutoTokenizer.from_pretrained(str(tok_dir))


def load_checkpoint(path: str | Path, params_dtype: torch.dtype = torch.float32, arch: ModelArch | None = None):
    """Build the model for the current TP/PP layout and load the weights (collective).

    `arch` overrides the saved config (used when the caller edits the architecture itself).
    """
    from megatron.core import dist_checkpointing

    from nemo_minitron.models.gpt import build_gpt_model

    path = Path(path)
    arch = arch or read_arch(path)
    model = build_gpt_model(arch, params_dtype=params_dtype)
    state = dist_checkpointing.load(model.sharded_state_dict(), str(path / WEIGHTS_DIR))
    model.load_state_dict(state, strict=True)
    return model
