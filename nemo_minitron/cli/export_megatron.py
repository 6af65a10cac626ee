"""minitron export-megatron: a nemo-minitron checkpoint -> a Megatron-LM checkpoint and its flags."""

from nemo_minitron.cli.compose import typed
from nemo_minitron.convert import ExportMegatronConfig, export_megatron


def run(cfg) -> dict:
    return export_megatron(typed(ExportMegatronConfig, cfg))
