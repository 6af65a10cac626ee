"""minitron distill: train a student on a frozen teacher's logits (resumable)."""

from nemo_minitron.cli.compose import typed
from nemo_minitron.distill.stage import DistillConfig, distill_checkpoint


def run(cfg) -> dict:
    return distill_checkpoint(typed(DistillConfig, cfg))
