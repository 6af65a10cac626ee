"""The pipeline's results: the final table, report.md and its plots (perplexity by stage, the
distillation curve), linking the prune and search stages' own reports."""

from __future__ import annotations

import json
from pathlib import Path


def table(summary: dict) -> str:
    t, p, s = summary["teacher"], summary["pruned"], summary["student"]
    rows = [
        ("", "teacher", "student"),
        ("parameters (total)", f"{t['parameters']['total']:,}", f"{s['parameters']['total']:,}"),
        ("parameters (non-embedding)", f"{t['parameters']['non_embedding']:,}", f"{s['parameters']['non_embedding']:,}"),
        ("held-out perplexity", f"{t['heldout_perplexity']:.2f}", f"{s['heldout_perplexity']:.2f}"),
        *([("  teacher before correction", f"{t['uncorrected']['heldout_perplexity']:.2f}", "")]
          if "uncorrected" in t else []),
        ("  pruned, before distillation", "", f"{p['heldout_perplexity']:.2f}"),
        ("distillation tokens", "", f"{summary['distillation_tokens']:,}"),
        ("dtype, distillation / evaluation", "", "{distill} / {eval}".format(**summary["dtype"])),
        *[(f"stage {k} (s)", "", f"{v:.1f}") for k, v in summary["stage_seconds"].items()],
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows)


def plot_distillation(metrics: Path, out: Path) -> bool:
    """The distill stage's metrics.jsonl per step: the objective, the student's LM loss on the
    training batches and, where validated, on held-out data (the last two are comparable)."""
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    series = [("train/loss", "-", "objective (distillation loss)"), ("train/lm_loss", "-", "student LM loss, train"),
              ("val/lm_loss", "o", "student LM loss, held-out")]
    points = {key: [(r["step"], r[key]) for r in rows if key in r] for key, _, _ in series}
    if not points["train/loss"]:
        return False
    fig, ax = plt.subplots(figsize=(5, 3))
    for key, style, label in series:
        if points[key]:
            ax.plot(*zip(*points[key]), style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("nats per token")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True


def write_report(work: Path, summary: dict) -> None:
    """report.md: the final table, perplexity by stage as a plot, and the stages' own reports."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = summary["teacher"]
    teachers = ([("teacher\n(uncorrected)", t["uncorrected"], "#8172b2"), ("teacher\n(corrected)", t, "#4c72b0")]
                if "uncorrected" in t else [("teacher", t, "#4c72b0")])
    bars = [*teachers, ("pruned", summary["pruned"], "#c44e52"), ("student", summary["student"], "#55a868")]
    labels, colors = [label for label, _, _ in bars], [color for _, _, color in bars]
    values = [model["heldout_perplexity"] for _, model, _ in bars]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(labels, values, color=colors)
    ax.set_ylabel(f"held-out perplexity (window {summary['eval']['seq_len']})")
    ax.set_yscale("log")
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.1f}", ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(work / "perplexity.png", dpi=100)
    plt.close(fig)
    lines = ["# nemo-minitron pipeline report", "", "```", table(summary), "```", "",
             "![held-out perplexity](perplexity.png)", ""]
    if (work / "pruned" / "report.md").is_file():
        lines += ["## Pruning", "", "See [pruned/report.md](pruned/report.md).", "",
                  "![layer importance](pruned/layer_importance.png)", ""]
    if (work / "search" / "report.md").is_file():
        lines += ["## Architecture search", "", "See [search/report.md](search/report.md).", "",
                  "![loss vs parameters](search/loss_vs_params.png)", ""]
    metrics = work / "distill" / "metrics.jsonl"
    if metrics.is_file():
        lines += ["## Distillation", "", "Per-step metrics: distill/metrics.jsonl (TensorBoard: distill/tensorboard).", ""]
        if plot_distillation(metrics, work / "distillation.png"):
            lines += ["![distillation loss](distillation.png)", ""]
    (work / "report.md").write_text("\n".join(lines))
