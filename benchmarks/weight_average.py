"""The distilled student as the average of its last step checkpoints (issue 25, weight averaging).

Continues a finished pipeline run's distillation from its newest step checkpoint (a copy of it: the run
is not written to) with the same settings (`PipelineConfig().distill`) and a model checkpoint every
`--every` steps, so the end is the run's own student (exact resume), then evaluates
the uniform average of the weights of the last N checkpoints for each N of `--last` (N = 1 is the
run's own end) on the corpus's held-out split and the two out-of-corpus texts, as recovery.py
evaluates a checkpoint (fp32, 8,192 tokens in windows of 512 spread over each text). The result
lands in OUT/result.json and as a Markdown table.

    PYTHONPATH=. .venv/bin/python benchmarks/weight_average.py runs/main --out runs/weight_average \
        --every 4 --last 1 2 3 4 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from main_job import MAX_TOKENS, write_texts  # noqa: E402
from pruning import write_report  # noqa: E402
from recovery import evaluate  # noqa: E402


def distill(work: Path, out: Path, every: int) -> Path:
    """out/distill: work's distillation continued from a copy of its newest step checkpoint, a model
    kept every `every` steps."""
    from nemo_minitron.distill.stage import distill_checkpoint
    from nemo_minitron.outputs import MARKER_FILE
    from nemo_minitron.pipeline.run import PipelineConfig
    from nemo_minitron.train import state
    from nemo_minitron.train.config import DataConfig

    newest = state.complete_checkpoints(work / "distill")[-1]
    if not (out / "distill").exists():  # the run's own marker with it: the stage resumes what it wrote
        shutil.copytree(newest, out / "distill" / state.CHECKPOINTS_DIR / newest.name)
        shutil.copy2(work / "distill" / MARKER_FILE, out / "distill" / MARKER_FILE)
    base = PipelineConfig().distill
    teacher = work / "teacher_corrected" / "final"
    distill_checkpoint(dataclasses.replace(
        base, teacher=str(teacher if teacher.is_dir() else work / "teacher"), student=str(work / "pruned"),
        output_dir=str(out / "distill"),
        data=DataConfig(train=str(work / "corpus" / "train.jsonl"), valid=str(work / "corpus" / "heldout.jsonl")),
        train=dataclasses.replace(base.train, save_interval=every, keep_models=True)))
    return out / "distill"


def average(paths: list[Path], out: Path) -> Path:
    """Write the checkpoint whose every weight is the mean of `paths`' (float64 sums)."""
    import torch

    from nemo_minitron import checkpoint, parallel

    if checkpoint.is_complete(out):
        return out
    parallel.initialize()
    model = checkpoint.load_checkpoint(paths[0])
    total = {name: p.detach().double().clone() for name, p in model.named_parameters()}
    for path in paths[1:]:
        checkpoint.load_dist_weights(model, path)
        for name, p in model.named_parameters():
            total[name] += p.detach().double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(total[name] / len(paths))
    checkpoint.save_checkpoint(model, out, checkpoint.load_tokenizer(paths[0]),
                               metadata={"averaged": [str(p) for p in paths]})
    parallel.destroy()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work_dir", type=Path, help="a finished `minitron pipeline` work_dir")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--every", type=int, default=4, help="steps between kept model checkpoints")
    parser.add_argument("--last", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="checkpoints averaged")
    args = parser.parse_args()
    args.work_dir = args.work_dir.absolute()  # the run's settings name its paths absolute
    heldout = args.work_dir / "corpus" / "heldout.jsonl"
    texts = {"heldout": heldout, **write_texts(args.out / "texts")}
    run = distill(args.work_dir, args.out, args.every)
    from nemo_minitron.train import state

    saved = [p / state.MODEL_DIR for p in sorted((run / state.CHECKPOINTS_DIR).iterdir())
             if (p / state.MODEL_DIR).is_dir()]
    models = [*saved, run / "final"]
    cache = args.out / "result.json"
    result = json.loads(cache.read_text()) if cache.is_file() else {}
    for n in args.last:
        if str(n) not in result:
            path = models[-1] if n == 1 else average(models[-n:], args.out / f"average_last_{n}")
            result[str(n)] = evaluate(path, texts, MAX_TOKENS)
            cache.write_text(json.dumps(result, indent=1) + "\n")
    names = list(texts)
    lines = ["| checkpoints averaged | " + " | ".join(names) + " |", "| ---: |" + " ---: |" * len(names)]
    lines += [f"| {n} | " + " | ".join(f"{result[n][t]:.2f}" for t in names) + " |" for n in result]
    write_report(lines, None)


if __name__ == "__main__":  # the checkpoint writer's helper processes import this file
    main()
