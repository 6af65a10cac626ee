"""Foundation benchmarks: import time, eval throughput at TP=1 vs TP=2, teacher held-out perplexity.

    .venv/bin/python benchmarks/foundation.py [--work runs/bench] [--max-tokens 65536]

Runs the real `minitron` commands and prints a Markdown section for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def minitron(*args: str, nproc: int = 1) -> dict:
    launcher = [sys.executable, "-m"] + (
        ["torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m"] if nproc > 1 else []
    )
    start = time.perf_counter()
    proc = subprocess.run([*launcher, "nemo_minitron.cli.main", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(max(1, os.cpu_count() // nproc))})
    if proc.returncode:
        sys.exit(f"minitron {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = round(time.perf_counter() - start, 1)
    return result


def lines_by_source(split: Path) -> dict[str, list[str]]:
    """A corpus split's jsonl lines grouped by their "source", in file order."""
    lines: dict[str, list[str]] = {}
    for line in split.read_text().splitlines():
        lines.setdefault(json.loads(line)["source"], []).append(line)
    return lines


def split_by_source(heldout: Path, out_dir: Path) -> dict[str, Path]:
    paths = {}
    for source, lines in lines_by_source(heldout).items():
        paths[source] = out_dir / f"heldout_{source}.jsonl"
        paths[source].write_text("\n".join(lines) + "\n")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="runs/bench")
    parser.add_argument("--max-tokens", type=int, default=65536)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    work = Path(args.work).absolute()
    teacher = work / "teacher"

    imported = minitron("import", "model=smollm2-135m", f"output_dir={teacher}")
    # The corpus is built by the pipeline; a tiny distillation keeps this step short.
    minitron("pipeline", f"work_dir={work}", "eval.max_tokens=512", "prune.calib.num_samples=8", "prune.loss_samples=2",
             "distill.train.steps=2", "distill.optim.warmup_steps=1", "distill.train.save_interval=0")
    heldout = work / "corpus" / "heldout.jsonl"
    eval_args = ("eval", f"checkpoint={teacher}", f"data={heldout}", f"seq_len={args.seq_len}",
                 f"max_tokens={args.max_tokens}")
    tp1 = minitron(*eval_args)
    # SmolLM2 has 3 query groups, so TP=2 cannot split it: TP=3 and PP=2 are the parallel layouts.
    tp3 = minitron(*eval_args, "tp=3", nproc=3)
    pp2 = minitron(*eval_args, "pp=2", nproc=2)
    per_source = {
        source: minitron("eval", f"checkpoint={teacher}", f"data={path}", f"seq_len={args.seq_len}",
                         f"max_tokens={args.max_tokens // 4}")
        for source, path in split_by_source(heldout, work).items()
    }

    lines = [
        f"### Foundation (issue 2): {platform.processor() or platform.machine()}, {os.cpu_count()} cores, fp32",
        "",
        f"Command: `.venv/bin/python benchmarks/foundation.py --max-tokens {args.max_tokens} --seq-len {args.seq_len}`",
        "",
        "| measurement | value |",
        "| --- | --- |",
        f"| import SmolLM2-135M from GGUF: read + dequantize | {imported['read_s']:.1f} s |",
        f"| import: build Megatron model + load weights | {imported['convert_s']:.1f} s |",
        f"| import: save distributed checkpoint | {imported['save_s']:.1f} s |",
        f"| import: whole command (incl. Python start-up) | {imported['wall_s']:.1f} s |",
        f"| eval throughput TP=1 (1 process, 2 threads) | {tp1['tokens_per_s']:.0f} tokens/s |",
        f"| eval throughput PP=2 (2 processes x 1 thread, gloo) | {pp2['tokens_per_s']:.0f} tokens/s "
        f"({pp2['tokens_per_s'] / tp1['tokens_per_s']:.2f}x TP=1) |",
        f"| eval throughput TP=3 (3 processes on 2 cores, gloo) | {tp3['tokens_per_s']:.0f} tokens/s "
        f"({tp3['tokens_per_s'] / tp1['tokens_per_s']:.2f}x TP=1) |",
        f"| teacher held-out perplexity, TP=1 ({tp1['tokens']:,} tokens, window {args.seq_len}) | {tp1['perplexity']:.4f} |",
        f"| same at PP=2 / TP=3 | {pp2['perplexity']:.4f} / {tp3['perplexity']:.4f} |",
        "",
        f"Teacher held-out perplexity by source (window {args.seq_len}, up to {args.max_tokens // 4:,} tokens each):",
        "",
        "| source | tokens | perplexity |",
        "| --- | --- | --- |",
        *[f"| {s} | {r['tokens']:,} | {r['perplexity']:.2f} |" for s, r in sorted(per_source.items())],
        "",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
