"""Quality per distillation token (issue 25): held-out perplexity against distillation tokens.

Every arm is one `minitron pipeline` run on the embedded default (SmolLM2-135M, the Debian corpus)
with the main job's settings plus the arm's overrides, distilling for the largest token count
asked, a step checkpoint kept at every other count (as its model alone, `train.keep_models`: a
192-step arm takes ~4.4 GB, not the 17 GB of whole checkpoints with their optimizer state). Each
checkpoint (and the pruned model, at 0 tokens) is evaluated as the main job evaluates: fp32,
`--eval-tokens` tokens in windows of 512 spread evenly over the text, on the recipe arm's held-out
split (every arm on the same text) and on the two out-of-corpus texts of `benchmarks/main_job.py`
(the Jargon File, the Debian constitution); with `--by-source` also on each source's share of that
held-out split (`heldout:SOURCE`).

Reported per arm and text: perplexity at each token count, the fraction of the lost
log-perplexity recovered, (ln pruned - ln p) / (ln pruned - ln teacher) with the recipe arm's
pruned model as the common start, and tokens-to-reach: the tokens the arm needs to reach the
recipe arm's perplexity at the reference count (log-perplexity interpolated linearly in tokens
between checkpoints); then one row per arm of every text's perplexity after the last count and
its ratio to the teacher's. The learning rate follows one schedule over the whole run, so a point
before the end is a checkpoint of the longer run, not a run of that length.

    .venv/bin/python benchmarks/recovery.py --work runs/recovery \
        --arm recipe= --arm "reconstruct=prune.reconstruct=true" \
        [--tokens 0 24576 49152 98304 196608] [--reference 196608] [--by-source] [--out FILE] [--plot FILE]

`--arm NAME=OVERRIDES` (space-separated pipeline overrides; the first arm is the recipe the
others are compared with). An arm that sets `distill.train.global_batch_size` or `seq_length`
steps by its own tokens per step; `--tokens` must be multiples of every arm's. An arm that sets
`distill.train.steps` ends there (its schedule), at the counts of `--tokens` up to its own, which
must be one of them: a shorter arm beside a longer recipe. `--target width` prunes to 30 layers at FFN 512 instead of the
default 24 layers at FFN 768 (the same parameter count). A finished arm is not rerun.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from foundation import split_by_source  # noqa: E402
from main_job import EVAL_PROTOCOL, MAX_TOKENS, SEQ_LEN, write_texts  # noqa: E402
from pruning import write_report  # noqa: E402

TARGETS = {"default": [], "width": ["prune.target.num_layers=30", "prune.target.ffn_hidden_size=512"]}


def train_settings(overrides: list[str]) -> dict[str, int]:
    """The arm's `distill.train.` overrides among global_batch_size, seq_length and steps."""
    keys = {f"distill.train.{name}": name for name in ("global_batch_size", "seq_length", "steps")}
    found = {}
    for item in overrides:
        key, _, value = item.partition("=")
        if key in keys:
            found[keys[key]] = int(value)
    return found


def tokens_per_step(overrides: list[str]) -> int:
    """An arm's tokens per distillation step: the main job's global batch x sequence length
    (`PipelineConfig`), or the arm's own `distill.train.global_batch_size=` / `seq_length=`."""
    from nemo_minitron.pipeline.run import PipelineConfig

    train = PipelineConfig().distill.train
    sizes = {"global_batch_size": train.global_batch_size, "seq_length": train.seq_length,
             **train_settings(overrides)}
    return sizes["global_batch_size"] * sizes["seq_length"]


def steps_of(tokens: list[int], per_step: int, last: int | None) -> list[int]:
    """The arm's step counts: `tokens` by its tokens per step, up to its own `distill.train.steps`
    (`last`; None: all of them)."""
    steps = [t // per_step for t in tokens]
    if any(s * per_step != t for s, t in zip(steps, tokens)):
        raise SystemExit(f"--tokens must be multiples of {per_step} (an arm's tokens per step)")
    if last is not None and last not in steps:
        raise SystemExit(f"an arm's distill.train.steps={last} ({last * per_step:,} tokens) must be one of --tokens")
    return [s for s in steps if last is None or s <= last]


def run_arm(work: Path, overrides: list[str], steps: list[int]) -> None:
    """The pipeline with a step checkpoint at every count (their gcd as the save interval), the
    older ones as their model alone."""
    interval = math.gcd(*[s for s in steps if s])
    own = [item for item in overrides if not item.startswith("distill.train.steps=")]
    command = [sys.executable, "-m", "nemo_minitron.cli.main", "pipeline", f"work_dir={work}",
               f"distill.train.steps={max(steps)}", f"distill.train.save_interval={interval}",
               "distill.train.keep_models=true", *own]
    print("$", shlex.join(command), flush=True)
    subprocess.run(command, check=True)


def checkpoints(work: Path, steps: list[int], per_step: int) -> dict[int, Path]:
    """{tokens: checkpoint}: the pruned model at 0, then the step checkpoints (the last is final)."""
    found = {}
    for step in steps:
        path = (work / "pruned" if step == 0 else work / "distill" / "final" if step == max(steps)
                else work / "distill" / "checkpoints" / f"step_{step:07d}" / "model")
        if not path.is_dir():
            raise SystemExit(f"{path} is missing: was {work} run with other --tokens?")
        found[step * per_step] = path
    return found


def evaluate(path: Path, texts: dict[str, Path], eval_tokens: int) -> dict[str, float]:
    from nemo_minitron.eval.stage import EvalConfig, evaluate_checkpoint

    return {name: evaluate_checkpoint(EvalConfig(checkpoint=str(path), data=str(data), seq_len=SEQ_LEN,
                                                 max_tokens=eval_tokens))["perplexity"]
            for name, data in texts.items()}


def measure(work: Path, steps: list[int], per_step: int, texts: dict[str, Path], eval_tokens: int,
            teacher: bool) -> dict:
    """{"curve": {tokens: {text: ppl}}} and with `teacher` (the recipe arm: every arm distils the
    same embedded teacher) {"teacher": {text: ppl}}, cached in work/recovery.json with the protocol
    it was measured under; a text added later is evaluated alone."""
    cache = work / "recovery.json"
    saved = json.loads(cache.read_text()) if cache.is_file() else {}
    if (saved.get("eval_tokens"), saved.get("protocol")) != (eval_tokens, EVAL_PROTOCOL):
        saved = {}
    points = {str(t): p for t, p in checkpoints(work, steps, per_step).items()}
    if teacher:
        points = {"teacher": work / "teacher", **points}
    table = {"teacher": saved.get("teacher", {}), **saved.get("curve", {})}
    for point, path in points.items():
        missing = {name: data for name, data in texts.items() if name not in table.setdefault(point, {})}
        if missing:
            table[point].update(evaluate(path, missing, eval_tokens))
            result = {"eval_tokens": eval_tokens, "protocol": EVAL_PROTOCOL, "teacher": table["teacher"],
                      "curve": {k: v for k, v in table.items() if k != "teacher"}}
            cache.write_text(json.dumps(result, indent=1) + "\n")
    result = {"texts": sorted(texts), "curve": {int(p): {n: table[p][n] for n in texts} for p in points if p != "teacher"}}
    if teacher:
        result["teacher"] = {n: table["teacher"][n] for n in texts}
    return result


def recovered(pruned: float, teacher: float, value: float) -> float:
    """The fraction of the lost log-perplexity won back."""
    return (math.log(pruned) - math.log(value)) / (math.log(pruned) - math.log(teacher))


def tokens_to_reach(curve: dict[int, float], goal: float) -> float | None:
    """The first token count where the curve reaches `goal`, log-perplexity linear between
    checkpoints; None if it never does."""
    points = sorted(curve.items())
    for (t0, p0), (t1, p1) in zip(points, points[1:]):
        if p0 <= goal:
            return t0
        if p1 <= goal:
            return t0 + (t1 - t0) * (math.log(p0) - math.log(goal)) / (math.log(p0) - math.log(p1))
    return points[0][0] if points[0][1] <= goal else None


def common_texts(arms: dict[str, dict]) -> list[str]:
    return sorted(set.intersection(*(set(result["texts"]) for result in arms.values())))


def report(arms: dict[str, dict], reference: int) -> list[str]:
    names = common_texts(arms)
    recipe = next(iter(arms.values()))
    tokens = sorted(recipe["curve"])
    lines = []
    for text in names:
        teacher, start = recipe["teacher"][text], recipe["curve"][0][text]
        goal = recipe["curve"][reference][text]
        lines += [f"**{text}** (teacher {teacher:.2f}; recovered: of ln {start:.1f} - ln {teacher:.2f}, from the recipe's "
                  f"pruned model; reach: tokens to the recipe's {reference:,}-token {goal:.2f})", "",
                  "| arm | " + " | ".join(f"{t:,}" for t in tokens) + " | reach |",
                  "| --- |" + " ---: |" * (len(tokens) + 1)]
        for arm, result in arms.items():
            curve = {t: point[text] for t, point in result["curve"].items()}
            cells = [f"{curve[t]:.1f} ({recovered(start, teacher, curve[t]):.0%})" if t in curve else "-"
                     for t in tokens]
            reach = tokens_to_reach(curve, goal)
            lines.append(f"| {arm} | " + " | ".join(cells) + f" | {'-' if reach is None else f'{reach:,.0f}'} |")
        lines.append("")
    return lines + summary(arms, names)


def summary(arms: dict[str, dict], names: list[str]) -> list[str]:
    """One row per arm: each text's perplexity at the arm's last count and its ratio to the teacher's."""
    teacher = next(iter(arms.values()))["teacher"]
    lines = ["**At each arm's end**, student (student / teacher):", "",
             "| arm | tokens | " + " | ".join(names) + " |", "| --- | ---: |" + " ---: |" * len(names),
             "| teacher | | " + " | ".join(f"{teacher[text]:.2f}" for text in names) + " |"]
    for arm, result in arms.items():
        end = max(result["curve"])
        final = result["curve"][end]
        lines.append(f"| {arm} | {end:,} | "
                     + " | ".join(f"{final[t]:.1f} ({final[t] / teacher[t]:.2f})" for t in names) + " |")
    return lines + [""]


def plot(arms: dict[str, dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = common_texts(arms)
    columns = min(4, len(names))
    rows = math.ceil(len(names) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.6 * rows), squeeze=False)
    for ax, text in zip(axes.flat, names):
        for arm, result in arms.items():
            points = sorted(result["curve"].items())
            ax.plot([t / 1000 for t, _ in points], [v[text] for _, v in points], marker="o", label=arm)
        ax.axhline(next(iter(arms.values()))["teacher"][text], color="gray", linestyle="--", label="teacher")
        ax.set(title=text, xlabel="distillation tokens (thousands)", ylabel="perplexity", yscale="log")
    for ax in axes.flat[len(names):]:
        ax.set_axis_off()
    axes.flat[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="runs/recovery", help="one pipeline work_dir per arm goes under it")
    parser.add_argument("--arm", action="append", required=True, help="NAME=OVERRIDES (the first: the recipe)")
    parser.add_argument("--target", choices=sorted(TARGETS), default="default")
    parser.add_argument("--tokens", type=int, nargs="+", default=[0, 24576, 49152, 98304, 196608, 393216])
    parser.add_argument("--reference", type=int, default=196608, help="the recipe's token count to reach")
    parser.add_argument("--eval-tokens", type=int, default=MAX_TOKENS)
    parser.add_argument("--by-source", action="store_true",
                        help="also each source's share of the held-out split")
    parser.add_argument("--out", help="also write the Markdown section here")
    parser.add_argument("--plot", help="write the curves here (PNG)")
    args = parser.parse_args()
    tokens = sorted(set([0, *args.tokens]))
    if args.reference not in tokens:
        raise SystemExit("--reference must be one of --tokens")
    work = Path(args.work)
    texts = write_texts(work / "texts")
    arms = {}
    for item in args.arm:
        name, _, overrides = item.partition("=")
        overrides = [*TARGETS[args.target], *shlex.split(overrides)]
        per_step = tokens_per_step(overrides)
        steps = steps_of(tokens, per_step, train_settings(overrides).get("steps"))
        arm_dir = work / re.sub(r"[^A-Za-z0-9.-]+", "_", f"{args.target}-{name}")  # a Hydra-safe work_dir
        if not (arm_dir / "results.json").is_file():
            run_arm(arm_dir, overrides, steps)
        if not arms:  # the recipe's held-out split is every arm's, whatever corpus an arm trains on
            texts["heldout"] = arm_dir / "corpus" / "heldout.jsonl"
            if args.by_source:
                texts.update({f"heldout:{source}": path
                              for source, path in split_by_source(texts["heldout"], work / "texts").items()})
        arms[name] = measure(arm_dir, steps, per_step, texts, args.eval_tokens, teacher=not arms)
    write_report(report(arms, args.reference), args.out)
    if args.plot:
        plot(arms, args.plot)


if __name__ == "__main__":
    main()
