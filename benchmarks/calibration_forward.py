"""The prune stage's calibration forward with and without the output layer, on the embedded teacher
(SmolLM2-135M), one CPU process, fp32.

Two passes of `minitron prune` read activations only: the importance hooks (`estimate_importance`)
and the reconstruction's recording hooks (`record_statistics`, at the main job's target: FFN 768,
layers 13-18 dropped, the bridge on). Each runs here with `perplexity_loop` (the whole model, with
the calibration loss) and with `activation_loop` (stops after the decoder, what the stage runs now)
over the same `--windows` calibration windows of 256 tokens (`sample_windows` of the corpus calib
split, seed 0). The loops alternate `--repeats` times in one process, so their ratio is measured
under one machine state; the scores and the refit errors of the two loops must be equal, or the
script stops.

    .venv/bin/python benchmarks/calibration_forward.py [--work runs/reconstruction] [--windows 32] \
        [--repeats 2] [--out FILE]

Needs WORK/teacher (imported if missing) and the corpus calib split (built or found in the cache).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from pruning import write_report  # noqa: E402

DROPPED = list(range(13, 19))   # the main job's block (its target: FFN 768, 24 layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="runs/reconstruction")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", help="also write the Markdown section here")
    args = parser.parse_args()

    from nemo_minitron import checkpoint, parallel
    from nemo_minitron.convert import ImportConfig, import_checkpoint
    from nemo_minitron.data.indexed import load_token_stream
    from nemo_minitron.importance import activation_loop, estimate_importance, perplexity_loop, sample_windows
    from nemo_minitron.models.gpt import arch_of
    from nemo_minitron.pruning import select_indices
    from nemo_minitron.pruning.reconstruct import record_statistics
    from nemo_minitron.pruning.spec import PruneSpec
    from nemo_minitron.stage_config import CorpusConfig

    work = Path(args.work)
    if not (work / "teacher").is_dir():
        import_checkpoint(ImportConfig(output_dir=str(work / "teacher")))
    parallel.initialize(1, 1, 0)
    tokenizer = checkpoint.load_tokenizer(work / "teacher")
    model = checkpoint.load_checkpoint(work / "teacher")
    calib = CorpusConfig(output_dir=str(work / "corpus")).splits()["calib"]
    windows = sample_windows(load_token_stream(calib, tokenizer), 256, args.windows, seed=0)
    teacher = arch_of(model)
    target = PruneSpec(ffn_hidden_size=768, drop_layers=DROPPED).target_arch(teacher)
    loops = {"perplexity_loop (whole model)": perplexity_loop, "activation_loop (decoder only)": activation_loop}
    seconds = {(name, part): [] for name in loops for part in ("importance", "reconstruction")}
    results = {}
    for _ in range(args.repeats):
        for name, loop in loops.items():
            start = time.perf_counter()
            scores = estimate_importance(model, loop(windows, 4, progress=False))
            seconds[name, "importance"].append(time.perf_counter() - start)
            indices = select_indices(scores, teacher, target, DROPPED)
            start = time.perf_counter()
            errors = record_statistics(model, indices, loop(windows, 4, progress=False, purpose="reconstruction"),
                                       1e-2, bridge=True).errors
            seconds[name, "reconstruction"].append(time.perf_counter() - start)
            results[name] = (scores.neurons, scores.hidden, scores.layers["block_importance"], errors)
    (neurons, hidden, bi, errors), (neurons2, hidden2, bi2, errors2) = results.values()
    if not (torch.equal(neurons, neurons2) and torch.equal(hidden, hidden2) and torch.equal(bi, bi2)
            and errors == errors2):
        raise SystemExit("the two loops gave different scores or refit errors")
    best = {key: min(values) for key, values in seconds.items()}
    lines = [f"{args.windows} windows of 256 tokens, fastest of {args.repeats} (median in brackets), seconds:", "",
             "| loop | importance | reconstruction |", "| --- | ---: | ---: |"]
    for name in loops:
        lines.append(f"| {name} | " + " | ".join(
            f"{best[name, part]:.1f} ({statistics.median(seconds[name, part]):.1f})"
            for part in ("importance", "reconstruction")) + " |")
    whole, decoder = loops
    lines += ["", "decoder only / whole model: importance "
              f"{best[decoder, 'importance'] / best[whole, 'importance']:.2f}, reconstruction "
              f"{best[decoder, 'reconstruction'] / best[whole, 'reconstruction']:.2f}; scores and refit errors equal"]
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
