"""Importance estimation: activation hooks per axis, aggregation, first-order (Taylor) scores, depth scores,
weight ablations."""

from nemo_minitron.importance.aggregation import Aggregation
from nemo_minitron.importance.calibration import (ForwardLoop, activation_loop, estimate_importance, perplexity_loop,
                                                  sample_windows)
from nemo_minitron.importance.depth import contiguous_block_scores, layer_loss_scores, loss_metric, skip_layers
from nemo_minitron.importance.hooks import ImportanceRecorder
from nemo_minitron.importance.scores import ImportanceScores, magnitude_scores, random_scores
from nemo_minitron.importance.taylor import estimate_taylor_importance, taylor_scores

__all__ = [
    "Aggregation", "ForwardLoop", "ImportanceRecorder", "ImportanceScores", "activation_loop", "contiguous_block_scores",
    "estimate_importance", "estimate_taylor_importance", "layer_loss_scores", "loss_metric", "magnitude_scores", "perplexity_loop", "random_scores",
    "sample_windows", "skip_layers", "taylor_scores",
]
