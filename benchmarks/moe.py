"""Mixture-of-experts benchmarks on a real pretrained MoE: the embedded SmolLM2-135M with every FFN
split into 8 experts of 192 neurons (`models/upcycle.py`: zero router, top-8, exact), one CPU process.

1. exactness: the MoE's held-out perplexity against the dense model's, and the largest logit
   difference on the first held-out window;
2. importance-hook overhead on the MoE: tokens/s of the calibration forward with the hooks against
   a plain forward over the same windows (alternating runs, best of each);
3. expert pruning without retraining, 8 -> 6 and 8 -> 4 experts per layer (top-k lowered to the
   experts left), held-out perplexity for each expert ranking: "output" (the router-weighted output
   norm, the default), "frequency", "router_mass", "magnitude" and "random". The zero router gives
   every kept expert weight 1/E' instead of 1/E, which scales the layer's output by E/E'; each
   ranking is measured as pruned ("as pruned") and with the kept experts' down projections scaled
   by E'/E ("rescaled"), which undoes that and leaves exactly the dense model without the dropped
   experts' neurons. Routing is uniform by construction, so "frequency" and "router_mass" tie on
   every expert (the lowest indices win ties) and rank no better than chance.

    .venv/bin/python benchmarks/moe.py [--work runs/bench-moe] [--calib-samples 64] [--heldout-windows 32]
    .venv/bin/python benchmarks/moe.py --overhead-only     # 2. alone, for the dense model and the MoE alike

Prints a Markdown section for docs/pruning.md and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from nemo_minitron import checkpoint, parallel
from nemo_minitron.data.corpus import build_corpus
from nemo_minitron.data.indexed import load_token_stream
from nemo_minitron.eval.perplexity import evaluate_perplexity
from nemo_minitron.importance import estimate_importance, magnitude_scores, perplexity_loop, sample_windows
from nemo_minitron.models import bridge
from nemo_minitron.models.gpt import build_gpt_model
from nemo_minitron.models.upcycle import split_into_experts
from nemo_minitron.pruning import PruneSpec, prune_global, select_indices
from pruning import overhead  # benchmarks/pruning.py: the same alternating measurement

EXPERTS = 8
KEPT = (6, 4)
METHODS = ("output", "frequency", "router_mass", "magnitude", "random")


def inputs(work: Path) -> tuple[Path, dict[str, Path]]:
    """The imported embedded teacher and the corpus splits under `work` (made once)."""
    teacher = work / "teacher"
    if not checkpoint.is_complete(teacher):
        from nemo_minitron.convert import ImportConfig, import_checkpoint

        import_checkpoint(ImportConfig(output_dir=str(teacher), dtype="float32"))
    return teacher, build_corpus(work / "corpus")


def perplexity(model, windows) -> float:
    return evaluate_perplexity(model, windows, 4, progress=False).perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-moe"))
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--heldout-windows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--overhead-only", action="store_true", help="measure the hook overhead of the dense "
                        "model and of the MoE on the same windows, and stop")
    args = parser.parse_args()

    teacher_dir, splits = inputs(args.work)
    parallel.initialize(1, 1)
    tokenizer = checkpoint.load_tokenizer(teacher_dir)
    dense = checkpoint.load_checkpoint(teacher_dir)
    dense_arch = checkpoint.read_arch(teacher_dir)
    calib = sample_windows(load_token_stream(splits["calib"], tokenizer), args.seq_len, args.calib_samples, seed=0)
    heldout = sample_windows(load_token_stream(splits["heldout"], tokenizer), args.seq_len, args.heldout_windows, seed=0)

    arch, moe_sd = split_into_experts(dense_arch, bridge.gather_global(dense), EXPERTS)
    moe = build_gpt_model(arch)
    bridge.load_global(moe, moe_sd)
    overhead_windows = calib[: max(4, args.calib_samples // 4)]
    if args.overhead_only:
        for name, model in (("dense", dense), ("moe", moe)):
            result = overhead(model, overhead_windows, args.repeats)
            print(f"{name}: {result['hooks']:.0f} vs {result['plain']:.0f} tokens/s plain, "
                  f"{100 * result['overhead']:.1f}% overhead")
        return
    first = heldout[:1, :-1]
    from nemo_minitron.models.runner import forward_microbatches, gather_vocab_parallel

    logits = [forward_microbatches(m, [{"tokens": first}], lambda out, _: gather_vocab_parallel(out))[0]
              for m in (dense, moe)]
    exact = {"dense": perplexity(dense, heldout), "moe": perplexity(moe, heldout),
             "max_logit_difference": (logits[0] - logits[1]).abs().max().item()}
    del dense

    hook_cost = overhead(moe, overhead_windows, args.repeats)
    start = time.perf_counter()
    scores = estimate_importance(moe, perplexity_loop(calib, progress=False))
    importance_s = time.perf_counter() - start
    scores.experts["magnitude"] = magnitude_scores(arch, moe_sd).experts["magnitude"]

    results: dict[tuple[int, str], dict[str, float]] = {}
    for kept in KEPT:
        target = PruneSpec(num_moe_experts=kept, moe_router_topk=kept).target_arch(arch)
        for variant in ("as pruned", "rescaled"):
            results[kept, variant] = {}
            for method in METHODS:
                pruned_sd = prune_global(moe_sd, arch, target, select_indices(scores, arch, target, [], method))
                if variant == "rescaled":
                    pruned_sd = {name: t * (kept / EXPERTS) if ".experts." in name and "linear_fc2" in name else t
                                 for name, t in pruned_sd.items()}
                pruned = build_gpt_model(target)
                bridge.load_global(pruned, pruned_sd)
                results[kept, variant][method] = perplexity(pruned, heldout)
                print(f"experts {kept} {variant}, {method}: {results[kept, variant][method]:.2f}", flush=True)

    tokens = args.heldout_windows * args.seq_len
    lines = [
        f"Command: `.venv/bin/python benchmarks/moe.py --calib-samples {args.calib_samples} "
        f"--heldout-windows {args.heldout_windows}` ({platform.machine()}, {torch.get_num_threads()} threads, fp32)",
        "",
        f"SmolLM2-135M split into {EXPERTS} experts of {arch.moe_ffn_hidden_size} neurons per layer (top-{EXPERTS}), "
        f"held-out perplexity over {tokens:,} tokens (windows of {args.seq_len}):",
        "",
        "| model | perplexity |",
        "| --- | --- |",
        f"| dense SmolLM2-135M | {exact['dense']:.4f} |",
        f"| split into {EXPERTS} experts | {exact['moe']:.4f} (largest logit difference {exact['max_logit_difference']:.1e}) |",
        "",
        f"Importance hooks on the MoE: {hook_cost['hooks']:.0f} vs {hook_cost['plain']:.0f} tokens/s plain "
        f"({100 * hook_cost['overhead']:.1f}% overhead); the importance pass over {args.calib_samples} x "
        f"{args.seq_len} tokens took {importance_s:.0f} s.",
        "",
        "Expert pruning without retraining (top-k lowered to the experts left), held-out perplexity:",
        "",
        "| experts kept | " + " | ".join(METHODS) + " |",
        "| --- | " + " | ".join("---" for _ in METHODS) + " |",
    ]
    lines += [f"| {kept} of {EXPERTS}, {variant} | " + " | ".join(f"{row[m]:,.2f}" for m in METHODS) + " |"
              for (kept, variant), row in results.items()]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
