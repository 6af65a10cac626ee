"""minitron eval: held-out perplexity and/or lm-evaluation-harness tasks of a checkpoint, any TP/PP."""

from nemo_minitron.cli.compose import typed
from nemo_minitron.eval.stage import EvalConfig, evaluate_checkpoint


def run(cfg) -> dict:
    return evaluate_checkpoint(typed(EvalConfig, cfg))
