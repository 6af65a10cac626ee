"""Checkpoint directories: what every stage reads and writes.

    DIR/
      model_config.json   the ModelArch (readable, editable by hand)
      metadata.json       which stage wrote it, from what, at which parallel layout, extra info
      tokenizer/          Hugging Face tokenizer files
      weights/            megatron distributed checkpoint (loads at any TP/PP)

A save is written into `DIR.partial` and renamed to `DIR` only when complete, so a killed save
never leaves a directory that looks finished; `is_complete(DIR)` is what resumable stages check.
metadata.json records the size and SHA-256 of every weights/ file (`files`); every load checks them
and the tensor shapes against model_config.json first (`verify_checkpoint`, also `minitron check`),
so a truncated shard, a lost file or a hand-edited config is reported in one line naming the file,
not as a traceback from deep inside megatron.

megatron's checkpoint writer forks worker processes and starts a multiprocessing manager; saves run
inside `writer_processes.writers_die_with_parent()`, so a save killed with SIGKILL leaves no
orphaned writer behind.

`save_checkpoint` and `load_weights` work on any megatron-core GPTModel (ours or a caller's own,
local or Transformer Engine spec: megatron maps the fused-norm names of both specs to the same
checkpoint keys); `load_checkpoint` builds our model and loads it.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nemo_minitron import parallel
from nemo_minitron.errors import UserError, read_json
from nemo_minitron.models.bridge import checkpoint_shapes
from nemo_minitron.models.config import ModelArch
from nemo_minitron.models.gpt import arch_of, remember_identity, unwrap_model
from nemo_minitron.models.hf_io import save_portable_tokenizer
from nemo_minitron.outputs import publishing
from nemo_minitron.writer_processes import writers_die_with_parent

CONFIG_FILE = "model_config.json"
METADATA_FILE = "metadata.json"
WEIGHTS_DIR = "weights"
TOKENIZER_DIR = "tokenizer"
ENTRIES = (CONFIG_FILE, METADATA_FILE, TOKENIZER_DIR, WEIGHTS_DIR)


class CheckpointError(UserError):
    """A checkpoint directory is missing, incomplete or inconsistent."""


def is_complete(path: str | Path) -> bool:
    path = Path(path)
    return (path / METADATA_FILE).is_file() and (path / CONFIG_FILE).is_file() and (path / WEIGHTS_DIR).is_dir()


def save_checkpoint(model, path: str | Path, tokenizer=None, metadata: dict[str, Any] | None = None) -> Path:
    """Save `model` (collective: every rank calls it) with its config, tokenizer and metadata."""
    from megatron.core import dist_checkpointing

    arch = arch_of(model)
    model = unwrap_model(model)
    with publishing(path, WEIGHTS_DIR) as partial:
        with writers_die_with_parent():
            dist_checkpointing.save(model.sharded_state_dict(), str(partial / WEIGHTS_DIR))
        parallel.barrier()
        if parallel.is_main_process():
            arch.save(partial / CONFIG_FILE)
            if tokenizer is not None:  # readable by transformers 4.x too (the NGC NeMo containers' line)
                save_portable_tokenizer(tokenizer, partial / TOKENIZER_DIR)
            layout = parallel.layout()
            info = {
                "format": "nemo_minitron/1",
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "saved_with": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp},
                "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                **(metadata or {}),
                "files": file_records(partial),
            }
            (partial / METADATA_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
    return Path(path).absolute()


def read_arch(path: str | Path) -> ModelArch:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint={path} does not exist")
    if not is_complete(path):
        hint = " (an interrupted save left it incomplete)" if path.name.endswith(".partial") else ""
        raise CheckpointError(f"checkpoint={path} is not a nemo-minitron checkpoint directory{hint}")
    return ModelArch.load(path / CONFIG_FILE)


def read_metadata(path: str | Path) -> dict[str, Any]:
    return read_json(Path(path) / METADATA_FILE, CheckpointError)


# --- integrity -------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def file_records(root: Path) -> dict[str, dict[str, Any]]:
    """{path relative to `root`: {"bytes", "sha256"}} of every file under `root`/weights. The config
    and tokenizer files are left out: they may be edited by hand (the shape check covers the config)."""
    files = sorted(p for p in (root / WEIGHTS_DIR).rglob("*") if p.is_file())
    return {str(p.relative_to(root)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}


def _file_problems(root: Path, records: dict[str, dict[str, Any]], checksums: bool) -> list[str]:
    problems = []
    for name, record in records.items():
        file = root / name
        if not file.is_file():
            problems.append(f"{file} is missing")
        elif file.stat().st_size != record["bytes"]:
            problems.append(f"{file} has {file.stat().st_size} bytes but was saved with {record['bytes']} "
                            f"(truncated or replaced)")
        elif checksums and _sha256(file) != record["sha256"]:
            problems.append(f"{file} differs from what was saved (SHA-256 mismatch: the file is damaged)")
    return problems


def _shape_problems(path: Path, arch: ModelArch) -> list[str]:
    """The tensors of weights/ whose global shape is not what model_config.json implies."""
    from megatron.core import dist_checkpointing

    try:
        saved = {k: tuple(v.global_shape) for k, v in dist_checkpointing.load_tensors_metadata(
            str(path / WEIGHTS_DIR)).items() if hasattr(v, "global_shape")}
    except Exception as err:  # megatron/torch raise many types for an unreadable index
        return [f"{path / WEIGHTS_DIR} has no readable tensor index ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''})"]
    problems = []
    for key, shape in checkpoint_shapes(arch).items():
        if key not in saved:
            problems.append(f"{path / WEIGHTS_DIR} lacks the tensor {key} that {path / CONFIG_FILE} implies")
        elif saved[key] != shape:
            problems.append(f"{path / CONFIG_FILE} implies {key} of shape {shape}, but {path / WEIGHTS_DIR} "
                            f"holds {saved[key]}: the config does not describe these weights")
    return problems


def verify_checkpoint(path: str | Path, checksums: bool = True) -> dict[str, Any]:
    """Check a checkpoint without building the model: config and metadata readable, every recorded
    file present with its size (and SHA-256 when `checksums`), every tensor's shape the one the
    config implies. Raises CheckpointError with the first problem (and how many more); returns a
    summary. In a distributed job the ranks split the checksum work (collective)."""
    path = Path(path)
    arch = read_arch(path)
    records = read_metadata(path).get("files")
    problems = []
    if records is not None:
        problems += _file_problems(path, records, checksums=False)
        if checksums and not problems:
            rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
            mine = dict(sorted(records.items())[rank::world])
            problems += _file_problems(path, mine, checksums=True)
    if not problems:
        problems += _shape_problems(path, arch)
    problems += _tokenizer_problems(path)
    if dist.is_initialized():
        gathered: list[list[str]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, problems)
        problems = sorted({p for rank in gathered for p in rank})
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise CheckpointError(f"checkpoint={path} is damaged: {problems[0]}{more}")
    return {"checkpoint": str(path.absolute()), "files": len(records or {}),
            "bytes": sum(r["bytes"] for r in (records or {}).values()),
            "checksums": ("sha256" if checksums else "sizes only") if records is not None else "not recorded",
            "tensors": len(checkpoint_shapes(arch)), **arch.shape()}


def _tokenizer_problems(path: Path) -> list[str]:
    """The JSON files of the checkpoint's tokenizer (tokenizer.json, tokenizer_config.json,
    special_tokens_map.json, ...) readable as JSON, each problem naming the file. (A checkpoint may
    be saved without a tokenizer; `load_tokenizer` says so when one is needed.)"""
    problems = []
    for file in sorted((path / TOKENIZER_DIR).glob("*.json")):
        try:
            read_json(file, CheckpointError, kind=None)
        except CheckpointError as err:
            problems.append(str(err))
    return problems


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer; a damaged one is a CheckpointError naming the file, not a
    traceback from transformers."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / TOKENIZER_DIR).is_dir():
        raise CheckpointError(f"checkpoint={path} has no tokenizer/ directory")
    problems = _tokenizer_problems(path)
    if problems:
        raise CheckpointError(f"checkpoint={path} has a damaged tokenizer: {problems[0]}")
    try:
        return AutoTokenizer.from_pretrained(str(path / TOKENIZER_DIR))
    except Exception as err:  # noqa: BLE001 - whatever transformers makes of files it cannot use
        raise CheckpointError(f"checkpoint={path}: its tokenizer/ does not load ({type(err).__name__}: "
                              f"{(str(err).splitlines() or [''])[0]})") from err


def load_dist_weights(model, path: Path) -> None:
    """Fill `model` from the weights/ of checkpoint `path` after `verify_checkpoint` (collective)."""
    from megatron.core import dist_checkpointing

    verify_checkpoint(path)
    model = unwrap_model(model)
    try:
        state = dist_checkpointing.load(model.sharded_state_dict(), str(path / WEIGHTS_DIR))
    except Exception as err:  # a checkpoint saved before files were recorded can still be damaged
        raise CheckpointError(f"cannot read the weights of checkpoint={path}: {type(err).__name__}: "
                              f"{(str(err).splitlines() or [''])[0]}") from err
    model.load_state_dict(state, strict=True)


def load_checkpoint(path: str | Path, params_dtype: torch.dtype = torch.float32, sequence_parallel: bool = False):
    """Build the model for the current TP/PP layout and load the weights (collective)."""
    from nemo_minitron.models.gpt import build_gpt_model

    path = Path(path)
    model = build_gpt_model(read_arch(path), params_dtype=params_dtype, sequence_parallel=sequence_parallel)
    load_dist_weights(model, path)
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
        load_dist_weights(model, path)
    else:
        bridge.load_global(model, bridge.hf_to_global(saved, hf_state))
    remember_identity(model, saved)
    return saved
