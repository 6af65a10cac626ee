"""The search report: results table (JSON + Markdown) and a loss-vs-parameters plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


_HEADINGS = {"num_layers": "layers", "hidden_size": "hidden", "ffn_hidden_size": "ffn", "num_attention_heads": "heads",
             "num_query_groups": "groups", "num_moe_experts": "experts", "moe_ffn_hidden_size": "expert ffn",
             "moe_shared_expert_intermediate_size": "shared ffn"}
_COUNTS = {"total": "params", "non_embedding": "non-emb params", "active": "active params"}


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One row per candidate: its target's keys (a dense or an MoE model's), its parameter counts."""
    keys = [k for k in _HEADINGS if k in rows[0]["arch"]]
    counts = [k for k in _COUNTS if k in rows[0]["parameters"]]
    headings = ["rank", "candidate", *(_HEADINGS[k] for k in keys), *(_COUNTS[k] for k in counts), "budget cost",
                "zero-shot loss", "retrained loss"]
    lines = ["| " + " | ".join(headings) + " |", "|" + " --- |" * len(headings)]
    for r in rows:
        cells = [r["rank"], r["name"], *(r["arch"][k] for k in keys), *(f"{r['parameters'][k]:,}" for k in counts),
                 f"{r['cost']:.4g}", _fmt(r.get("zero_shot_loss")), _fmt(r.get("retrained_loss"))]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: Path, winner: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label, marker in (("zero_shot_loss", "zero-shot (pruned)", "o"), ("retrained_loss", "retrained", "s")):
        pts = [(r["parameters"]["total"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.scatter(*zip(*pts), label=label, marker=marker)
    best = next(r for r in rows if r["name"] == winner)
    y = best.get("retrained_loss", best.get("zero_shot_loss"))
    if y is not None:
        ax.annotate(winner, (best["parameters"]["total"], y), fontsize=7)
    ax.set_xlabel("parameters (total)")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


REPORT_FILES = ("report.json", "report.md", "loss_vs_params.png")


def write_report(output: Path, report: dict[str, Any]) -> dict[str, str]:
    """report.json, report.md, loss_vs_params.png under `output`."""
    rows, winner = report["candidates"], report["winner"]["name"]
    (output / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    _plot(rows, output / "loss_vs_params.png", winner)
    b = report["budget"]
    md = ["# minitron search report", "",
          f"Teacher: `{report['teacher']}` ({report['teacher_parameters']['total']:,} parameters). "
          f"Budget: {b['kind']} = {b['value']:.4g} +- {b['tolerance']:.0%}. "
          f"{report['enumerated']} architectures on the grid fit it; {len(rows)} scored zero-shot, "
          f"{sum(r.get('retrained_loss') is not None for r in rows)} retrained "
          f"({report['retrain_steps']} distillation steps each).", "",
          f"Winner: **{winner}** -> `{report['winner']['checkpoint']}`", "",
          markdown_table(rows), "", "![loss vs parameters](loss_vs_params.png)", ""]
    (output / "report.md").write_text("\n".join(md))
    return {k: str(output / k) for k in REPORT_FILES}
