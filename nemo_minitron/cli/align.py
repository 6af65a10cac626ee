"""minitron align: SFT, DPO, RPO or SteerLM alignment of a checkpoint (resumable)."""

from nemo_minitron.align.stage import AlignConfig, align_checkpoint
from nemo_minitron.cli.compose import typed


def run(cfg) -> dict:
    return align_checkpoint(typed(AlignConfig, cfg))
