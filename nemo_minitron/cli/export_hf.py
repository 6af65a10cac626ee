"""minitron export-hf: a nemo-minitron checkpoint -> a Hugging Face model directory."""

from nemo_minitron.cli.compose import typed
from nemo_minitron.convert import ExportHFConfig, export_hf


def run(cfg) -> dict:
    return export_hf(typed(ExportHFConfig, cfg))
