"""Checkpoint directories: what every stage reads and writes.

    DIR/
      model_config.json   the ModelArch (readable, editable by hand)
      metadata.json       which stage wrote it, from what, at which parallel layout, extra info
      tokenizer/          Hugging Face tokenizer files
      weights/            megatron distributed checkpoint (loads at any TP/PP)

A save is written into `DIR.partial` and renamed to `DIR` only when complete, so a killed save
never leaves a directory that looks finished; `is_complete(DIR)` is what resumable stages check.

`save_checkpoint` and `load_weights` work on any megatron-core GPTModel (ours or a caller's own,
local or Transformer Engine spec: megatron maps the fused-norm names of both specs to the same
checkpoint keys); `load_checkpoint` builds our model and loads it.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from nemo_minitron import parallel
from nemo_minitron.atomic import replace_dir
from nemo_minitron.errors import UserError
from nemo_minitron.models.config import ModelArch
from nemo_minitron.models.gpt import arch_of, remember_identity, unwrap_model

CONFIG_FILE = "model_config.json"
METADATA_FILE = "metadata.json"
WEIGHTS_DIR = "weights"
TOKENIZER_DIR = "tokenizer"


class CheckpointError(UserError):
    """A checkpoint directory is missing, incomplete or inconsistent."""


def is_complete(path: str | Path) -> bool:
    path = Path(path)
    return (path / METADATA_FILE).is_file() and (path / CONFIG_FILE).is_file() and (path / WEIGHTS_DIR).is_dir()


def start_partial(path: str | Path, subdir: str) -> tuple[Path, Path]:
    """(absolute `path`, a fresh `path.partial/subdir` to write into) for an atomic save (collective);
    `replace_dir(partial, path)` publishes it."""
    path = Path(path).absolute()
    partial = path.with_name(path.name + ".partial")
    if parallel.is_main_process():
        shutil.rmtree(partial, ignore_errors=True)
        (partial / subdir).mkdir(parents=True)
    parallel.barrier()
    return path, partial


def save_checkpoint(model, path: str | Path, tokenizer=None, metadata: dict[str, Any] | None = None) -> Path:
    """Save `model` (collective: every rank calls it) with its config, tokenizer and metadata."""
    from megatron.core import dist_checkpointing

    arch = arch_of(model)
    model = unwrap_model(model)
    path, partial = start_partial(path, WEIGHTS_DIR)
    dist_checkpointing.save(model.sharded_state_dict(), str(partial / WEIGHTS_DIR))
    parallel.barrier()
    if parallel.is_main_process():
        arch.save(partial / CONFIG_FILE)
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
    parallel.barrier()
    return path


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


def _load_dist_weights(model, path: Path) -> None:
    from megatron.core import dist_checkpointing

    model = unwrap_model(model)
    state = dist_checkpointing.load(model.sharded_state_dict(), str(path / WEIGHTS_DIR))
    model.load_state_dict(state, strict=True)


def load_checkpoint(path: str | Path, params_dtype: torch.dtype = torch.float32):
    """Build the model for the current TP/PP layout and load the weights (collective)."""
    from nemo_minitron.models.gpt import build_gpt_model

    path = Path(path)
    model = build_gpt_model(read_arch(path), params_dtype=params_dtype)
    _load_dist_weights(model, path)
    return model


def load_weights(model, path: str | Path) -> ModelArch:
    """Fill a caller-built GPTModel (this rank's TP/PP shard) from a nemo-minitron checkpoint or a
    Hugging Face model directory (collective). The model must have the architecture the weights
    were saved with; returns that architecture. A Hugging Face directory is read whole on every
    rank and split into this rank's shards (global -> local, `models/bridge.py`)."""
    from nemo_minitron.models import bridge

    path = Path(path)
    hf_state = None  # stays None for a nemo-minitron checkpoint
    if is_complete(path):
        saved = read_arch(path)
    elif (path / "config.json").is_file():
        from nemo_minitron.models.hf_io import read_hf_directory

        saved, hf_state, _ = read_hf_directory(path, next(model.parameters()).dtype)
    else:
        raise CheckpointError(f"{path} is neither a nemo-minitron checkpoint nor a Hugging Face model directory")
    differences = arch_of(model).differences(saved)
    if differences:
        raise CheckpointError(f"the model does not match the weights in {path}: {', '.join(differences)} "
                              f"(model vs weights)")
    if hf_state is None:
        _load_dist_weights(model, path)
    else:
        bridge.load_global(model, bridge.hf_to_global(saved, hf_state))
    remember_identity(model, saved)
    return saved
