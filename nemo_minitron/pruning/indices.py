"""From importance scores to the index sets a prune keeps.

Kept indices are returned in ascending (original) order, so the pruned model is a sub-network of
the teacher with its units in their original order. Ties are broken by index (stable sort).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nemo_minitron.importance.scores import EXPERT_METHODS, ImportanceScores
from nemo_minitron.errors import UserError
from nemo_minitron.models.config import ModelArch

DEPTH_METHODS = ("contiguous", "loss", "block_importance", "magnitude", "random")


@dataclass
class PruneIndices:
    """What survives: hidden channels, teacher layers, and per teacher layer its heads and neurons.

    `heads[layer]` is [kept groups, heads per kept group] of global head indices (group-major),
    so the GQA layout of the pruned QKV follows directly from it. In a mixture-of-experts model,
    `experts[layer]` are the kept routed experts, `neurons[layer]` is [kept experts, kept neurons]
    (each kept expert's own neurons, in the order of `experts[layer]`) and `shared_neurons[layer]`
    the shared expert's. A hybrid holds `heads` for its attention layers, `neurons` for its MLP
    layers and, for each Mamba layer, `mamba_heads[layer]` ([SSM groups, heads kept per group] of
    global head indices: every group keeps its own best heads) and `mamba_channels[layer]` (the
    channel indices every kept head keeps).
    """

    hidden: torch.Tensor
    layers: list[int]
    heads: dict[int, torch.Tensor]
    neurons: dict[int, torch.Tensor]
    experts: dict[int, torch.Tensor] = field(default_factory=dict)
    shared_neurons: dict[int, torch.Tensor] = field(default_factory=dict)
    mamba_heads: dict[int, torch.Tensor] = field(default_factory=dict)
    mamba_channels: dict[int, torch.Tensor] = field(default_factory=dict)

    def dropped_layers(self, teacher: ModelArch) -> list[int]:
        return [i for i in range(teacher.num_layers) if i not in set(self.layers)]


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, ascending."""
    return torch.sort(torch.argsort(scores, descending=True, stable=True)[:k]).values


def select_heads(head_scores: torch.Tensor, teacher: ModelArch, target: ModelArch) -> torch.Tensor:
    """[G', h'] kept heads of one layer: the best whole query groups (by the L2 norm of their
    heads' scores), then the best heads within each kept group."""
    G = teacher.num_query_groups
    per_group = teacher.num_attention_heads // G
    by_group = head_scores.view(G, per_group)
    groups = top_k(by_group.norm(dim=1), target.num_query_groups)
    keep = target.num_attention_heads // target.num_query_groups
    return torch.stack([g * per_group + top_k(by_group[g], keep) for g in groups.tolist()])


def select_mamba_heads(head_scores: torch.Tensor, teacher: ModelArch, target: ModelArch) -> torch.Tensor:
    """[G, h'] kept SSM heads of one Mamba layer: the best `target.mamba_num_heads / G` heads of
    every group (B and C are per group, so a group keeps its projections and loses heads only)."""
    G = teacher.mamba_num_groups
    by_group = head_scores.view(G, teacher.mamba_num_heads // G)
    keep = target.mamba_num_heads // G
    return torch.stack([g * by_group.shape[1] + top_k(by_group[g], keep) for g in range(G)])


def expert_scores(scores: ImportanceScores, method: str, seed: int = 0) -> torch.Tensor:
    """[L, experts] scores of the routed experts by `method` (one of `EXPERT_METHODS`); "random" is
    drawn from `seed` when the scores do not hold it."""
    if method not in EXPERT_METHODS:
        raise UserError(f"experts.method={method!r} is not one of {list(EXPERT_METHODS)}")
    if method in scores.experts:
        return scores.experts[method]
    if method == "random":
        arch = scores.arch
        return torch.rand(arch.num_layers, arch.num_moe_experts, generator=torch.Generator().manual_seed(seed))
    raise UserError(f"the {scores.method} scores hold no {method!r} expert scores (they have "
                    f"{sorted(scores.experts)}): compute activation scores or choose another experts.method")


def select_indices(
    scores: ImportanceScores, teacher: ModelArch, target: ModelArch, drop_layers: list[int],
    expert_method: str = "output",
) -> PruneIndices:
    """The kept units: the best hidden channels, heads within the best groups, neurons, and in an
    MoE model the best `target.num_moe_experts` experts of every layer (by `expert_method`), each
    keeping its own best `target.moe_ffn_hidden_size` neurons."""
    if len(drop_layers) != teacher.num_layers - target.num_layers:
        raise ValueError(f"dropping {len(drop_layers)} layers does not give target.num_layers={target.num_layers}")
    layers = [i for i in range(teacher.num_layers) if i not in set(drop_layers)]
    kept = set(layers)
    indices = PruneIndices(
        hidden=top_k(scores.hidden, target.hidden_size),
        layers=layers,
        heads={i: select_heads(scores.heads[i], teacher, target) for i in teacher.layers_with("attention") if i in kept},
        neurons={},
    )
    if teacher.is_hybrid:
        indices.neurons = {i: top_k(scores.neurons[i], target.ffn_hidden_size) for i in teacher.layers_with("mlp")
                           if i in kept}
        mamba = [i for i in teacher.layers_with("mamba") if i in kept]
        indices.mamba_heads = {i: select_mamba_heads(scores.mamba_heads[i], teacher, target) for i in mamba}
        indices.mamba_channels = {i: top_k(scores.mamba_channels[i], target.mamba_head_dim) for i in mamba}
        return indices
    if not teacher.is_moe:
        indices.neurons = {i: top_k(scores.neurons[i], target.ffn_hidden_size) for i in layers}
        return indices
    by_expert = expert_scores(scores, expert_method)
    for i in layers:
        kept = top_k(by_expert[i], target.num_moe_experts)
        indices.experts[i] = kept
        indices.neurons[i] = torch.stack([top_k(scores.neurons[i, e], target.moe_ffn_hidden_size) for e in kept.tolist()])
        if teacher.moe_shared_expert_intermediate_size:
            indices.shared_neurons[i] = top_k(scores.shared_neurons[i], target.moe_shared_expert_intermediate_size)
    return indices


def choose_dropped_layers(scores: ImportanceScores, teacher: ModelArch, num_drop: int, method: str,
                          per_kind: dict[str, int] | None = None) -> list[int]:
    """The `num_drop` layers a depth method drops, from the depth scores already in `scores`:
    the best contiguous block (`scores.blocks[num_drop]`) or the lowest per-layer scores
    (`scores.layers[method]`). With `per_kind` (a hybrid's layers to drop of each kind), each
    kind's lowest-scored layers, ranked among that kind alone."""
    if num_drop == 0:
        return []
    check_depth_method(method, per_kind)
    if method == "contiguous":
        if num_drop not in scores.blocks:
            raise UserError(f"the scores hold no contiguous-block losses for dropping {num_drop} layers: compute "
                            f"scores.blocks[{num_drop}] = contiguous_block_scores(model, {num_drop}, metric) first")
        return best_block(scores.blocks[num_drop], num_drop)
    if method not in scores.layers:
        raise UserError(f"the scores hold no {method!r} layer scores (they have {sorted(scores.layers)}): "
                        f"compute them or choose another depth method")
    if per_kind is None:
        return lowest_layers(scores.layers[method], num_drop)
    dropped = []
    for kind, n in per_kind.items():
        of_kind = torch.tensor(teacher.layers_with(kind))
        dropped += of_kind[lowest_layers(scores.layers[method][of_kind], n)].tolist()
    return sorted(dropped)


def check_depth_method(method: str, per_kind: dict[str, int] | None = None) -> None:
    """A known depth method, and one that ranks single layers when the drops go per layer kind."""
    if method not in DEPTH_METHODS:
        raise UserError(f"depth method {method!r} is not one of {list(DEPTH_METHODS)}")
    if per_kind and method == "contiguous":
        raise UserError(f"depth.method=contiguous drops one block of consecutive layers whatever their kinds; the "
                        f"layers to drop per kind (target.num_<kind>_layers) need a per-layer ranking: one of "
                        f"{[m for m in DEPTH_METHODS if m != 'contiguous']}")


def lowest_layers(layer_scores: torch.Tensor, num_drop: int) -> list[int]:
    """The `num_drop` least important layers (ascending)."""
    return torch.sort(torch.argsort(layer_scores, stable=True)[:num_drop]).values.tolist()


def best_block(block_losses: torch.Tensor, num_drop: int) -> list[int]:
    """Layers of the contiguous block whose removal gives the lowest loss."""
    start = int(torch.argmin(block_losses))
    return list(range(start, start + num_drop))
