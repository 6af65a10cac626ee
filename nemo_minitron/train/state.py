"""Training checkpoints: everything a run needs to continue exactly where it stopped.

    OUT/checkpoints/step_0000100/
      model/                 the trained model as a nemo-minitron checkpoint (eval/export load it)
      train_state/rank_*.pt  per rank: RNG states; on data-parallel rank 0 also the optimizer and
                             LR-schedule state and extra trained tensors (e.g. distillation
                             projections), which every replica of that TP x PP shard reloads
      trainer.json           step, consumed samples, parallel layout and the run's settings

A checkpoint is written under `step_N.partial` and renamed when complete; only complete ones are
resumed from. The newest `train.keep_checkpoints` complete ones are kept; with `train.keep_models`
the older ones keep `model/` alone: a curve of checkpoints to evaluate, without the optimizer
state that makes up most of each (160 MB of 1.1 GB for the main job's student). The optimizer
state is per TP x PP shard, so a run resumes at the layout it was saved with (the model weights
alone reshard: `model/` loads at any layout).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from nemo_minitron import checkpoint, parallel
from nemo_minitron.errors import UserError
from nemo_minitron.outputs import check_same_settings, publishing

CHECKPOINTS_DIR = "checkpoints"
MODEL_DIR = "model"
STATE_DIR = "train_state"
TRAINER_FILE = "trainer.json"
_STEP = re.compile(r"^step_(\d{7})$")


def step_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR / f"step_{step:07d}"


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete step checkpoints under `output_dir`, oldest first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP.match(p.name) and (p / TRAINER_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.copy()), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _rank_file(path: Path, rank: int) -> Path:
    return path / STATE_DIR / f"rank_{rank:05d}.pt"


def save(path: Path, *, model, tokenizer, metadata: dict, optimizer, scheduler,
         extra: dict[str, torch.Tensor], info: dict) -> Path:
    """Write a training checkpoint to `path` (collective)."""
    from megatron.core import parallel_state as ps

    with publishing(path, STATE_DIR) as partial:
        checkpoint.save_checkpoint(model, partial / MODEL_DIR, tokenizer, metadata)
        state: dict[str, Any] = {"rng": rng_state()}
        if ps.get_data_parallel_rank() == 0:
            state.update(
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                extra={name: t.detach().cpu().clone() for name, t in extra.items()},
            )
        torch.save(state, _rank_file(partial, dist.get_rank() if dist.is_initialized() else 0))
        if parallel.is_main_process():
            (partial / TRAINER_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
    return Path(path).absolute()


def check_resumable(path: Path, layout: parallel.ParallelLayout, signature: dict) -> dict:
    """trainer.json of step checkpoint `path`; a UserError when the run cannot continue from it (another
    layout, or settings that differ: the same refusal, listing every changed key, as a stage's)."""
    info = json.loads((Path(path) / TRAINER_FILE).read_text())
    saved = info["layout"]
    now = {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp}
    if saved != now:
        raise UserError(
            f"checkpoint {path} was saved at tp={saved['tp']} pp={saved['pp']} dp={saved['dp']} but this run has "
            f"tp={now['tp']} pp={now['pp']} dp={now['dp']}: resume with the same tp=, pp= and number of processes, "
            f"or start from {Path(path) / MODEL_DIR} in a new output_dir"
        )
    check_same_settings(f"output_dir={Path(path).parent.parent}", "a training run", info["signature"], signature,
                        "or choose another output_dir")
    return info


def _load(path: Path, rank: int) -> dict[str, Any]:
    return torch.load(_rank_file(path, rank), weights_only=True, map_location="cpu")


def load(path: Path, *, model, optimizer, scheduler, extra: dict[str, torch.Tensor]) -> None:
    """Restore weights, optimizer, schedule, extra tensors and RNG states from `path` (collective)."""
    from megatron.core import parallel_state as ps

    path = Path(path)
    checkpoint.load_dist_weights(model, path / MODEL_DIR)
    rank = dist.get_rank() if dist.is_initialized() else 0
    own = _load(path, rank)
    # Data-parallel replicas hold identical optimizer states; replica 0 of this shard saved them.
    replica_0 = dist.get_process_group_ranks(ps.get_data_parallel_group())[0] if dist.is_initialized() else 0
    shard = own if rank == replica_0 else _load(path, replica_0)
    optimizer.load_state_dict(shard["optimizer"])
    scheduler.load_state_dict(shard["scheduler"])
    with torch.no_grad():
        for name, tensor in extra.items():
            tensor.copy_(shard["extra"][name])
    set_rng_state(own["rng"])


def keep_newest(output_dir: Path, keep: int, models: bool = False) -> None:
    """Delete all but the newest `keep` complete step checkpoints (rank 0); with `models`, an older
    one keeps its `model/` (what evaluation and export load) and loses only what resuming needs,
    trainer.json first, so that it is never taken for a complete checkpoint without its state."""
    if parallel.is_main_process():
        for old in complete_checkpoints(output_dir)[:-keep]:
            if models:
                (old / TRAINER_FILE).unlink()
                shutil.rmtree(old / STATE_DIR, ignore_errors=True)
            else:
                shutil.rmtree(old, ignore_errors=True)
