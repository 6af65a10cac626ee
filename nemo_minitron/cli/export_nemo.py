"""minitron export-nemo: a nemo-minitron checkpoint -> a NeMo 2 checkpoint (context/ + weights/)."""

from nemo_minitron.cli.compose import typed
from nemo_minitron.convert import ExportNeMoConfig, export_nemo


def run(cfg) -> dict:
    return export_nemo(typed(ExportNeMoConfig, cfg))
