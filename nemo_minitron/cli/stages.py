"""The commands of `minitron`: stage name -> (module holding `run(cfg)`, one-line help). A leaf:
it imports nothing, so every other CLI module may read it."""

STAGES: dict[str, tuple[str, str]] = {
    "import": ("nemo_minitron.cli.import_model", "import a HF directory, Megatron-LM run, NeMo 2 checkpoint or built-in model"),
    "export-hf": ("nemo_minitron.cli.export_hf", "write a checkpoint as a Hugging Face model directory"),
    "export-megatron": ("nemo_minitron.cli.export_megatron", "write a checkpoint for Megatron-LM (--load + flags)"),
    "export-nemo": ("nemo_minitron.cli.export_nemo", "write a checkpoint as a NeMo 2 checkpoint (context/ + weights/)"),
    "check": ("nemo_minitron.cli.check", "verify a checkpoint's files (checksums) and tensor shapes"),
    "eval": ("nemo_minitron.cli.evaluate", "held-out perplexity and lm-evaluation-harness tasks of a checkpoint"),
    "prune": ("nemo_minitron.cli.prune", "importance estimation and width/depth pruning of a checkpoint"),
    "teacher-correct": ("nemo_minitron.cli.teacher_correct", "fine-tune the teacher on the distillation data (LM loss)"),
    "teacher-logits": ("nemo_minitron.cli.teacher_logits", "write a teacher's top-k logits over a distillation run's samples"),
    "distill": ("nemo_minitron.cli.distill", "train a student on a frozen teacher's logits (resumable)"),
    "align": ("nemo_minitron.cli.align", "SFT, DPO, RPO or SteerLM alignment of a checkpoint (resumable)"),
    "generate": ("nemo_minitron.cli.generate", "greedy generation, optionally with SteerLM attribute values"),
    "search": ("nemo_minitron.cli.search", "architecture search under a parameter or memory budget (resumable)"),
    "pipeline": ("nemo_minitron.cli.pipeline", "the main job on the embedded default, end to end"),
}


def block_name(stage: str) -> str:
    """The key of a stage's block in a pipeline config (teacher-correct -> teacher_correct)."""
    return stage.replace("-", "_")
