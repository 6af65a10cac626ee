"""Alignment benchmark: held-out objective before and after each stage on the embedded student.

    .venv/bin/python benchmarks/align.py --student runs/smollm2-135m/distill/final [--steps 8]

Runs the real `minitron align` commands on the built-in data set and prints a Markdown table for
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {  # stage -> learning rate (DPO/RPO need far smaller steps than SFT)
    "sft": 1e-4, "steerlm": 1e-4, "dpo": 2e-5, "rpo": 2e-5,
}


def align(stage: str, student: str, work: Path, steps: int) -> dict:
    # float32, as the table in docs/benchmarks.md was measured (align's dtype=auto is bf16 where native)
    args = [sys.executable, "-m", "nemo_minitron.cli.main", "align", f"method={stage}", f"student={student}",
            "dtype=float32", f"output_dir={work / stage}", f"train.steps={steps}", f"optim.lr={SETTINGS[stage]}",
            "optim.warmup_steps=1",
            "train.seq_length=176", "train.global_batch_size=8", "train.micro_batch_size=8",
            "builtin.train_examples=256", "builtin.heldout_examples=64", f"builtin.cache_dir={work / 'data'}"]
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"align method={stage} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--student", required=True)
    parser.add_argument("--work", default="runs/bench-align")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    work = Path(args.work).absolute()
    rows = []
    for stage in SETTINGS:
        r = align(stage, args.student, work, args.steps)
        metric = "heldout_preference_accuracy" if stage in ("dpo", "rpo") else "heldout_response_loss"
        rows.append(f"| {stage} | {metric.removeprefix('heldout_')} | {r[metric + '_before']:.4f} | "
                    f"{r[metric + '_after']:.4f} | {args.steps} x 8 | {r['wall_s']:.0f} s |")
    print("\n".join([
        f"Command: `.venv/bin/python benchmarks/align.py --student {args.student} --steps {args.steps}` "
        "(built-in data: 256 training / 64 held-out examples, seq 176)", "",
        "| stage | held-out measure | before | after | steps x sequences | wall |", "| --- | --- | --- | --- | --- | --- |",
        *rows,
    ]))


if __name__ == "__main__":
    main()
