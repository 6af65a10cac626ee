"""What checkpoint integrity costs: save and load of the embedded teacher with and without the
recorded checksums and their verification, in one run.

    .venv/bin/python benchmarks/integrity.py [--work runs/bench-integrity] [--repeats 3]

Imports SmolLM2-135M (fp32, 540 MB of weights) once, then times, best of `--repeats`:
- save: `save_checkpoint` (which hashes every weights file) vs megatron's `dist_checkpointing.save` alone;
- load: `load_checkpoint` (which verifies sizes, SHA-256 and shapes first) vs build + megatron's load alone;
- `verify_checkpoint` by itself, with and without checksums.
Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="runs/bench-integrity")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from megatron.core import dist_checkpointing

    from nemo_minitron import checkpoint, parallel
    from nemo_minitron.convert import ImportConfig, import_checkpoint
    from nemo_minitron.models.gpt import build_gpt_model

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    teacher = work / "teacher"
    import_checkpoint(ImportConfig(output_dir=str(teacher)))
    parallel.initialize(1, 1, 0)
    model = checkpoint.load_checkpoint(teacher)
    arch = checkpoint.read_arch(teacher)
    size = sum(r["bytes"] for r in checkpoint.read_metadata(teacher)["files"].values())

    def plain_save():
        target = work / "plain"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        dist_checkpointing.save(model.sharded_state_dict(), str(target))

    def plain_load():
        fresh = build_gpt_model(arch)
        fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), str(teacher / "weights")))

    rows = [
        ("save", best_of(args.repeats, plain_save),
         best_of(args.repeats, lambda: checkpoint.save_checkpoint(model, work / "saved"))),
        ("load", best_of(args.repeats, plain_load), best_of(args.repeats, lambda: checkpoint.load_checkpoint(teacher))),
    ]
    verify = best_of(args.repeats, lambda: checkpoint.verify_checkpoint(teacher))
    sizes_only = best_of(args.repeats, lambda: checkpoint.verify_checkpoint(teacher, checksums=False))
    print(f"SmolLM2-135M fp32, {size / 1e6:.0f} MB of weights, best of {args.repeats}\n")
    print("| operation | megatron alone (s) | with integrity (s) | ratio |")
    print("| --- | --- | --- | --- |")
    for name, plain, ours in rows:
        print(f"| {name} | {plain:.2f} | {ours:.2f} | {ours / plain:.2f}x |")
    print(f"\n`verify_checkpoint`: {verify:.2f} s with SHA-256 ({size / 1e6 / verify:.0f} MB/s), "
          f"{sizes_only:.3f} s sizes and shapes only")
    parallel.destroy()


if __name__ == "__main__":
    main()
