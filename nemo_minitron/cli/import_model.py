"""minitron import: a local HF directory or a built-in model -> a nemo-minitron checkpoint."""

from nemo_minitron.cli.compose import typed
from nemo_minitron.convert import ImportConfig, import_checkpoint


def run(cfg) -> dict:
    return import_checkpoint(typed(ImportConfig, cfg))
