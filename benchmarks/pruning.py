"""Pruning benchmarks on the embedded teacher (SmolLM2-135M), one CPU process:

1. importance-estimation overhead: tokens/s of the calibration forward with the hooks vs a plain
   forward over the same windows (alternating runs; the best of each is reported);
2. held-out perplexity right after pruning (no retraining) to ~50% of the non-embedding
   parameters by width only, by depth only and by both, for every ranking method.

    .venv/bin/python benchmarks/pruning.py [--work runs/bench] [--calib-samples 256] [--out FILE]

Needs WORK/teacher and WORK/corpus (made with `minitron pipeline work_dir=WORK` if missing).
Prints a Markdown section for docs/pruning.md and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from nemo_minitron import checkpoint, parallel
from nemo_minitron.data.indexed import load_token_stream
from nemo_minitron.eval.perplexity import evaluate_perplexity
from nemo_minitron.importance import (
    Aggregation, contiguous_block_scores, estimate_importance, layer_loss_scores, loss_metric, magnitude_scores, perplexity_loop,
    random_scores, sample_windows,
)
from nemo_minitron.models import bridge
from nemo_minitron.models.gpt import arch_of
from nemo_minitron.pruning import PruneSpec, best_block, lowest_layers, prune_model, select_indices

# ~50% of SmolLM2-135M's 106.2M non-embedding parameters
TARGETS = {
    "width": PruneSpec(hidden_size=416, ffn_hidden_size=1024, num_attention_heads=6),
    "depth": PruneSpec(num_layers=15),
    "width + depth": PruneSpec(num_layers=22, hidden_size=480, ffn_hidden_size=1152),
}


def ensure_inputs(work: Path) -> None:
    if checkpoint.is_complete(work / "teacher") and (work / "corpus" / "heldout.jsonl").is_file():
        return
    cmd = [sys.executable, "-m", "nemo_minitron.cli.main", "pipeline", f"work_dir={work}", "eval.max_tokens=512"]
    subprocess.run(cmd, check=True, capture_output=True)


def write_report(lines: list[str], out: str | None) -> None:
    """Print a benchmark's Markdown section, and write it to `out` when given (every benchmark here)."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        Path(out).write_text(text)


def overhead(model, windows, repeats: int) -> dict:
    plain, hooked = [], []
    for _ in range(repeats):  # alternate so that background load hits both alike
        plain.append(evaluate_perplexity(model, windows, 4, progress=False).tokens_per_s)
        hooked.append(estimate_importance(model, perplexity_loop(windows, progress=False)).info["tokens_per_s"])
    return {"plain": max(plain), "hooks": max(hooked), "overhead": 1 - max(hooked) / max(plain),
            "tokens": windows.shape[0] * (windows.shape[1] - 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="runs/bench")
    parser.add_argument("--calib-samples", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--loss-samples", type=int, default=16)
    parser.add_argument("--heldout-windows", type=int, default=32)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the Markdown section here")
    args = parser.parse_args()
    work = Path(args.work).absolute()
    ensure_inputs(work)
    parallel.initialize()
    teacher_dir = work / "teacher"
    tokenizer = checkpoint.load_tokenizer(teacher_dir)
    model = checkpoint.load_checkpoint(teacher_dir)
    arch = arch_of(model)
    calib_stream = load_token_stream(work / "corpus" / "calib.jsonl", tokenizer)
    calib = sample_windows(calib_stream, args.seq_len, args.calib_samples, seed=0)
    heldout = sample_windows(load_token_stream(work / "corpus" / "heldout.jsonl", tokenizer), args.eval_seq_len,
                             args.heldout_windows, seed=0)
    metric = loss_metric(sample_windows(calib_stream, args.seq_len, args.loss_samples, seed=1))

    def ppl(m) -> float:
        return evaluate_perplexity(m, heldout, 4, progress=False).perplexity

    cost = overhead(model, calib[: 8 * 4], args.repeats)
    print(f"overhead: {cost}", flush=True)
    start = time.perf_counter()
    scores = {
        "activation": estimate_importance(model, perplexity_loop(calib, progress=False), Aggregation()),
        "activation (heads=input)": estimate_importance(model, perplexity_loop(calib, progress=False), Aggregation(heads="input")),
        "magnitude": magnitude_scores(arch, bridge.gather_global(model)),
        "random": random_scores(arch, seed=0),
    }
    importance_s = time.perf_counter() - start
    layer_loss, _ = layer_loss_scores(model, metric)
    depth_choice = {
        "LM-loss per layer": lowest_layers(layer_loss, 15),
        "Block Importance": lowest_layers(scores["activation"].layers["block_importance"], 15),
        "contiguous block": best_block(contiguous_block_scores(model, 15, metric), 15),
        "magnitude": lowest_layers(scores["magnitude"].layers["magnitude"], 15),
        "random": lowest_layers(scores["random"].layers["random"], 15),
    }
    both_drop = {"activation": best_block(contiguous_block_scores(model, 8, metric), 8),
                 "magnitude": lowest_layers(scores["magnitude"].layers["magnitude"], 8),
                 "random": lowest_layers(scores["random"].layers["random"], 8)}
    teacher_ppl = ppl(model)
    rows = []

    def run(target_name, method_label, score_key, dropped, residual=False):
        target = TARGETS[target_name].target_arch(arch)
        pruned = prune_model(model, target, select_indices(scores[score_key], arch, target, dropped), residual)
        value = ppl(pruned)
        fraction = target.num_parameters()["non_embedding"] / arch.num_parameters()["non_embedding"]
        rows.append((target_name, method_label, fraction, dropped, value))
        print(rows[-1], flush=True)

    for key in ("activation", "activation (heads=input)", "magnitude", "random"):
        run("width", key, key, [])
    run("width", "activation + head residual", "activation", [], residual=True)
    for label, dropped in depth_choice.items():
        run("depth", label, "activation", dropped)
    for key, dropped in both_drop.items():
        run("width + depth", key + (" (contiguous block)" if key == "activation" else ""), key, dropped)

    lines = [
        "## Pruning (benchmarks/pruning.py)", "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()}; teacher SmolLM2-135M ({arch.num_parameters()['non_embedding']:,} non-embedding "
        f"parameters). Calibration: {len(calib)} windows x {args.seq_len} tokens from the corpus calib split "
        f"(aggregation seq=mean, batch=L2); LM-loss depth scores on {args.loss_samples} further windows; held-out "
        f"perplexity on {len(heldout)} windows x {args.eval_seq_len} tokens drawn across the heldout split.", "",
        "### Importance-estimation overhead", "",
        "| forward | tokens/s |", "| --- | ---: |",
        f"| plain (evaluate_perplexity) | {cost['plain']:.0f} |",
        f"| with importance hooks | {cost['hooks']:.0f} |",
        f"| overhead | {100 * cost['overhead']:.1f}% |", "",
        f"Best of {args.repeats} alternating runs over the same {cost['tokens']:,} tokens. Two activation "
        f"importance passes over {len(calib) * args.seq_len:,} tokens took {importance_s:.0f} s in total.", "",
        f"### Held-out perplexity right after pruning (teacher: {teacher_ppl:.2f})", "",
        "| target | ranking | non-embedding kept | dropped layers | perplexity |", "| --- | --- | ---: | --- | ---: |",
    ]
    for target_name, label, fraction, dropped, value in rows:
        spec = {k: v for k, v in TARGETS[target_name].as_dict().items() if v is not None}
        lines.append(f"| {target_name} {spec} | {label} | {100 * fraction:.1f}% | {dropped or '-'} | {value:,.2f} |")
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
