"""Pruning: the target spec and its validation, parameter counting, index selection, surgery, report."""

from nemo_minitron.pruning.indices import PruneIndices, best_block, lowest_layers, select_indices
from nemo_minitron.pruning.planner import PUBLISHED_RECIPES, PUBLISHED_TEACHERS, count_from_shapes, count_on_meta, plan
from nemo_minitron.pruning.spec import PruneSpec
from nemo_minitron.pruning.surgery import prune_global, prune_model

__all__ = [
    "PUBLISHED_RECIPES", "PUBLISHED_TEACHERS", "PruneIndices", "PruneSpec", "best_block", "count_from_shapes",
    "count_on_meta", "lowest_layers", "plan", "prune_global", "prune_model", "select_indices",
]
