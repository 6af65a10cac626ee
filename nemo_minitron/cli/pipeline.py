"""minitron pipeline: the main job, stage by stage, resumable (`--config-name recipes/NAME` for a
published recipe)."""

from nemo_minitron.cli.compose import typed
from nemo_minitron.pipeline import PipelineConfig, run_pipeline


def run(cfg) -> dict:
    return run_pipeline(typed(PipelineConfig, cfg, "pipeline"))
