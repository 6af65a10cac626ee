"""minitron check: verify a checkpoint's files and tensor shapes without loading the model."""

from nemo_minitron.cli.compose import typed
from nemo_minitron.convert import CheckConfig, check_checkpoint


def run(cfg) -> dict:
    return check_checkpoint(typed(CheckConfig, cfg))
