"""The commands of `minitron`, one table: stage name -> the library module that holds the stage, its
typed config class, its stage function, and a one-line help. `minitron NAME` composes the config
from conf/NAME.yaml and overrides (`compose.typed`), then calls the function with it. A leaf: it
imports nothing, so every other CLI module (and scripts/config_reference.py) may read it.
"""

from typing import NamedTuple


class Stage(NamedTuple):
    module: str     # where `config` and `function` live
    config: str     # the typed config class the function takes
    function: str   # the stage function: config -> JSON-able result
    help: str


STAGES: dict[str, Stage] = {
    "import": Stage("nemo_minitron.convert", "ImportConfig", "import_checkpoint",
                    "import a HF directory, Megatron-LM run, NeMo 2 checkpoint or built-in model"),
    "export-hf": Stage("nemo_minitron.convert", "ExportHFConfig", "export_hf",
                       "write a checkpoint as a Hugging Face model directory"),
    "export-megatron": Stage("nemo_minitron.convert", "ExportMegatronConfig", "export_megatron",
                             "write a checkpoint for Megatron-LM (--load + flags)"),
    "export-nemo": Stage("nemo_minitron.convert", "ExportNeMoConfig", "export_nemo",
                         "write a checkpoint as a NeMo 2 checkpoint (context/ + weights/)"),
    "check": Stage("nemo_minitron.convert", "CheckConfig", "check_checkpoint",
                   "verify a checkpoint's files (checksums) and tensor shapes"),
    "eval": Stage("nemo_minitron.eval.stage", "EvalConfig", "evaluate_checkpoint",
                  "held-out perplexity and lm-evaluation-harness tasks of a checkpoint"),
    "prune": Stage("nemo_minitron.pruning.stage", "PruneConfig", "prune_checkpoint",
                   "importance estimation and width/depth pruning of a checkpoint"),
    "teacher-correct": Stage("nemo_minitron.distill.stage", "TeacherCorrectConfig", "correct_teacher",
                             "fine-tune the teacher on the distillation data (LM loss)"),
    "teacher-logits": Stage("nemo_minitron.distill.stage", "TeacherLogitsConfig", "cache_teacher_logits",
                            "write a teacher's top-k logits over a distillation run's samples"),
    "distill": Stage("nemo_minitron.distill.stage", "DistillConfig", "distill_checkpoint",
                     "train a student on a frozen teacher's logits (resumable)"),
    "align": Stage("nemo_minitron.align.stage", "AlignConfig", "align_checkpoint",
                   "SFT, DPO, RPO or SteerLM alignment of a checkpoint (resumable)"),
    "generate": Stage("nemo_minitron.align.stage", "GenerateConfig", "generate_text",
                      "greedy generation, optionally with SteerLM attribute values"),
    "search": Stage("nemo_minitron.search.stage", "SearchConfig", "search_architecture",
                    "architecture search under a parameter or memory budget (resumable)"),
    "pipeline": Stage("nemo_minitron.pipeline.run", "PipelineConfig", "run_pipeline",
                      "the main job on the embedded default, end to end"),
}


def block_name(stage: str) -> str:
    """The key of a stage's block in a pipeline config (teacher-correct -> teacher_correct)."""
    return stage.replace("-", "_")
