"""From importance scores to the index sets a prune keeps.

Kept indices are returned in ascending (original) order, so the pruned model is a sub-network of
the teacher with its units in their original order. Ties are broken by index (stable sort).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nemo_minitron.importance.scores import ImportanceScores
from nemo_minitron.errors import UserError
from nemo_minitron.models.config import ModelArch

DEPTH_METHODS = ("contiguous", "loss", "block_importance", "magnitude", "random")


@dataclass
class PruneIndices:
    """What survives: hidden channels, teacher layers, and per teacher layer its heads and neurons.

    `heads[layer]` is [kept groups, heads per kept group] of global head indices (group-major),
    so the GQA layout of the pruned QKV follows directly from it.
    """

    hidden: torch.Tensor
    layers: list[int]
    heads: dict[int, torch.Tensor]
    neurons: dict[int, torch.Tensor]

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


def select_indices(
    scores: ImportanceScores, teacher: ModelArch, target: ModelArch, drop_layers: list[int]
) -> PruneIndices:
    if len(drop_layers) != teacher.num_layers - target.num_layers:
        raise ValueError(f"dropping {len(drop_layers)} layers does not give target.num_layers={target.num_layers}")
    layers = [i for i in range(teacher.num_layers) if i not in set(drop_layers)]
    return PruneIndices(
        hidden=top_k(scores.hidden, target.hidden_size),
        layers=layers,
        heads={i: select_heads(scores.heads[i], teacher, target) for i in layers},
        neurons={i: top_k(scores.neurons[i], target.ffn_hidden_size) for i in layers},
    )


def choose_dropped_layers(scores: ImportanceScores, teacher: ModelArch, num_drop: int, method: str) -> list[int]:
    """The `num_drop` layers a depth method drops, from the depth scores already in `scores`:
    the best contiguous block (`scores.blocks[num_drop]`) or the lowest per-layer scores
    (`scores.layers[method]`)."""
    if num_drop == 0:
        return []
    if method not in DEPTH_METHODS:
        raise UserError(f"depth method {method!r} is not one of {list(DEPTH_METHODS)}")
    if method == "contiguous":
        if num_drop not in scores.blocks:
            raise UserError(f"the scores hold no contiguous-block losses for dropping {num_drop} layers: compute "
                            f"scores.blocks[{num_drop}] = contiguous_block_scores(model, {num_drop}, metric) first")
        return best_block(scores.blocks[num_drop], num_drop)
    if method not in scores.layers:
        raise UserError(f"the scores hold no {method!r} layer scores (they have {sorted(scores.layers)}): "
                        f"compute them or choose another depth method")
    return lowest_layers(scores.layers[method], num_drop)


def lowest_layers(layer_scores: torch.Tensor, num_drop: int) -> list[int]:
    """The `num_drop` least important layers (ascending)."""
    return torch.sort(torch.argsort(layer_scores, stable=True)[:num_drop]).values.tolist()


def best_block(block_losses: torch.Tensor, num_drop: int) -> list[int]:
    """Layers of the contiguous block whose removal gives the lowest loss."""
    start = int(torch.argmin(block_losses))
    return list(range(start, start + num_drop))
