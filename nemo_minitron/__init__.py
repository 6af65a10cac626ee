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

Names are imported on first use (`mt.prune` loads pruning and megatron-core, `mt.ModelArch` neither),
so `import nemo_minitron` and the `minitron` command start without loading every stage.
"""

import importlib as _importlib
import warnings as _warnings

# name -> the module that defines it (a module itself where the name is the module's last part)
_EXPORTS: dict[str, str] = {
    "parallel": "nemo_minitron.parallel",
    **dict.fromkeys(["AlignConfig", "GenerateConfig", "align_checkpoint", "generate_text"], "nemo_minitron.align.stage"),
    **dict.fromkeys(["load_checkpoint", "load_weights", "save_checkpoint", "verify_checkpoint"], "nemo_minitron.checkpoint"),
    **dict.fromkeys(["CheckConfig", "ExportHFConfig", "ExportMegatronConfig", "ExportNeMoConfig", "ImportConfig",
                     "check_checkpoint", "export_hf", "export_megatron", "export_nemo", "import_checkpoint"],
                    "nemo_minitron.convert"),
    **dict.fromkeys(["DistillationLoss", "DistillationModel", "LayerPair", "LogitLoss", "TeacherCache", "TopKTeacher",
                     "write_teacher_cache"], "nemo_minitron.distill"),
    **dict.fromkeys(["DistillConfig", "TeacherCorrectConfig", "TeacherLogitsConfig", "cache_teacher_logits",
                     "correct_teacher", "distill_checkpoint"], "nemo_minitron.distill.stage"),
    "UserError": "nemo_minitron.errors",
    "evaluate_perplexity": "nemo_minitron.eval.perplexity",
    **dict.fromkeys(["EvalConfig", "evaluate_checkpoint"], "nemo_minitron.eval.stage"),
    **dict.fromkeys(["Aggregation", "ImportanceScores", "activation_loop", "contiguous_block_scores", "estimate_importance",
                     "layer_loss_scores", "loss_metric", "perplexity_loop"], "nemo_minitron.importance"),
    "ModelArch": "nemo_minitron.models.config",
    **dict.fromkeys(["arch_of", "build_gpt_model"], "nemo_minitron.models.gpt"),
    **dict.fromkeys(["PipelineConfig", "run_pipeline"], "nemo_minitron.pipeline"),
    "prune": "nemo_minitron.pruning.inplace",
    **dict.fromkeys(["PruneConfig", "prune_checkpoint"], "nemo_minitron.pruning.stage"),
    **dict.fromkeys(["SearchConfig", "search_architecture"], "nemo_minitron.search.stage"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nemo_minitron' has no attribute {name!r}")
    with _warnings.catch_warnings():
        # megatron-core warns at import, module by module, that Transformer Engine and Apex are absent
        # (always so on CPU): eight lines of noise; `minitron` says it in one line.
        _warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
        module = _importlib.import_module(_EXPORTS[name])
    value = module if module.__name__.rpartition(".")[2] == name else getattr(module, name)
    globals()[name] = value  # found once; later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
