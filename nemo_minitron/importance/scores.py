"""Importance scores of one model (higher = more important), and the weight-only ablations.

`ImportanceScores` is what every ranking method produces and what pruning consumes:
- `hidden` [h]: one shared score per hidden channel;
- `heads` [L, heads]: per attention head (global head index, group-major like megatron's QKV);
- `neurons` [L, ffn]: per MLP neuron; in a mixture-of-experts model [L, experts, moe_ffn], per
  neuron of every routed expert;
- `experts` {name: [L, experts]}: per routed expert (MoE only), by each expert signal ("output" =
  the router-weighted output norm it adds, "frequency" = tokens routed to it, "router_mass" = the
  router probability it receives, "magnitude", "random"), see `EXPERT_METHODS`;
- `shared_neurons` [L, shared ffn]: per neuron of Qwen2-MoE's shared expert;
- `mamba_heads` [L, Mamba heads] and `mamba_channels` [L, head channels]: per SSM head and per
  channel index within the heads of a hybrid's Mamba layers (zeros in its other layers, as
  `heads` and `neurons` are in the layers without attention or MLP);
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
from nemo_minitron.models.bridge import final_norm
from nemo_minitron.models.config import LAYER_PARTS, ModelArch

METHODS = ("activation", "taylor", "magnitude", "random")
EXPERT_METHODS = ("output", "frequency", "router_mass", "magnitude", "random")
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
    experts: dict[str, torch.Tensor] = field(default_factory=dict)
    shared_neurons: torch.Tensor | None = None
    mamba_heads: torch.Tensor | None = None
    mamba_channels: torch.Tensor | None = None

    def __post_init__(self):
        a = self.arch
        L = a.num_layers
        neurons = (L, a.num_moe_experts, a.moe_ffn_hidden_size) if a.is_moe else (L, a.ffn_hidden_size)
        expected = {"hidden": (a.hidden_size,), "heads": (L, a.num_attention_heads), "neurons": neurons}
        if a.is_hybrid:
            expected |= {"mamba_heads": (L, a.mamba_num_heads), "mamba_channels": (L, a.mamba_head_dim)}
        elif self.mamba_heads is not None or self.mamba_channels is not None:
            raise ValueError("importance scores: Mamba scores given for a model without Mamba layers")
        if a.moe_shared_expert_intermediate_size:
            expected["shared_neurons"] = (L, a.moe_shared_expert_intermediate_size)
        elif self.shared_neurons is not None:
            raise ValueError("importance scores: shared_neurons given for a model without a shared expert")
        for name, shape in expected.items():
            got = None if getattr(self, name) is None else tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"importance scores: {name} has shape {got}, the model needs {shape}")
        for name, scores in self.layers.items():
            if tuple(scores.shape) != (L,):
                raise ValueError(f"importance scores: layer scores {name!r} have shape {tuple(scores.shape)}")
        if self.experts and not a.is_moe:
            raise ValueError("importance scores: expert scores given for a dense model")
        for name, scores in self.experts.items():
            if tuple(scores.shape) != (L, a.num_moe_experts):
                raise ValueError(f"importance scores: expert scores {name!r} have shape {tuple(scores.shape)}")

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


def mamba_unit_sums(arch: ModelArch, values: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden [h], heads [Mamba heads], channels [head channels]): per unit of one Mamba layer, the
    sum of a per-weight value (`values`, the layer's tensors by name) over the weights W_u that
    read or write it. Head j's channel c (index j * P + c of the inner width) owns its rows of
    in_proj's z and x blocks, its conv1d row and bias, its gated-norm weight and its out_proj
    column; head j also owns its dt row of in_proj, dt_bias, A_log and D. A channel index sums its
    channel's weights over the heads. B and C belong to the SSM groups, which stay whole, so only
    the hidden channels count them: hidden channel c owns column c of in_proj and row c of out_proj
    (the layer's norm is the caller's)."""
    heads, P = arch.mamba_num_heads, arch.mamba_head_dim
    in_proj, out_proj = values["mixer.in_proj.weight"], values["mixer.out_proj.weight"]
    z, x, _, _, dt = in_proj.split(list(arch.mamba_in_proj_blocks.values()))
    conv = values["mixer.conv1d.weight"].flatten(1).sum(1) + values["mixer.conv1d.bias"]  # [x; B; C] channels
    per_channel = z.sum(1) + x.sum(1) + conv[:arch.mamba_inner] + values["mixer.norm.weight"] + out_proj.sum(0)
    per_channel = per_channel.view(heads, P)
    per_head = (per_channel.sum(1) + dt.sum(1) + values["mixer.dt_bias"] + values["mixer.A_log"]
                + values["mixer.D"])
    return in_proj.sum(0) + out_proj.sum(1), per_head, per_channel.sum(0)


def _mlp_magnitudes(fc1: torch.Tensor, fc2: torch.Tensor, gated: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-neuron weight norms, per-hidden-channel squared weights) of one MLP: a SwiGLU neuron's
    gate and up rows, or a squared-ReLU neuron's one row, and its fc2 column."""
    fc1_rows = sum(part.square().sum(1) for part in fc1.chunk(2)) if gated else fc1.square().sum(1)
    return (fc1_rows + fc2.square().sum(0)).sqrt(), fc1.square().sum(0) + fc2.square().sum(1)


@torch.no_grad()
def magnitude_scores(arch: ModelArch, global_sd: dict[str, torch.Tensor]) -> ImportanceScores:
    """Weight-norm importance (an ablation): every score is the L2 norm of the weights that read or
    write the unit. Norm weights are folded into the linears they feed, as the model computes; a
    head's q bias (Qwen2) counts with its q rows; a routed expert scores the norm of all its
    weights, and the router's columns count towards the hidden channels; a Mamba head or channel
    the norm of the weights `mamba_unit_sums` gives it (its gated-norm weights folded into
    out_proj, the layer's norm into in_proj)."""
    G, d = arch.num_query_groups, arch.kv_channels
    per_group = arch.num_attention_heads // G
    h, L = arch.hidden_size, arch.num_layers
    hidden_sq = global_sd["embedding.word_embeddings.weight"].float().square().sum(0)
    output = global_sd.get("output_layer.weight", global_sd["embedding.word_embeddings.weight"])
    hidden_sq += (output.float() * global_sd[f"{final_norm(arch)}weight"].float()).square().sum(0)
    neurons = torch.zeros(L, arch.num_moe_experts, arch.moe_ffn_hidden_size) if arch.is_moe else torch.zeros(
        L, arch.ffn_hidden_size)
    heads, layers = torch.zeros(L, arch.num_attention_heads), torch.zeros(L)
    experts = torch.zeros(L, arch.num_moe_experts) if arch.is_moe else None
    shared = torch.zeros(L, arch.moe_shared_expert_intermediate_size) if arch.moe_shared_expert_intermediate_size else None
    mamba = {"mamba_heads": torch.zeros(L, arch.mamba_num_heads),
             "mamba_channels": torch.zeros(L, arch.mamba_head_dim)} if arch.is_hybrid else {}
    for i, kind in enumerate(arch.layer_types):
        w = {k: v.float() for k, v in _layer_tensors(global_sd, i).items()}
        if "attention" in LAYER_PARTS[kind]:
            qkv = w["self_attention.linear_qkv.weight"] * w["input_layernorm.weight"]
            proj = w["self_attention.linear_proj.weight"]
            hidden_sq += qkv.square().sum(0) + proj.square().sum(1)
            q = qkv.view(G, per_group + 2, d, h)[:, :per_group].reshape(arch.num_attention_heads, -1)
            if arch.qkv_bias:
                q_bias = w["self_attention.linear_qkv.bias"].view(G, per_group + 2, d)[:, :per_group]
                q = torch.cat([q, q_bias.reshape(arch.num_attention_heads, d)], dim=1)
            heads[i] = (q.square().sum(1) + proj.view(h, -1, d).square().sum((0, 2))).sqrt()
        if "mlp" in LAYER_PARTS[kind] and arch.is_moe:
            norm = w["pre_mlp_layernorm.weight"]
            hidden_sq += (w["mlp.router.weight"] * norm).square().sum(0)
            per_expert = [_mlp_magnitudes(w[f"mlp.experts.local_experts.{e}.linear_fc1.weight"] * norm,
                                          w[f"mlp.experts.local_experts.{e}.linear_fc2.weight"], arch.gated)
                          for e in range(arch.num_moe_experts)]
            hidden_sq += sum(hidden for _, hidden in per_expert)
            neurons[i] = torch.stack([n for n, _ in per_expert])
            experts[i] = torch.stack([n.square().sum().sqrt() for n, _ in per_expert])
            if shared is not None:
                shared[i], shared_hidden = _mlp_magnitudes(
                    w["mlp.shared_experts.linear_fc1.weight"] * norm, w["mlp.shared_experts.linear_fc2.weight"],
                    arch.gated)
                hidden_sq += shared_hidden + (w["mlp.shared_experts.gate_weight"] * norm).square().sum(0)
        elif "mlp" in LAYER_PARTS[kind]:
            neurons[i], mlp_hidden = _mlp_magnitudes(w["mlp.linear_fc1.weight"] * w["pre_mlp_layernorm.weight"],
                                                     w["mlp.linear_fc2.weight"], arch.gated)
            hidden_sq += mlp_hidden
        if "mamba" in LAYER_PARTS[kind]:
            squares = {name: t.square() for name, t in w.items()}
            squares["mixer.in_proj.weight"] = (w["mixer.in_proj.weight"] * w["norm.weight"]).square()
            squares["mixer.out_proj.weight"] = (w["mixer.out_proj.weight"] * w["mixer.norm.weight"]).square()
            squares["mixer.norm.weight"] = torch.zeros_like(w["mixer.norm.weight"])  # folded into out_proj
            mamba_hidden, mamba_heads, mamba_channels = mamba_unit_sums(arch, squares)
            hidden_sq += mamba_hidden
            mamba["mamba_heads"][i], mamba["mamba_channels"][i] = mamba_heads.sqrt(), mamba_channels.sqrt()
        layers[i] = sum(t.square().sum() for t in w.values()).sqrt()
    return ImportanceScores(
        arch=arch, method="magnitude", hidden=hidden_sq.sqrt(), heads=heads, neurons=neurons,
        layers={"magnitude": layers}, experts={"magnitude": experts} if experts is not None else {},
        shared_neurons=shared, **mamba,
    )


def random_scores(arch: ModelArch, seed: int = 0) -> ImportanceScores:
    """Uniformly random scores (an ablation), reproducible from `seed`."""
    g = torch.Generator().manual_seed(seed)
    L = arch.num_layers
    neurons = (L, arch.num_moe_experts, arch.moe_ffn_hidden_size) if arch.is_moe else (L, arch.ffn_hidden_size)
    shared = arch.moe_shared_expert_intermediate_size
    mamba = {}
    if arch.is_hybrid:
        mamba = {"mamba_heads": torch.rand(L, arch.mamba_num_heads, generator=g),
                 "mamba_channels": torch.rand(L, arch.mamba_head_dim, generator=g)}
    return ImportanceScores(
        arch=arch, method="random", hidden=torch.rand(arch.hidden_size, generator=g), **mamba,
        heads=torch.rand(L, arch.num_attention_heads, generator=g),
        neurons=torch.rand(*neurons, generator=g),
        layers={"random": torch.rand(L, generator=g)}, info={"seed": seed},
        experts={"random": torch.rand(L, arch.num_moe_experts, generator=g)} if arch.is_moe else {},
        shared_neurons=torch.rand(L, shared, generator=g) if shared else None,
    )
