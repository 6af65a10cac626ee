"""minitron generate: greedy generation, optionally conditioned on SteerLM attribute values."""

from nemo_minitron.align.stage import GenerateConfig, generate_text
from nemo_minitron.cli.compose import typed


def run(cfg) -> dict:
    return generate_text(typed(GenerateConfig, cfg))
