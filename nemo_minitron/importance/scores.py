"""Importance scores of one model (higher = more important), and the weight-only ablations.

`ImportanceScores` is what every ranking method produces and what pruning consumes:
- `hidden` [h]: one shared score per hidden channel;
- `heads` [L, heads]: per attention head (global head index, group-major like megatron's QKV);
- `neurons` [L, ffn]: per MLP neuron;
- `layers` {name: [L]}: per-layer depth scores (e.g. "block_importance", "loss" = LM-loss increase
  when the layer is dropped, "magnitude", "random");
- `blocks` {k: [L - k + 1]}: the loss (lower = better) of the model without layers [i, i + k),
  from the contiguous-block search.
They are saved next to a pruned checkpoint (`importance.pt`) so that another target needs no
recomputation; `info` records how they were computed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nemo_minitron.atomic import atomic_file
from nemo_minitron.errors import UserError
from nemo_minitron.models.config import ModelArch

METHODS = ("activation", "magnitude", "random")
FILE_NAME = "importance.pt"


@dataclass
class ImportanceScores:
    arch: ModelArch
    method: str
    hidden: torch.Tensor
    heads: torch.Tensor
    neurons: torch.Tensor
    layers: dict[str, torch.Tensor] = field(default_factory=dict)
    blocks: dict[int, torch.Tensor] = field(default_factory=dict)
    hidden_per_layer: torch.Tensor | None = None  # [L, 2, h] activation scores per norm
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        a = self.arch
        expected = {
            "hidden": (a.hidden_size,),
            "heads": (a.num_layers, a.num_attention_heads),
            "neurons": (a.num_layers, a.ffn_hidden_size),
        }
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"importance scores: {name} has shape {got}, the model needs {shape}")
        for name, scores in self.layers.items():
            if tuple(scores.shape) != (a.num_layers,):
                raise ValueError(f"importance scores: layer scores {name!r} have shape {tuple(scores.shape)}")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir():
            path = path / FILE_NAME
        state = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        state["arch"] = dataclasses.asdict(self.arch)
        with atomic_file(path, "wb") as handle:
            torch.save(state, handle)
        return path

    @classmethod
    def load(cls, path: str | Path, arch: ModelArch | None = None) -> "ImportanceScores":
        """Load scores (a file or a directory holding importance.pt); with `arch`, check they
        belong to that model."""
        path = Path(path)
        if path.is_dir():
            path = path / FILE_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no importance scores at {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state["arch"] = ModelArch.from_dict(state["arch"])
        scores = cls(**state)
        if arch is not None and scores.arch != arch:
            raise UserError(
                f"the importance scores in {path} were computed for a different model "
                f"({scores.arch.num_layers} layers, hidden {scores.arch.hidden_size}) than this checkpoint"
            )
        return scores

    def with_updates(self, **changes: Any) -> "ImportanceScores":
        return dataclasses.replace(self, **changes)


def _layer_tensors(sd: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    prefix = f"decoder.layers.{i}."
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


@torch.no_grad()
def magnitude_scores(arch: ModelArch, global_sd: dict[str, torch.Tensor]) -> ImportanceScores:
    """Weight-norm importance (an ablation): every score is the L2 norm of the weights that read or
    write the unit. Norm weights are folded into the linears they feed, as the model computes; a
    head's q bias (Qwen2) counts with its q rows."""
    G, d = arch.num_query_groups, arch.kv_channels
    per_group = arch.num_attention_heads // G
    h = arch.hidden_size
    hidden_sq = global_sd["embedding.word_embeddings.weight"].float().square().sum(0)
    output = global_sd.get("output_layer.weight", global_sd["embedding.word_embeddings.weight"])
    hidden_sq += (output.float() * global_sd["decoder.final_layernorm.weight"].float()).square().sum(0)
    heads, neurons, layers = [], [], []
    for i in range(arch.num_layers):
        w = {k: v.float() for k, v in _layer_tensors(global_sd, i).items()}
        qkv = w["self_attention.linear_qkv.weight"] * w["input_layernorm.weight"]
        fc1 = w["mlp.linear_fc1.weight"] * w["pre_mlp_layernorm.weight"]
        proj, fc2 = w["self_attention.linear_proj.weight"], w["mlp.linear_fc2.weight"]
        hidden_sq += qkv.square().sum(0) + fc1.square().sum(0) + proj.square().sum(1) + fc2.square().sum(1)
        q = qkv.view(G, per_group + 2, d, h)[:, :per_group].reshape(arch.num_attention_heads, -1)
        if arch.qkv_bias:
            q_bias = w["self_attention.linear_qkv.bias"].view(G, per_group + 2, d)[:, :per_group]
            q = torch.cat([q, q_bias.reshape(arch.num_attention_heads, d)], dim=1)
        heads.append((q.square().sum(1) + proj.view(h, -1, d).square().sum((0, 2))).sqrt())
        # a SwiGLU neuron's gate and up rows, or a squared-ReLU neuron's one row, and its fc2 column
        fc1_rows = sum(part.square().sum(1) for part in fc1.chunk(2)) if arch.gated else fc1.square().sum(1)
        neurons.append((fc1_rows + fc2.square().sum(0)).sqrt())
        layers.append(sum(t.square().sum() for t in w.values()).sqrt())
    return ImportanceScores(
        arch=arch, method="magnitude", hidden=hidden_sq.sqrt(), heads=torch.stack(heads),
        neurons=torch.stack(neurons), layers={"magnitude": torch.stack(layers)},
    )


def random_scores(arch: ModelArch, seed: int = 0) -> ImportanceScores:
    """Uniformly random scores (an ablation), reproducible from `seed`."""
    g = torch.Generator().manual_seed(seed)
    L = arch.num_layers
    return ImportanceScores(
        arch=arch, method="random", hidden=torch.rand(arch.hidden_size, generator=g),
        heads=torch.rand(L, arch.num_attention_heads, generator=g),
        neurons=torch.rand(L, arch.ffn_hidden_size, generator=g),
        layers={"random": torch.rand(L, generator=g)}, info={"seed": seed},
    )
