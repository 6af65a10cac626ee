"""minitron prune: importance on calibration data, then width/depth pruning of a checkpoint."""

from nemo_minitron.cli.compose import typed
from nemo_minitron.pruning.stage import PruneConfig, prune_checkpoint


def run(cfg) -> dict:
    return prune_checkpoint(typed(PruneConfig, cfg))
