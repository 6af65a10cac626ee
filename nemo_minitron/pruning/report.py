"""The prune report: report.json, report.md and PNG plots of layer and head importance."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from nemo_minitron.importance.scores import ImportanceScores
from nemo_minitron.models.config import SHAPE_KEYS
from nemo_minitron.pruning.indices import PruneIndices



def _plot_layers(path: Path, scores: ImportanceScores, dropped: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = dict(scores.layers)
    series |= {f"loss without layers [i, i+{k})": values for k, values in scores.blocks.items()}
    fig, axes = plt.subplots(len(series), 1, figsize=(max(6, 0.3 * scores.arch.num_layers), 2.4 * len(series)),
                             squeeze=False)
    for ax, (name, values) in zip(axes[:, 0], series.items()):
        colors = ["tab:red" if i in dropped else "tab:blue" for i in range(len(values))]
        if name.startswith("loss without"):
            colors = "tab:gray"
        ax.bar(range(len(values)), values.tolist(), color=colors)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("layer (start of block)" if name.startswith("loss without") else "layer")
    fig.suptitle("layer importance (red: dropped)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_heads(path: Path, scores: ImportanceScores, indices: PruneIndices) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = scores.heads.float()
    # Scores grow with depth; per-layer scaling shows the ranking that pruning uses.
    heads = heads / heads.amax(dim=1, keepdim=True).clamp(min=1e-12)
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * heads.shape[1] + 2), max(3, 0.22 * heads.shape[0] + 1)))
    image = ax.imshow(heads.numpy(), aspect="auto", cmap="viridis")
    for layer in range(heads.shape[0]):
        kept = set(indices.heads[layer].flatten().tolist()) if layer in indices.heads else set()
        for head in range(heads.shape[1]):
            if head not in kept:
                ax.text(head, layer, "x", ha="center", va="center", color="white", fontsize=7)
    per_group = scores.arch.num_attention_heads // scores.arch.num_query_groups
    for boundary in range(per_group, heads.shape[1], per_group):
        ax.axvline(boundary - 0.5, color="white", linewidth=0.8)
    ax.set_xlabel("head (query groups separated)")
    ax.set_ylabel("layer")
    ax.set_title(f"head importance / layer max ({scores.method}; x: pruned)", fontsize=10)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _markdown(report: dict[str, Any]) -> str:
    t, s = report["architecture"]["teacher"], report["architecture"]["student"]
    lines = ["# Prune report", "", f"- teacher: `{report['teacher']}`", f"- output: `{report['output']}`",
             f"- importance: {report['importance']['method']}", f"- depth method: {report['depth']['method']}",
             f"- dropped layers: {report['depth']['dropped_layers'] or 'none'}", "",
             "| | teacher | pruned |", "| --- | ---: | ---: |"]
    lines += [f"| {k} | {t[k]} | {s[k]} |" for k in SHAPE_KEYS]
    for kind in ("total", "non_embedding"):
        lines.append(f"| parameters ({kind}) | {t['parameters'][kind]:,} | {s['parameters'][kind]:,} |")
    if "loss" in report:
        lines.append(f"| LM loss ({report['loss']['windows']} calibration windows) | {report['loss']['teacher']:.4f} | "
                     f"{report['loss']['pruned']:.4f} |")
    layer_scores = report["depth"]["layer_scores"]
    if layer_scores:
        names = list(layer_scores)
        lines += ["", "## Per-layer depth scores (higher = more important)", "",
                  "| layer | " + " | ".join(names) + " | dropped |", "| ---: |" + " ---: |" * len(names) + " :---: |"]
        dropped = set(report["depth"]["dropped_layers"])
        for i in range(t["num_layers"]):
            row = " | ".join(f"{layer_scores[n][i]:.4g}" for n in names)
            lines.append(f"| {i} | {row} | {'x' if i in dropped else ''} |")
    for k, values in report["depth"].get("block_losses", {}).items():
        best = min(range(len(values)), key=values.__getitem__)
        lines += ["", f"Contiguous blocks of {k} layers: the lowest loss {values[best]:.4f} drops layers "
                  f"{best}-{best + int(k) - 1}."]
    bridges = report.get("reconstruction", {}).get("bridges")
    if bridges:
        lines += ["", f"## Depth bridges (LM loss on {bridges['windows']} calibration windows)", "",
                  "| MLP of layer | bridges layers | loss with | loss without | kept |", "| ---: | --- | ---: | ---: | :---: |"]
        lines += [f"| {b['layer']} | {b['dropped'][0]}-{b['dropped'][1]} | {b['loss_with']:.4f} | {b['loss_without']:.4f} "
                  f"| {'yes' if b['kept'] else 'no'} |" for b in bridges["checks"]]
    lines += ["", "![layer importance](layer_importance.png)", "", "![head importance](head_importance.png)", ""]
    return "\n".join(lines)


REPORT_FILES = {"json": "report.json", "markdown": "report.md", "layer_plot": "layer_importance.png",
                "head_plot": "head_importance.png"}


def write_report(
    out_dir: Path, report: dict[str, Any], scores: ImportanceScores, indices: PruneIndices
) -> dict[str, str]:
    """Write report.json, report.md, layer_importance.png, head_importance.png into `out_dir`."""
    out_dir = Path(out_dir)
    dropped = report["depth"]["dropped_layers"]
    files = {kind: out_dir / name for kind, name in REPORT_FILES.items()}
    files["json"].write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
    files["markdown"].write_text(_markdown(report))
    _plot_layers(files["layer_plot"], scores, dropped)
    _plot_heads(files["head_plot"], scores, indices)
    return {k: str(v) for k, v in files.items()}


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)
