"""nemo-minitron: Minitron-style pruning and distillation on megatron-core.

The plugin API works on any megatron-core GPTModel the caller built (docs/api.md):

    import nemo_minitron as mt
    mt.parallel.initialize(tp=2, pp=1)
    mt.load_weights(model, "runs/teacher")                      # or a Hugging Face directory
    scores = mt.estimate_importance(model, forward_loop)        # forward_loop(model) runs your data
    config = mt.prune(model, scores, ffn_hidden_size=768)       # in place; returns the new config
    mt.save_checkpoint(model, "runs/pruned", tokenizer)
    kd = mt.DistillationModel(student, teacher)                 # + mt.DistillationLoss in your step
    mt.write_teacher_cache(teacher, data, "runs/cache", k=64, ...)  # or an offline teacher: top-k logits

Each stage of the Minitron job is also one library function over a typed config
(`prune_checkpoint(PruneConfig(...))`, `distill_checkpoint`, `search_architecture`, `run_pipeline`,
...), which the `minitron` command line composes from YAML and calls.
"""

import warnings as _warnings

with _warnings.catch_warnings():
    # megatron-core warns at import, module by module, that Transformer Engine and Apex are absent
    # (always so on CPU): eight lines of noise before anything else; `minitron` says it in one line.
    _warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    from nemo_minitron import parallel
    from nemo_minitron.align.stage import AlignConfig, GenerateConfig, align_checkpoint, generate_text
    from nemo_minitron.checkpoint import load_checkpoint, load_weights, save_checkpoint, verify_checkpoint
    from nemo_minitron.convert import (
        CheckConfig,
        ExportHFConfig,
        ExportMegatronConfig,
        ExportNeMoConfig,
        ImportConfig,
        check_checkpoint,
        export_hf,
        export_megatron,
        export_nemo,
        import_checkpoint,
    )
    from nemo_minitron.distill import (
        DistillationLoss,
        DistillationModel,
        LayerPair,
        LogitLoss,
        TeacherCache,
        TopKTeacher,
        write_teacher_cache,
    )
    from nemo_minitron.distill.stage import (
        DistillConfig,
        TeacherCorrectConfig,
        TeacherLogitsConfig,
        cache_teacher_logits,
        correct_teacher,
        distill_checkpoint,
    )
    from nemo_minitron.errors import UserError
    from nemo_minitron.eval.perplexity import evaluate_perplexity
    from nemo_minitron.eval.stage import EvalConfig, evaluate_checkpoint
    from nemo_minitron.importance import (
        Aggregation,
        ImportanceScores,
        contiguous_block_scores,
        estimate_importance,
        layer_loss_scores,
        loss_metric,
        perplexity_loop,
    )
    from nemo_minitron.models.config import ModelArch
    from nemo_minitron.models.gpt import arch_of, build_gpt_model
    from nemo_minitron.pipeline import PipelineConfig, run_pipeline
    from nemo_minitron.prune.stage import PruneConfig, prune_checkpoint
    from nemo_minitron.search.stage import SearchConfig, search_architecture

# Bound last: `nemo_minitron.prune` is the one-call pruning function (the subpackage of the same
# name stays importable as `nemo_minitron.prune.<module>` through `from ... import`).
from nemo_minitron.prune.inplace import prune  # noqa: E402  isort: skip

__all__ = [
    "Aggregation", "AlignConfig", "CheckConfig", "DistillConfig", "DistillationLoss", "DistillationModel",
    "EvalConfig", "ExportHFConfig", "ExportMegatronConfig", "ExportNeMoConfig", "GenerateConfig", "ImportConfig", "ImportanceScores",
    "LayerPair", "LogitLoss", "ModelArch", "PipelineConfig", "PruneConfig", "SearchConfig", "TeacherCache",
    "TeacherCorrectConfig", "TeacherLogitsConfig", "TopKTeacher", "UserError", "align_checkpoint", "arch_of",
    "build_gpt_model", "cache_teacher_logits", "check_checkpoint", "contiguous_block_scores", "correct_teacher", "distill_checkpoint", "estimate_importance", "evaluate_checkpoint", "evaluate_perplexity",
    "export_hf", "export_megatron", "export_nemo", "generate_text", "import_checkpoint", "layer_loss_scores", "load_checkpoint",
    "load_weights", "loss_metric", "parallel", "perplexity_loop", "prune", "prune_checkpoint", "run_pipeline",
    "save_checkpoint", "search_architecture", "verify_checkpoint", "write_teacher_cache",
]
