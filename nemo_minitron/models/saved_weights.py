"""A model's weights out of a megatron distributed checkpoint that another framework wrote
(Megatron-LM's `iter_NNNNNNN/`, NeMo 2's `weights/`).

Such a save is a megatron-core distributed checkpoint of the GPTModel's `sharded_state_dict()`, as
ours is, with three differences this module absorbs:
- the keys may carry a prefix: NeMo 2 wraps the model, so its tensors are `module.<our key>`;
- the per-layer norms are stored under the fused (Transformer Engine) names
  `self_attention.linear_qkv.layer_norm_weight` / `mlp.linear_fc1.layer_norm_weight`, which
  megatron-core's local spec also writes (its `sharded_state_dict_keys_map`); a save made without
  that map holds the local names `input_layernorm.weight` / `pre_mlp_layernorm.weight`: both are read;
- the save also holds optimizer, RNG and trainer state, which is not asked for, and a common state
  (`common.pt`) whose classes torch's weights-only loader may refuse (`common_state_readable`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from nemo_minitron.errors import UserError
from nemo_minitron.models.bridge import checkpoint_shapes, fused_norm_aliases
from nemo_minitron.models.config import ModelArch
from nemo_minitron.models.gpt import unwrap_model

COMMON_FILE = "common.pt"


class _Unreadable:
    """Stands in for a class in a common state that this environment lacks or megatron-core does not
    allow (e.g. an enum of a newer Megatron-LM): such settings are never weights, and nothing of the
    file is executed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


@contextmanager
def allowed_classes(classes: Sequence[Any], alone: bool = False) -> Iterator[None]:
    """Inside the block torch's weights-only loader accepts `classes` (types, or (type, name)
    pairs), also alone, without anything allowed before (`alone`: to check what a file needs);
    afterwards its allowlist is exactly what it was. (torch's own `safe_globals` removes its classes
    on exit even when they were allowed before, such as the `argparse.Namespace` megatron-core
    allows at import, which a later megatron load of a Megatron-LM save in this process needs.)"""
    from torch import serialization

    before = serialization.get_safe_globals()
    if alone:
        serialization.clear_safe_globals()
    serialization.add_safe_globals(list(classes))
    try:
        yield
    finally:
        serialization.clear_safe_globals()
        serialization.add_safe_globals(before)


@contextmanager
def common_state_readable(path: Path, allowed: Sequence[type] = ()) -> Iterator[Path]:
    """Inside the block, torch's weights-only loader (which megatron-core reads the common state with)
    accepts every class in `path`/common.pt: those in `allowed` as themselves, the others as
    `_Unreadable`. Yields the file."""
    from torch import serialization

    file = path / COMMON_FILE
    if not file.is_file():
        raise UserError(f"{path} has no {COMMON_FILE}: the save is incomplete")
    names = {f"{cls.__module__}.{cls.__qualname__}" for cls in allowed}
    unknown = [name for name in serialization.get_unsafe_globals_in_checkpoint(file) if name not in names]
    with allowed_classes([*allowed, *[(_Unreadable, name) for name in unknown]]):
        yield file


def saved_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> global shape of every tensor in the distributed checkpoint at `path`."""
    from megatron.core import dist_checkpointing

    return {key: tuple(meta.global_shape) for key, meta in dist_checkpointing.load_tensors_metadata(str(path)).items()
            if hasattr(meta, "global_shape")}


def check_saved_shapes(arch: ModelArch, saved: dict[str, tuple[int, ...]], described_by: str) -> None:
    """UserError naming the first tensor `arch` implies (`bridge.checkpoint_shapes`, norms under
    either spelling) that `saved` (key -> global shape, prefix removed) lacks or holds with another
    shape; `described_by` says where `arch` came from ("X: its args")."""
    for key, shape in checkpoint_shapes(arch).items():
        found = next((saved[k] for k in (key, *fused_norm_aliases(key)) if k in saved), None)
        if found != shape:
            held = f"holds {found}" if found is not None else "lacks it"
            raise UserError(f"{described_by} imply {key} of shape {shape}, but the checkpoint {held}")


def check_padded_vocab(rows: int, tokens: int, multiple: int, tokenizer: str, hint: str = "") -> None:
    """UserError unless a tokenizer of `tokens` tokens is one that Megatron-LM / NeMo pad (to a
    multiple of `multiple` = divisor x TP) to the checkpoint's `rows` embedding rows."""
    if not rows - multiple < tokens <= rows:
        raise UserError(f"tokenizer={tokenizer} has {tokens} tokens, but the checkpoint's {rows} embedding rows are a "
                        f"vocabulary of {max(rows - multiple + 1, 1)} to {rows} tokens padded to a multiple of "
                        f"{multiple}: pass the tokenizer the model was trained with{hint}")


def _as_saved(sharded: dict[str, Any], saved: set[str]) -> dict[str, Any]:
    """`sharded` with each tensor's checkpoint key replaced by the alias the save holds, where the
    save holds the other spelling of a norm's name."""
    renamed = {}
    for name, item in sharded.items():
        key = getattr(item, "key", None)
        if key is not None and key not in saved:
            alias = next((a for a in fused_norm_aliases(key) if a in saved), None)
            if alias is not None:
                item = dataclasses.replace(item, key=alias)
        renamed[name] = item
    return renamed


@torch.no_grad()
def load_model_weights(model, path: Path, prefix: str = "") -> None:
    """Fill `model` (this rank's shards; any layer spec) from the distributed checkpoint at `path`,
    whose model tensors are keyed `prefix` + our keys (collective); megatron reshards from the TP/PP
    it was saved at. Call inside `common_state_readable(path, ...)` when its common state needs it."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    model = unwrap_model(model)
    sharded = _as_saved(model.sharded_state_dict(prefix=prefix), set(saved_shapes(path)))
    # Requested keys the save lacks are dropped rather than fatal: a Transformer Engine model asks
    # for the `_extra_state` of its layers, which a model on the local spec never saved. Missing
    # weights are caught by load_state_dict below.
    loaded, _, _ = dist_checkpointing.load(sharded, str(path), strict=StrictHandling.RETURN_UNEXPECTED)
    state = {name.removeprefix(prefix): value for name, value in loaded.items()}
    missing = [key for key in model.load_state_dict(state, strict=False).missing_keys
               if not key.endswith("_extra_state")]
    if missing:
        raise UserError(f"{path} lacks the weights {missing[:3]} of the model its config describes")


# Megatron-LM and NeMo 2 build their layers on the Transformer Engine spec on GPUs. Its dense layers
# fuse the pre-MLP norm into linear_fc1 (the key our checkpoints use); its MoE layers keep that norm
# as a module of its own, saved under the local name. An MoE export writes that key so that a TE run
# loads it (`load_model_weights` reads either spelling).
_FUSED_PRE_MLP_NORM = "decoder.layers.mlp.linear_fc1.layer_norm_weight"
_MOE_PRE_MLP_NORM = "decoder.layers.pre_mlp_layernorm.weight"


def te_spec_sharded_state(model, prefix: str = "") -> dict[str, Any]:
    """`model`'s sharded state dict (keys `prefix` + ours) under the keys a TE-spec model saves."""
    unwrapped = unwrap_model(model)
    sharded = unwrapped.sharded_state_dict(prefix=prefix)
    if not unwrapped.config.num_moe_experts:
        return sharded
    fused = prefix + _FUSED_PRE_MLP_NORM
    return {name: dataclasses.replace(item, key=prefix + _MOE_PRE_MLP_NORM) if getattr(item, "key", None) == fused
            else item for name, item in sharded.items()}


@torch.no_grad()
def shift_norm_weights(model, offset: float) -> None:
    """Add `offset` to every per-layer and final norm weight of `model` (a zero-centred gamma, as
    Megatron-LM's --apply-layernorm-1p and NeMo's layernorm_zero_centered_gamma store it, is the
    applied gamma - 1; our norms apply their weight as it is)."""
    from nemo_minitron.models.bridge import local_parameters

    for name, _, param in local_parameters(model):
        if name.endswith("layernorm.weight"):
            param.copy_((param.float() + offset).to(param.dtype))
