"""Peers side by side (issue 15 part 4): the embedded teacher (SmolLM2-135M) pruned to the same width
targets by our importance methods, by torch-pruning 1.6.1 (LLM-Pruner's group Taylor criterion and
group weight magnitude) and by NVIDIA Model Optimizer's `mcore_minitron`, all on the same calibration
windows; then every pruned model distilled from the teacher for the same short budget. Held-out
perplexity before and after, as a Markdown table and a plot (docs/peers.png).

Set-up, outside .venv (torch-pruning needs only torch and numpy, which .venv has; Model Optimizer
wants Transformer Engine, which has no CPU build, from 0.44 on, so 0.43.0 with megatron-core 0.16.1):

    .venv/bin/pip install --no-deps --target /tmp/torch-pruning torch-pruning==1.6.1
    python3.11 -m venv /tmp/modelopt-venv && /tmp/modelopt-venv/bin/pip install torch==2.13.0 \
        megatron-core==0.16.1 nvidia-modelopt==0.43.0 transformers==5.24.0 requests

Run (about 45 minutes on 2 quiet cores; 95 under other jobs):

    .venv/bin/python benchmarks/peers.py --torch-pruning /tmp/torch-pruning \
        --modelopt-python /tmp/modelopt-venv/bin/python [--steps 40] [--out FILE]

How each peer is run:
- torch-pruning: its `DependencyGraph` is built on the transformers model of the teacher; the LM loss
  over the calibration windows is back-propagated (gradients accumulated over micro-batches, as
  LLM-Pruner does), and `GroupTaylorImportance()` / `GroupMagnitudeImportance()` (defaults: mean over
  the group's layers, mean-normalised) score the group of each layer's `gate_proj` output channels
  (the neurons, with their up rows and down columns) and the group of the embedding's channels (the
  hidden size, with every layer that reads or writes it). Our surgery then keeps the top-scoring units
  per group, as torch-pruning's `MetaPruner` does with a uniform ratio, so only the criterion differs.
- Model Optimizer: `mtp.prune(model, mode=mcore_minitron, constraints={"export_config": ...})` prunes
  our megatron `GPTModel` (local layer spec) in a subprocess in its own venv, with the same
  calibration forward loop; its pruned weights come back as a global state dict. Its megatron plugin
  has dynamic modules for Transformer Engine's and apex's norms only, and megatron's local spec on a
  machine without apex builds `torch.nn.RMSNorm`: the subprocess registers that class with Model
  Optimizer's own dynamic LayerNorm (weight and normalized_shape cut to the active channels), the
  one addition needed. Hidden and FFN divisors are set to 64 (defaults 256 / 512 admit neither target).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TARGETS = {
    "A": {"ffn_hidden_size": 768},
    "B": {"ffn_hidden_size": 1024, "hidden_size": 448},
}
ARMS = ("ours: activation", "ours: taylor", "ours: magnitude", "torch-pruning: GroupTaylorImportance",
        "torch-pruning: GroupMagnitudeImportance", "ModelOpt: mcore_minitron")


# --- Model Optimizer, in its own venv ----------------------------------------------------------------

def modelopt_worker(work: Path) -> None:
    """Prune the teacher in `work/teacher.pt` to every target with `mcore_minitron` on the windows in
    `work/calib.pt`; write `work/modelopt_<target>.pt` (global state dict, seconds)."""
    import modelopt.torch.prune as mtp
    from modelopt.torch.nas.modules.norm import _DynamicLayerNorm
    from modelopt.torch.nas.registry import DMRegistry
    from modelopt.torch.prune.plugins.mcore_minitron import get_mcore_minitron_config

    from nemo_minitron import parallel
    from nemo_minitron.importance import perplexity_loop
    from nemo_minitron.models import bridge
    from nemo_minitron.models.config import ModelArch
    from nemo_minitron.models.gpt import arch_of, build_gpt_model

    @DMRegistry.register({torch.nn.RMSNorm: "torch.nn.RMSNorm"})
    class _DynamicRMSNorm(_DynamicLayerNorm):
        def _setup(self, *, num_features):
            self._register_hparam("num_features", num_features)
            self._register_dynamic_attribute("weight", self._cut_to_active_features)
            self._register_dynamic_attribute("normalized_shape", self._get_normalized_shape)

    torch.set_num_threads(os.cpu_count() or 1)
    parallel.initialize()
    saved = torch.load(work / "teacher.pt", weights_only=True)
    arch, calib = ModelArch.from_dict(saved["arch"]), torch.load(work / "calib.pt", weights_only=True)
    config = get_mcore_minitron_config(hidden_size_divisor=64, ffn_hidden_size_divisor=64)
    for name, target in TARGETS.items():
        model = build_gpt_model(arch)
        bridge.load_global(model, saved["weights"])
        start = time.perf_counter()
        mtp.prune(model, mode=[("mcore_minitron", config)], constraints={"export_config": dict(target)},
                  dummy_input=None, config={"forward_loop": perplexity_loop(calib, progress=False)})
        seconds = time.perf_counter() - start
        pruned = arch_of(model)
        assert all(getattr(pruned, key) == value for key, value in target.items()), pruned
        torch.save({"weights": bridge.gather_global(model), "seconds": seconds}, work / f"modelopt_{name}.pt")


def modelopt_students(python: str, work: Path, arch, teacher_sd, calib) -> dict[str, dict]:
    torch.save({"arch": dataclasses.asdict(arch), "weights": teacher_sd}, work / "teacher.pt")
    torch.save(calib, work / "calib.pt")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([python, __file__, "--modelopt-worker", str(work)], env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"Model Optimizer run failed:\n{proc.stderr[-4000:]}")
    return {name: torch.load(work / f"modelopt_{name}.pt", weights_only=True) for name in TARGETS}


# --- torch-pruning on the transformers model ---------------------------------------------------------

def torch_pruning_scores(arch, teacher_sd, calib: torch.Tensor, micro_batch_size: int) -> dict[str, dict]:
    """{"taylor" | "magnitude": {"hidden": [h], "neurons": [L, ffn], "seconds": s}} from torch-pruning's
    group importances on the transformers model of the teacher."""
    import torch_pruning as tp
    from transformers import AutoModelForCausalLM

    from nemo_minitron.models import bridge
    from nemo_minitron.models.hf_config import to_hf

    hf = AutoModelForCausalLM.from_config(to_hf(arch), dtype=torch.float32)
    hf.load_state_dict(bridge.global_to_hf(arch, teacher_sd), strict=False)
    hf.tie_weights()
    start = time.perf_counter()
    graph = tp.DependencyGraph().build_dependency(hf, example_inputs=calib[:1, :-1],
                                                  output_transform=lambda out: out.logits)
    hidden_group = graph.get_pruning_group(hf.model.embed_tokens, tp.prune_embedding_out_channels,
                                           idxs=list(range(arch.hidden_size)))
    neuron_groups = [graph.get_pruning_group(layer.mlp.gate_proj, tp.prune_linear_out_channels,
                                             idxs=list(range(arch.ffn_hidden_size))) for layer in hf.model.layers]
    graph_seconds = time.perf_counter() - start
    result = {}
    for name, importance in (("magnitude", tp.importance.GroupMagnitudeImportance()),
                             ("taylor", tp.importance.GroupTaylorImportance())):
        start = time.perf_counter()
        if name == "taylor":
            hf.zero_grad()
            batches = calib.split(micro_batch_size)
            for batch in batches:
                logits = hf(batch[:, :-1], use_cache=False).logits
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
                (loss / len(batches)).backward()
        with torch.no_grad():
            result[name] = {"hidden": importance(hidden_group).float(),
                            "neurons": torch.stack([importance(g).float() for g in neuron_groups]),
                            "seconds": graph_seconds + time.perf_counter() - start}
    return result


# --- the benchmark ----------------------------------------------------------------------------------

def token_windows_from(path: Path, tokenizer, seq_len: int, tokens: int, seed: int):
    """TokenWindows over documents drawn (seeded) from the whole jsonl file until `tokens` are there."""
    from nemo_minitron.train import TokenWindows

    lines = path.read_text().splitlines()
    ids: list[int] = []
    for i in np.random.default_rng(seed).permutation(len(lines)):
        if len(ids) > tokens:
            break
        ids += tokenizer(json.loads(lines[i])["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return TokenWindows(np.array(ids), seq_len, seed=seed)


def distilled(teacher, student, data, args, out: Path):
    from nemo_minitron.distill import DistillationLoss, DistillationModel, LogitLoss
    from nemo_minitron.train import OptimConfig, TrainConfig, Trainer, TrainingData

    torch.manual_seed(0)
    trainer = Trainer(DistillationModel(student, teacher), DistillationLoss(LogitLoss("fwd_kl")),
                      TrainingData(data, None),
                      TrainConfig(steps=args.steps, global_batch_size=args.batch, seq_length=args.seq,
                                  micro_batch_size=args.batch),
                      OptimConfig(lr=args.lr, min_lr=args.lr / 10, warmup_steps=max(1, args.steps // 10),
                                  weight_decay=0.0), out, export_model=student)
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step()
    return time.perf_counter() - start


def describe(target_name: str, arch) -> str:
    """The target as the table and the plot name it, e.g. "A: ffn_hidden_size 1536 -> 768"."""
    return f"{target_name}: " + ", ".join(f"{k} {getattr(arch, k)} -> {v}" for k, v in TARGETS[target_name].items())


def plot(rows: list[dict], teacher_ppl: float, path: Path, title: str, arch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TARGETS), figsize=(12, 4.6), sharey=True)
    for ax, name in zip(axes, TARGETS):
        mine = [r for r in rows if r["target"] == name]
        x = np.arange(len(mine))
        ax.bar(x - 0.2, [r["before"] for r in mine], 0.4, label="pruned")
        ax.bar(x + 0.2, [r["after"] for r in mine], 0.4, label="pruned + distilled")
        ax.axhline(teacher_ppl, color="gray", linestyle="--", label="teacher")
        ax.set_xticks(x, [r["arm"].replace(": ", ":\n") for r in mine], fontsize=7, rotation=30, ha="right")
        ax.set_yscale("log")
        ax.set_title(describe(name, arch), fontsize=9)
    axes[0].set_ylabel("held-out perplexity")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--torch-pruning", help="directory holding the torch_pruning package (required)")
    parser.add_argument("--modelopt-python", help="python of the venv with nvidia-modelopt 0.43.0 (required)")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--heldout-windows", type=int, default=32)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--work", default="/tmp/peers-bench")
    parser.add_argument("--plot", default=str(DOCS / "peers.png"))
    parser.add_argument("--out", default=None, help="also write the Markdown section here")
    parser.add_argument("--modelopt-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.modelopt_worker:
        modelopt_worker(Path(args.modelopt_worker))
        return
    if not (args.torch_pruning and args.modelopt_python):
        parser.error("--torch-pruning and --modelopt-python are required (set-up in the module docstring)")
    sys.path.append(args.torch_pruning)

    from nemo_minitron import parallel
    from nemo_minitron.convert import read_source
    from nemo_minitron.data.indexed import load_token_stream
    from nemo_minitron.eval.perplexity import evaluate_perplexity
    from nemo_minitron.importance import (
        estimate_importance, estimate_taylor_importance, magnitude_scores, perplexity_loop, sample_windows,
    )
    from nemo_minitron.models import bridge
    from nemo_minitron.models.gpt import build_gpt_model
    from nemo_minitron.pruning import PruneSpec, prune_model, select_indices
    from nemo_minitron.stage_config import CorpusConfig

    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    parallel.initialize()
    arch, hf_state, tokenizer, _ = read_source("smollm2-135m", None, torch.float32)
    teacher_sd = bridge.hf_to_global(arch, hf_state)
    teacher = build_gpt_model(arch)
    bridge.load_global(teacher, teacher_sd)
    splits = CorpusConfig().splits()
    calib = sample_windows(load_token_stream(splits["calib"], tokenizer), args.seq, args.calib_samples, seed=0)
    heldout = sample_windows(load_token_stream(splits["heldout"], tokenizer), args.seq, args.heldout_windows, seed=0)
    train = token_windows_from(splits["train"], tokenizer, args.seq, (args.steps * args.batch + 1) * (args.seq + 1), 0)

    def ppl(model) -> float:
        return evaluate_perplexity(model, heldout, 4, progress=False).perplexity

    teacher_ppl = ppl(teacher)
    seconds: dict[str, float] = {}

    def timed(name, fn):
        start = time.perf_counter()
        value = fn()
        seconds[name] = time.perf_counter() - start
        print(f"{name}: {seconds[name]:.0f} s", flush=True)
        return value

    ours = {
        "ours: activation": timed("ours: activation", lambda: estimate_importance(
            teacher, perplexity_loop(calib, progress=False))),
        "ours: taylor": timed("ours: taylor", lambda: estimate_taylor_importance(teacher, calib)),
        "ours: magnitude": timed("ours: magnitude", lambda: magnitude_scores(arch, teacher_sd)),
    }
    peer = torch_pruning_scores(arch, teacher_sd, calib, 4)
    scores = dict(ours)
    for name, label in (("taylor", "torch-pruning: GroupTaylorImportance"),
                        ("magnitude", "torch-pruning: GroupMagnitudeImportance")):
        seconds[label] = peer[name]["seconds"]
        # heads are not pruned by these targets: every head is kept whatever its score
        scores[label] = ours["ours: magnitude"].with_updates(method=label, hidden=peer[name]["hidden"],
                                                               neurons=peer[name]["neurons"])
    modelopt = modelopt_students(args.modelopt_python, work, arch, teacher_sd, calib)
    rows = []
    for target_name, target_keys in TARGETS.items():
        target = PruneSpec(**target_keys).target_arch(arch)
        for arm in ARMS:
            if arm.startswith("ModelOpt"):
                student = build_gpt_model(target)
                bridge.load_global(student, modelopt[target_name]["weights"])
                seconds.setdefault(arm, modelopt[target_name]["seconds"])
            else:
                student = prune_model(teacher, target, select_indices(scores[arm], arch, target, []))
            before = ppl(student)
            train_s = distilled(teacher, student, train, args, work / f"{target_name}-{len(rows)}")
            rows.append({"target": target_name, "arm": arm, "before": before, "after": ppl(student),
                         "distill_s": train_s})
            print(rows[-1], flush=True)
            del student
    (work / "results.json").write_text(json.dumps({"teacher": teacher_ppl, "rows": rows, "seconds": seconds},
                                                  indent=2))
    tokens = args.steps * args.batch * args.seq
    plot(rows, teacher_ppl, Path(args.plot),
         f"SmolLM2-135M: {args.calib_samples} x {args.seq} calibration tokens; distilled {args.steps} steps x "
         f"{args.batch} x {args.seq} tokens (forward KL)", arch)
    lines = [
        "### Peers side by side (benchmarks/peers.py)", "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, fp32. Command: "
        f"`.venv/bin/python benchmarks/peers.py --torch-pruning /tmp/torch-pruning --modelopt-python "
        f"/tmp/modelopt-venv/bin/python --steps {args.steps} --batch {args.batch} --seq {args.seq} --lr {args.lr:g}`. "
        f"Calibration: {len(calib)} windows x {args.seq} tokens of the corpus calib split, the same for every "
        f"method; held-out perplexity on {len(heldout)} windows x {args.seq} tokens of the heldout split "
        f"(teacher {teacher_ppl:.2f}); distillation: {args.steps} steps x {args.batch} x {args.seq} tokens "
        f"({tokens:,}) of the train split, forward KL, lr {args.lr:g}, the same data and seed for every arm.", "",
        "| target | method | importance time | perplexity pruned | after distillation |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {describe(r['target'], arch)} | {r['arm']} | {seconds[r['arm']]:.0f} s | {r['before']:,.1f} | "
                     f"{r['after']:,.1f} |")
    from pruning import write_report  # benchmarks/pruning.py (here: the ModelOpt worker never reaches it)

    write_report(lines, args.out)


if __name__ == "__main__":
    main()
