"""The main job: every stage in order on one work directory, resumable (`run_pipeline`)."""

from nemo_minitron.pipeline.run import PipelineConfig, StageInterrupted, Stages, run_pipeline

__all__ = ["PipelineConfig", "StageInterrupted", "Stages", "run_pipeline"]
