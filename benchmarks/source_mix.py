"""Distillation data mixed in equal shares per corpus source (issue 25, the data lever).

The built-in corpus's train split is ~62% GCIDE dictionary text by characters (Python docs 24%,
Austen 9%, fortunes 5%), and the distill stage samples it as it lies. This arm redoes one finished
`benchmarks/recovery.py` arm's distillation with only the data changed: a train file holding equal
characters of every source (a seeded sample of each source's train documents, as many characters
as the smallest source has), the same teacher, pruned model, settings and checkpoints. The result
is laid out as a recovery arm (its teacher, pruned model and corpus linked from the source arm), so
`recovery.py --arm "NAME="` measures it beside the others.

    .venv/bin/python benchmarks/source_mix.py runs/recovery/default-default_lr_5e-4 \
        runs/recovery/default-balanced_experiment
    .venv/bin/python benchmarks/recovery.py --by-source --arm "recipe=..." --arm "default lr 5e-4=" \
        --arm "balanced experiment=" --tokens 0 24576 49152 98304 196608
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from foundation import lines_by_source  # noqa: E402

from nemo_minitron.atomic import write_text  # noqa: E402

SHARED = ("teacher", "pruned", "corpus")


def equal_shares(train: Path, out: Path, seed: int = 0) -> dict[str, int]:
    """Write `out` with equal characters of each source of `train` (documents whole, shuffled)."""
    by_source = {source: [(len(json.loads(line)["text"]), line) for line in lines]
                 for source, lines in lines_by_source(train).items()}
    share = min(sum(n for n, _ in docs) for docs in by_source.values())
    rng = random.Random(seed)
    kept, characters = [], {}
    for source, docs in by_source.items():
        rng.shuffle(docs)
        characters[source] = 0
        for n, line in docs:
            if characters[source] >= share:
                break
            kept.append(line)
            characters[source] += n
    rng.shuffle(kept)
    write_text(out, "\n".join(kept) + "\n")  # whole or absent: main() takes a present file as the arm's
    return characters


def distill_overrides(arm: Path, train: Path, output_dir: Path) -> list[str]:
    """The source arm's distill settings (its recorded ones) with data.train replaced."""
    settings = json.loads((arm / "distill" / "nemo_minitron_output.json").read_text())["settings"]
    overrides = [f"{key}={json.dumps(value) if isinstance(value, list) else value}"
                 for key, value in settings.items()
                 if not key.endswith(".content") and value is not None and key != "data.train"]
    steps = settings["train.steps"]
    saved = sorted(int(p.name.removeprefix("step_")) for p in (arm / "distill" / "checkpoints").iterdir())
    interval = saved[0] if saved else steps
    return [*overrides, f"data.train={train}", f"output_dir={output_dir}", f"train.save_interval={interval}",
            "train.keep_models=true", "train.progress_bar=false"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("arm", type=Path, help="a finished recovery arm (pipeline work_dir)")
    parser.add_argument("out", type=Path, help="the new arm's directory (new, or an interrupted run of this script)")
    args = parser.parse_args()
    train = args.out / "train_equal_shares.jsonl"
    if not train.is_file():  # a new arm; an existing one resumes its distillation with the same file
        if args.out.exists():
            raise SystemExit(f"{args.out} exists and is not an arm of this script: give a new directory")
        args.out.mkdir(parents=True)
        for name in SHARED:
            (args.out / name).symlink_to((args.arm / name).resolve())
        print("characters per source:", equal_shares(args.arm / "corpus" / "train.jsonl", train), flush=True)
    command = [sys.executable, "-m", "nemo_minitron.cli.main", "distill",
               *distill_overrides(args.arm, train, args.out / "distill")]
    print("$", shlex.join(command), flush=True)
    subprocess.run(command, check=True)
    # recovery.py's mark of a finished arm
    (args.out / "results.json").write_text(json.dumps({"source_arm": str(args.arm), "data.train": str(train),
                                                       "distill": str(args.out / "distill" / "final")}) + "\n")


if __name__ == "__main__":
    main()
