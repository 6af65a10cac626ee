"""Post-prune reconstruction (issue 25 part 2): perplexity right after pruning, no distillation.

Each arm is one `prune_checkpoint` of the embedded teacher (imported once into WORK/teacher) with
the main job's prune settings (64 x 256 calibration tokens of the corpus calib split, the
contiguous 6-layer block search on 4 windows) plus the arm's settings, then held-out perplexity
as the main job measures it (fp32, `--eval-tokens` tokens in windows of 512 spread over the text) on the
corpus's held-out split and the two out-of-corpus texts of `benchmarks/main_job.py`. The teacher's
scores are computed once and reused by every arm (the scores cache).

    .venv/bin/python benchmarks/reconstruction.py [--work runs/reconstruction] [--eval-tokens 8192] \
        [--out FILE] [ARM ...]

ARM is NAME or NAME=JSON (PruneConfig fields; "target" a PruneSpec dict, "calib" CalibConfig fields
over the 64 windows); with none, the sweep
in docs/benchmarks.md runs (`ARMS`). A finished arm's numbers are kept in WORK/results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from main_job import EVAL_PROTOCOL, MAX_TOKENS, SEQ_LEN, write_texts  # noqa: E402
from pruning import write_report  # noqa: E402

DEFAULT = {"ffn_hidden_size": 768, "num_layers": 24}   # the main job's target
WIDTH = {"ffn_hidden_size": 512}                       # the same parameter count, all 30 layers
ARMS = {
    "plain": {},
    "refit, ridge 1e-3": {"reconstruct": True, "reconstruct_ridge": 1e-3},
    "refit, ridge 1e-2": {"reconstruct": True},
    "refit, ridge 1e-1": {"reconstruct": True, "reconstruct_ridge": 1e-1},
    "refit, ridge 1": {"reconstruct": True, "reconstruct_ridge": 1.0},
    "refit + depth, ridge 1e-3": {"reconstruct": True, "reconstruct_depth": True, "reconstruct_ridge": 1e-3},
    "refit + depth, ridge 1e-2 (main job)": {"reconstruct": True, "reconstruct_depth": True},
    # importance and refit on calibration windows of their own (reconstruct_samples)
    "importance 256, refit 64": {"reconstruct": True, "reconstruct_depth": True, "calib": {"num_samples": 256},
                                 "reconstruct_samples": 64},
    "importance 64, refit 256": {"reconstruct": True, "reconstruct_depth": True, "reconstruct_samples": 256},
    "width-only: plain": {"target": WIDTH},
    "width-only: refit, ridge 1e-2": {"target": WIDTH, "reconstruct": True},
}


def perplexities(checkpoint: Path, texts: dict[str, Path], eval_tokens: int) -> dict[str, float]:
    from nemo_minitron.eval.stage import EvalConfig, evaluate_checkpoint

    return {text: evaluate_checkpoint(EvalConfig(checkpoint=str(checkpoint), data=str(path), seq_len=SEQ_LEN,
                                                 max_tokens=eval_tokens))["perplexity"]
            for text, path in texts.items()}


def run_arm(work: Path, name: str, settings: dict, texts: dict[str, Path], eval_tokens: int) -> dict:
    from nemo_minitron.pruning.spec import PruneSpec
    from nemo_minitron.pruning.stage import CalibConfig, PruneConfig, prune_checkpoint
    from nemo_minitron.stage_config import CorpusConfig

    settings = dict(settings)
    output = work / "arms" / name.replace(" ", "_").replace(",", "").replace("/", "-")
    cfg = PruneConfig(checkpoint=str(work / "teacher"), output_dir=str(output),
                      target=PruneSpec(**settings.pop("target", DEFAULT)),
                      calib=CalibConfig(**{"num_samples": 64, **settings.pop("calib", {})}),
                      loss_samples=4, corpus=CorpusConfig(output_dir=str(work / "corpus")), overwrite=True, **settings)
    start = time.perf_counter()
    result = prune_checkpoint(cfg)
    seconds = time.perf_counter() - start
    return {"perplexity": perplexities(output, texts, eval_tokens), "prune_s": round(seconds, 1), "reconstruct_s": result.get("reconstruct_s")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("arms", nargs="*", help="NAME or NAME=JSON (default: the sweep in ARMS)")
    parser.add_argument("--work", default="runs/reconstruction")
    parser.add_argument("--eval-tokens", type=int, default=MAX_TOKENS)
    parser.add_argument("--out", help="also write the Markdown section here")
    args = parser.parse_args()
    from nemo_minitron.convert import ImportConfig, import_checkpoint
    from nemo_minitron.stage_config import CorpusConfig

    work = Path(args.work)
    if not (work / "teacher").is_dir():
        import_checkpoint(ImportConfig(output_dir=str(work / "teacher")))
    texts = {"heldout": CorpusConfig(output_dir=str(work / "corpus")).splits()["heldout"],
             **write_texts(work / "texts")}
    arms = {}
    for item in args.arms or ARMS:
        name, _, settings = item.partition("=")
        arms[name] = json.loads(settings) if settings else ARMS[name]
    saved_file = work / "results.json"
    saved = json.loads(saved_file.read_text()) if saved_file.is_file() else {}
    if (saved.get("eval_tokens"), saved.get("protocol")) != (args.eval_tokens, EVAL_PROTOCOL):
        saved = {"eval_tokens": args.eval_tokens, "protocol": EVAL_PROTOCOL,
                 "teacher": perplexities(work / "teacher", texts, args.eval_tokens)}
    teacher = saved["teacher"]
    for name, settings in arms.items():
        if saved.get(name, {}).get("settings") != settings:
            saved[name] = {"settings": settings, **run_arm(work, name, settings, texts, args.eval_tokens)}
            saved_file.write_text(json.dumps(saved, indent=1) + "\n")
    names = list(texts)
    lines = ["| arm | " + " | ".join(names) + " | reconstruct s |", "| --- |" + " ---: |" * (len(names) + 1),
             "| teacher | " + " | ".join(f"{teacher[t]:.2f}" for t in names) + " | |"]
    for name in arms:
        row = saved[name]
        cells = [f"{row['perplexity'][t]:.1f}" for t in names]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['reconstruct_s'] or '-'} |")
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
