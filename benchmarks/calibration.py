"""How many calibration windows activation importance needs (issue 15 part 5a), on the embedded
teacher (SmolLM2-135M), one CPU process.

The windows are the ones `minitron prune` draws with its defaults (`calib.seq_len=256`,
`calib.seed=0`, the corpus calib split): `sample_windows(calib, 256, N, seed=0)`, N = the largest
count measured (1,024, the paper's). They are shuffled once (seed 0, because `sample_windows`
returns them in stream order, grouped by source), so the first n of them are a uniform random draw
of n windows, as `sample_windows(calib, 256, n)` is. One pass over them computes the scores after
n = 16, 32, ..., 1,024 windows, and each snapshot is compared with the scores of all N windows:

- Spearman rank correlation of the scores: MLP neurons (over all layers' neurons, and the worst
  layer), attention heads (all layers' heads), hidden channels, and the Block Importance of the
  layers (the ranking `depth.method=block_importance` uses; the default `contiguous` block search
  scores the LM loss of `loss_samples` windows and does not use these scores);
- overlap |kept_n & kept_N| / |kept| of the units `select_indices` keeps, at the pipeline's target
  (conf/pipeline.yaml: `ffn_hidden_size` 1536 -> 768; its 6 dropped layers come from the block search,
  so all 30 layers are compared) and at ~50% width (hidden 576 -> 288, FFN -> 768, heads 9 -> 6, i.e.
  2 of 3 per query group, the nearest the groups allow), and of the 6 layers with the lowest BI;
- held-out perplexity right after pruning to each target with the scores of n windows (no retraining).

Exact snapshots. The pass is `estimate_importance` (the library call `minitron prune` makes) on
disjoint chunks of windows: [0, 16), [16, 32), [32, 64), ... The default aggregation (seq = mean |x|,
batch = L2) makes every neuron, head (`heads=output` or `input`) and per-layer hidden-channel score
the square root of a sum over samples of squares, so the scores of the first n windows are
sqrt(sum over chunks of score_chunk^2) (hidden channels: then summed over the layers' two norms, as
`ImportanceRecorder.scores` does), and Block Importance, a mean over tokens, is the token-weighted
mean of the chunks' values. This is the same arithmetic as one pass over the n windows, up to the
float32 rounding of each chunk's scores; `--verify` recomputes the 32-window scores in one pass and
prints the largest relative difference. Only `aggregation.batch=l2` combines this way (it is the default).

    .venv/bin/python benchmarks/calibration.py [--work runs/calib-bench] [--max-windows 1024] [--out FILE]

Needs WORK/teacher (imported with `minitron import` if missing) and the corpus `minitron prune`
uses by default (built or found in the corpus cache). Prints a Markdown section for docs/pruning.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from nemo_minitron import checkpoint, parallel
from nemo_minitron.data.indexed import load_token_stream
from nemo_minitron.eval.perplexity import evaluate_perplexity
from nemo_minitron.importance import ImportanceScores, estimate_importance, perplexity_loop, sample_windows
from nemo_minitron.models.gpt import arch_of
from nemo_minitron.pruning import PruneSpec, lowest_layers, prune_model, select_indices
from nemo_minitron.stage_config import CorpusConfig
from pruning import write_report  # benchmarks/pruning.py

COUNTS = (16, 32, 64, 128, 256, 512, 1024)
TARGETS = {
    "pipeline": PruneSpec(ffn_hidden_size=768),
    "50% width": PruneSpec(hidden_size=288, ffn_hidden_size=768, num_attention_heads=6),
}
BI_DROP = 6  # layers the pipeline drops (30 -> 24)


def ensure_teacher(work: Path) -> Path:
    teacher = work / "teacher"
    if not checkpoint.is_complete(teacher):
        cmd = [sys.executable, "-m", "nemo_minitron.cli.main", "import", "model=smollm2-135m", f"output_dir={teacher}"]
        subprocess.run(cmd, check=True, capture_output=True)
    return teacher


class Accumulator:
    """Sums of the chunk scores' exactly combinable statistics (see the module docstring)."""

    def __init__(self):
        self.parts: dict[str, torch.Tensor] = {}
        self.bi_tokens = 0

    def add(self, chunk: ImportanceScores, tokens: int) -> None:
        new = {"hidden_per_layer": chunk.hidden_per_layer.double().square(), "heads": chunk.heads.double().square(),
               "neurons": chunk.neurons.double().square(),
               "bi": chunk.layers["block_importance"].double() * tokens}
        for key, value in new.items():
            self.parts[key] = self.parts[key] + value if key in self.parts else value
        self.bi_tokens += tokens

    def scores(self, arch, windows: int) -> ImportanceScores:
        hidden_per_layer = self.parts["hidden_per_layer"].sqrt()
        return ImportanceScores(
            arch=arch, method="activation", hidden=hidden_per_layer.sum((0, 1)).float(),
            heads=self.parts["heads"].sqrt().float(), neurons=self.parts["neurons"].sqrt().float(),
            layers={"block_importance": (self.parts["bi"] / self.bi_tokens).float()},
            hidden_per_layer=hidden_per_layer.float(), info={"windows": windows})


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(spearmanr(a.flatten().double().numpy(), b.flatten().double().numpy()).statistic)


def overlap(a: dict | torch.Tensor, b: dict | torch.Tensor) -> tuple[float, float]:
    """(overall, worst-layer) share of b's kept units that a keeps too."""
    if isinstance(a, torch.Tensor):
        a, b = {0: a}, {0: b}
    shares, common, total = [], 0, 0
    for key in b:
        kept_a, kept_b = set(a[key].flatten().tolist()), set(b[key].flatten().tolist())
        common += len(kept_a & kept_b)
        total += len(kept_b)
        shares.append(len(kept_a & kept_b) / len(kept_b))
    return common / total, min(shares)


def compare(snap: ImportanceScores, ref: ImportanceScores, arch, targets: dict) -> dict:
    layers = arch.num_layers
    row = {
        "neurons_rho": spearman(snap.neurons, ref.neurons),
        "neurons_rho_min": min(spearman(snap.neurons[i], ref.neurons[i]) for i in range(layers)),
        "heads_rho": spearman(snap.heads, ref.heads),
        "hidden_rho": spearman(snap.hidden, ref.hidden),
        "bi_rho": spearman(snap.layers["block_importance"], ref.layers["block_importance"]),
    }
    for name, target in targets.items():
        kept, kept_ref = (select_indices(s, arch, target, []) for s in (snap, ref))
        row[name] = {"neurons": overlap(kept.neurons, kept_ref.neurons), "heads": overlap(kept.heads, kept_ref.heads),
                     "hidden": overlap(kept.hidden, kept_ref.hidden)}
    bi, bi_ref = (s.layers["block_importance"] for s in (snap, ref))
    row["bi_drop"] = overlap(torch.tensor(lowest_layers(bi, BI_DROP)), torch.tensor(lowest_layers(bi_ref, BI_DROP)))[0]
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="runs/calib-bench")
    parser.add_argument("--max-windows", type=int, default=1024, help="largest window count (the reference)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--heldout-windows", type=int, default=32, help="0: no perplexity")
    parser.add_argument("--heldout-seq-len", type=int, default=256)
    parser.add_argument("--verify", action="store_true", help="check the 32-window snapshot against one pass")
    parser.add_argument("--out", default=None, help="also write the Markdown section here")
    args = parser.parse_args()
    counts = [n for n in COUNTS if n < args.max_windows] + [args.max_windows]
    work = Path(args.work).absolute()
    teacher_dir = ensure_teacher(work)
    parallel.initialize()
    torch.manual_seed(0)
    tokenizer = checkpoint.load_tokenizer(teacher_dir)
    model = checkpoint.load_checkpoint(teacher_dir)
    arch = arch_of(model)
    targets = {name: spec.target_arch(arch) for name, spec in TARGETS.items()}
    splits = CorpusConfig().splits()  # what `minitron prune` calibrates on when calib.data is null
    windows = sample_windows(load_token_stream(splits["calib"], tokenizer), args.seq_len, args.max_windows, seed=0)
    windows = windows[torch.from_numpy(np.random.default_rng(0).permutation(len(windows)))]
    counts = [n for n in counts if n < len(windows)] + [len(windows)]
    heldout = (sample_windows(load_token_stream(splits["heldout"], tokenizer), args.heldout_seq_len,
                              args.heldout_windows, seed=0) if args.heldout_windows else None)

    start = time.perf_counter()
    acc, snaps, chunk_rates, previous = Accumulator(), {}, [], 0
    for n in counts:
        chunk = windows[previous:n]
        scores = estimate_importance(model, perplexity_loop(chunk, args.micro_batch_size, progress=False))
        acc.add(scores, scores.info["tokens"])
        snaps[n] = acc.scores(arch, n)
        chunk_rates.append(scores.info["tokens_per_s"])
        print(f"{n} windows: {time.perf_counter() - start:.0f} s, {scores.info['tokens_per_s']} tokens/s", flush=True)
        previous = n
    pass_s = time.perf_counter() - start
    # the last chunk alone is a disjoint draw of the same size as all the windows before it
    half = counts[-2] if len(counts) > 1 and 2 * counts[-2] == counts[-1] else None
    disjoint = None
    if half:
        last = Accumulator()
        last.add(scores, scores.info["tokens"])
        disjoint = compare(last.scores(arch, half), snaps[half], arch, targets)

    verify = None
    if args.verify and 32 in snaps:
        direct = estimate_importance(model, perplexity_loop(windows[:32], args.micro_batch_size, progress=False))
        snap = snaps[32]
        verify = max(float(((getattr(snap, k) - getattr(direct, k)).abs() / getattr(direct, k).abs().clamp(min=1e-12)).max())
                     for k in ("hidden", "heads", "neurons"))
        bi = float((snap.layers["block_importance"] - direct.layers["block_importance"]).abs().max())
        check = compare(snap, direct, arch, targets)
        kept = min(check[t][k][1] for t in targets for k in ("neurons", "heads", "hidden"))
        print(f"verify: 32-window snapshot vs one pass: max relative difference {verify:.2e}, BI {bi:.2e}, "
              f"least kept-set overlap {kept}", flush=True)

    ref = snaps[counts[-1]]
    rows = {n: compare(snaps[n], ref, arch, targets) for n in counts[:-1]}
    ppl, teacher_ppl = {}, None
    if heldout is not None:
        teacher_ppl = evaluate_perplexity(model, heldout, args.micro_batch_size, progress=False).perplexity
        for n in counts:
            for name, target in targets.items():
                pruned = prune_model(model, target, select_indices(snaps[n], arch, target, []))
                ppl[n, name] = evaluate_perplexity(pruned, heldout, args.micro_batch_size, progress=False).perplexity
                del pruned
            print(f"perplexity {n}: {[round(ppl[n, t], 2) for t in targets]}", flush=True)
    total_s = time.perf_counter() - start

    N = counts[-1]

    def cells(row: dict) -> list[str]:
        p, w = row["pipeline"], row["50% width"]
        return [f"{row['neurons_rho']:.4f}", f"{row['neurons_rho_min']:.4f}", f"{p['neurons'][0]:.3f}",
                f"{p['neurons'][1]:.3f}", f"{row['heads_rho']:.4f}", f"{w['heads'][0]:.3f}",
                f"{row['hidden_rho']:.4f}", f"{w['hidden'][0]:.3f}", f"{row['bi_rho']:.4f}", f"{row['bi_drop']:.2f}"]

    def ppl_cells(n: int) -> list[str]:
        return [f"{ppl[n, t]:,.2f}" for t in targets] if ppl else []

    ppl_head = [f"ppl pruned: {t}" for t in targets] if ppl else []
    head = ["windows", "neurons rho", "neurons rho (worst layer)", "neurons kept overlap", "neurons overlap (worst layer)",
            "heads rho", "heads kept overlap (6 of 9)", "hidden rho", "hidden kept overlap (288)", "BI rho",
            f"BI lowest {BI_DROP} overlap", *ppl_head]
    lines = [
        "## How many calibration windows (benchmarks/calibration.py)", "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()}; teacher SmolLM2-135M. Calibration: the first n of {N} windows x {args.seq_len} "
        f"tokens drawn by `sample_windows(calib, {args.seq_len}, {N}, seed=0)` from the corpus calib split (what "
        f"`minitron prune` uses), shuffled; aggregation seq=mean, batch=L2, heads=output. Each row compares the "
        f"scores of n windows with those of all {N} (rho: Spearman; overlap: share of the units kept with {N} "
        f"windows that n windows keep too; 'worst layer': the least of the per-layer values). Neurons at the "
        f"pipeline's target (FFN 1536 -> 768 in every layer); heads and hidden channels at ~50% width (heads 9 -> 6, "
        f"hidden 576 -> 288); BI: the {BI_DROP} layers of lowest Block Importance (`depth.method=block_importance`; "
        f"the default `contiguous` does not use them)."
        + (f" Held-out perplexity right after pruning (no retraining) on {len(heldout)} windows x "
           f"{args.heldout_seq_len} tokens of the heldout split (teacher {teacher_ppl:.2f}); 'pipeline' = FFN -> 768, "
           f"'50% width' = hidden 288, FFN 768, heads 6." if ppl else ""), "",
        "| " + " | ".join(head) + " |", "| --- " + "| ---: " * (len(head) - 1) + "|",
    ]
    for n in counts[:-1]:
        lines.append("| " + " | ".join([str(n), *cells(rows[n]), *ppl_cells(n)]) + " |")
    lines.append("| " + " | ".join([f"{N} (reference)", *["1"] * 10, *ppl_cells(N)]) + " |")
    if disjoint:
        lines.append("| " + " | ".join([f"{half} vs the disjoint other {half}", *cells(disjoint), *(["-"] * len(ppl_head))])
                     + " |")
    lines += ["", f"One importance pass over {N * args.seq_len:,} tokens in {pass_s:.0f} s "
              f"({min(chunk_rates):.0f}-{max(chunk_rates):.0f} tokens/s per chunk); whole run {total_s:.0f} s."]
    if verify is not None:
        lines.append(f"Snapshot check (`--verify`): the 32-window scores combined from two chunks differ from one "
                     f"pass over the 32 windows by at most {verify:.1e} (relative).")
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
