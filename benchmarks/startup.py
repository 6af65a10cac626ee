"""Start-up of `minitron` commands: seconds from launching the process to its first own line on
stderr (a `[minitron ...]` log line or its `error:` line), and to its exit, the median of
`--repeats` runs of each command, alternated so that background load hits them alike. Also the
import of the package alone (`import nemo_minitron`, whose names load on first use) and of the
libraries below it, for where the seconds go.

    .venv/bin/python benchmarks/startup.py [--checkpoint DIR] [--repeats 5] [--out FILE]

`--checkpoint`: a checkpoint for the commands that read one (`minitron check`, `minitron prune
plan_only=true`); without it only the commands that need none run.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from pruning import write_report  # noqa: E402

IMPORTS = {
    "import nemo_minitron": "import nemo_minitron",
    "import torch": "import torch",
    "import torch, megatron.core": "import torch, megatron.core",
    "import transformers (tokenizers)": "from transformers import AutoTokenizer",
}


def commands(checkpoint: str | None) -> dict[str, list[str]]:
    found = {
        "minitron --help": ["--help"],
        "minitron eval (a missing checkpoint)": ["eval", "checkpoint=/nonexistent", "data=/nonexistent"],
        "minitron distill (an unknown key)": ["distill", "student=s", "teacher=t", "output_dir=o", "train.stepz=1"],
    }
    if checkpoint:
        found["minitron check (a real checkpoint)"] = ["check", f"checkpoint={checkpoint}"]
        found["minitron prune plan_only=true"] = ["prune", f"checkpoint={checkpoint}", "output_dir=/tmp/startup-plan",
                                                  "plan_only=true", "target.ffn_hidden_size=768"]
    return found


def first_line_and_exit(argv: list[str]) -> tuple[float, float]:
    """(seconds to the first stderr line, or to exit when there is none; seconds to exit)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    first = time.perf_counter() - start
    proc.stderr.read()
    proc.wait()
    total = time.perf_counter() - start
    return (first if line else total), total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a checkpoint for the commands that read one")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="also write the Markdown section here")
    args = parser.parse_args()
    runs = {name: [sys.executable, "-m", "nemo_minitron.cli.main", *argv] for name, argv in commands(args.checkpoint).items()}
    runs |= {name: [sys.executable, "-c", code] for name, code in IMPORTS.items()}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, argv in runs.items():
            times[name].append(first_line_and_exit(argv))
    lines = [f"Median of {args.repeats} runs each, alternated.", "",
             "| command | first own line s | exit s |", "| --- | ---: | ---: |"]
    for name, measured in times.items():
        first = "" if name in IMPORTS else f"{statistics.median(t[0] for t in measured):.2f}"
        lines.append(f"| `{name}` | {first} | {statistics.median(t[1] for t in measured):.2f} |")
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
