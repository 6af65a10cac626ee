"""Searched architecture vs hand-picked width-only and depth-only targets of the same size.

Every arm is a `minitron search` run (the baselines pin the grid to their one architecture), so all
three share the pruning (one importance estimate), the distillation budget and the held-out
validation. Budget: ~50% of the teacher's non-embedding parameters.

  python benchmarks/search.py --teacher /tmp/bench/teacher --corpus /tmp/bench/corpus --work /tmp/search_bench \
      --importance-from /tmp/pl2/pruned/importance.pt
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from nemo_minitron.models.config import ModelArch

ARMS = {  # name -> search.space.choices pins (None: the grid search itself)
    "search": None,
    "width-only": {"num_layers": 30, "hidden_size": 512, "ffn_hidden_size": 640},
    "depth-only": {"num_layers": 15, "hidden_size": 576, "ffn_hidden_size": 1536},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", type=Path, required=True)
    p.add_argument("--corpus", type=Path, required=True, help="dir with train/calib/heldout.jsonl")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--importance-from", default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--max-candidates", type=int, default=6)
    p.add_argument("--top-k", type=int, default=2)
    args = p.parse_args()
    teacher = ModelArch.load(args.teacher / "model_config.json")
    budget = teacher.num_parameters()["non_embedding"] / 2
    common = [
        f"checkpoint={args.teacher}", f"budget.non_embedding_params={budget}", "budget.tolerance=0.03",
        "search.space.hidden_multiple=64", "search.space.ffn_multiple=128", f"search.retrain_steps={args.steps}",
        "search.space.choices.num_attention_heads=[9]", "search.space.choices.num_query_groups=[3]",
        f"++prune.calib.data={args.corpus / 'calib.jsonl'}", "++prune.calib.num_samples=64",
        "++prune.calib.seq_len=128", "++prune.loss_samples=8",
        f"++distill.data.train={args.corpus / 'train.jsonl'}", f"++distill.data.valid={args.corpus / 'heldout.jsonl'}",
        f"++distill.data.cache_dir={args.work / 'cache'}", "++distill.train.global_batch_size=4",
        "++distill.train.micro_batch_size=2", "++distill.train.seq_length=128", "++distill.train.eval_batches=8",
        "++distill.train.progress_bar=false", "++distill.train.save_interval=1000",
        "++distill.optim.lr=3e-4", "++distill.optim.min_lr=3e-5", "++distill.optim.warmup_steps=2",
    ]
    if args.importance_from:
        common.append(f"importance_from={args.importance_from}")
    rows = {}
    for arm, pins in ARMS.items():
        extra = ([f"search.max_candidates={args.max_candidates}", f"search.top_k={args.top_k}",
                  "search.space.choices.num_layers=[15,20,24,30]"] if pins is None else
                 ["search.max_candidates=1", "search.top_k=1", "budget.tolerance=0.05",
                  *[f"search.space.choices.{k}=[{v}]" for k, v in pins.items()]])
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "nemo_minitron.cli.main", "search", *common, *extra,
                               f"output_dir={args.work / arm}"], capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{arm} failed:\n{proc.stderr[-3000:]}")
        report = json.loads((args.work / arm / "report.json").read_text())
        best = report["candidates"][0]
        rows[arm] = {"architecture": best["name"], "non_embedding": best["parameters"]["non_embedding"],
                     "total": best["parameters"]["total"], "zero_shot_loss": best["zero_shot_loss"],
                     "retrained_loss": best["retrained_loss"], "heldout_perplexity": best["retrained_perplexity"],
                     "seconds": round(time.perf_counter() - start, 1),
                     "candidates": [(r["name"], r["zero_shot_loss"], r["retrained_loss"]) for r in report["candidates"]]}
        print(arm, json.dumps(rows[arm]), flush=True)
    (args.work / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("| arm | architecture | non-emb params | zero-shot calib loss | held-out loss | held-out ppl | s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for arm, r in rows.items():
        print(f"| {arm} | {r['architecture']} | {r['non_embedding']:,} | {r['zero_shot_loss']:.3f} "
              f"| {r['retrained_loss']:.3f} | {r['heldout_perplexity']:.2f} | {r['seconds']} |")


if __name__ == "__main__":
    main()
