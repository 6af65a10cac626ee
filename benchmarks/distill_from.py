"""Distil a pruned model from a teacher of one's choice with the main job's distillation settings.

`PipelineConfig().distill` (steps, batch, schedule, seed, dtype) on the corpus of a recovery.py
arm, with only the student and the teacher chosen: e.g. the main job's pruned model (pruned from
the teacher as imported) distilled from an arm's corrected teacher, to tell what the prune's start
and what the distillation's teacher each contribute. The student is evaluated as recovery.py
evaluates a checkpoint (fp32, 8,192 tokens in windows of 512 spread over each text) on the arm's
held-out split and the two out-of-corpus texts (written to OUT/texts); the result lands in
OUT/result.json.

    PYTHONPATH=. .venv/bin/python benchmarks/distill_from.py \
        --student runs/recovery/default-main_job_72_steps_every_12/pruned \
        --teacher runs/recovery/default-corrected_24_at_2e-4/teacher_corrected/final \
        --corpus runs/recovery/default-main_job_72_steps_every_12/corpus --out runs/distill_from/cross
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from main_job import MAX_TOKENS, write_texts  # noqa: E402
from recovery import evaluate  # noqa: E402


def distill_and_evaluate(student: Path, teacher: Path, out: Path, train: Path, heldout: Path,
                         texts: dict[str, Path]) -> dict[str, float]:
    """Distil `student` from `teacher` with the main job's distillation settings on `train`
    (validated on `heldout`) into out/distill; out/distill/final's perplexity on each of `texts`."""
    from nemo_minitron.distill.stage import distill_checkpoint
    from nemo_minitron.pipeline.run import PipelineConfig
    from nemo_minitron.train.config import DataConfig

    distill_checkpoint(dataclasses.replace(PipelineConfig().distill, teacher=str(teacher), student=str(student),
                                           output_dir=str(out / "distill"),
                                           data=DataConfig(train=str(train), valid=str(heldout))))
    return evaluate(out / "distill" / "final", texts, MAX_TOKENS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", type=Path, required=True, help="the pruned checkpoint to distil")
    parser.add_argument("--teacher", type=Path, required=True, help="the teacher checkpoint")
    parser.add_argument("--corpus", type=Path, required=True, help="a pipeline run's corpus/ (train and held-out)")
    parser.add_argument("--out", type=Path, required=True, help="OUT/distill, OUT/texts and OUT/result.json")
    args = parser.parse_args()
    heldout = args.corpus / "heldout.jsonl"
    texts = {"heldout": heldout, **write_texts(args.out / "texts")}
    result = distill_and_evaluate(args.student, args.teacher, args.out, args.corpus / "train.jsonl", heldout, texts)
    (args.out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":  # the checkpoint writer's helper processes import this file
    main()
