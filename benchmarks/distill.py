"""Distillation benchmarks (issue 4): step-time overhead, logit-loss memory, recovery curves.

    .venv/bin/python benchmarks/distill.py [--steps 60] [--seq 128] [--batch 4] [--eval-every 10]

1. Step time of a distillation step against the teacher forward and a student LM training step
   timed separately on the same batch (target: within 10% of their sum).
2. Peak memory (RSS above the inputs, fresh process per case) of the chunked vocab-parallel logit
   loss against the naive full-softmax definition, forward + backward, at vocab 49152 and 128256.
3. Held-out perplexity against training tokens for distillation, LM-loss retraining and training
   from random initialisation of the embedded teacher (SmolLM2-135M) depth-pruned to 15 of 30
   layers; plot written to docs/distillation_curves.png.
4. Mixed precision (issue 15): the same distillation in fp32 and in bf16 (fp32 main weights), their
   steps interleaved in one process: tokens/s, held-out perplexity after equal tokens, and the
   achieved FLOP/s of a step against this machine's matmul peak at that dtype, measured in the
   same run (`--parts precision`), with a profile of where a step's time goes.
5. The offline teacher (issue 15, `--parts cache`): the bf16 teacher's top-256 logits over the run's
   samples written once (`write_teacher_cache`), then distillation from the cache with k = 16, 64
   and 256 (forward KL over the top k + tail bucket) against online full-vocabulary KL, their steps
   interleaved in one process: storage per token, step time, held-out perplexity after equal
   tokens; and the peak memory (RSS) of a few steps of each in a fresh process
   (`--cache-memory-case`), teacher on the ranks or not.

FLOPs of a distillation step, counted analytically (`distill_step_flops`): per token, a model's
forward pass costs 2 x its matmul weights (per layer QKV h x (n_q + 2 n_kv) d, attention output
n_q d x h, MLP 3 (SwiGLU) or 2 x h x f; plus the output layer V x h) plus attention 2 x 2 x s x n_q d
per layer (QK^T and the weighted sum of V over the whole window of s tokens: megatron's unfused
attention computes the masked half too); a backward pass costs two forwards (gradients of inputs
and of weights). A step = tokens x (teacher forward + 3 x student forward). Elementwise work
(norms, activations, softmax, the logit loss, Adam) is not counted.

Prints a Markdown section for docs/distillation.md and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

KEEP = list(range(6)) + list(range(21, 30))  # drop the contiguous block 6..20 (15 of 30 layers)
DOCS = Path(__file__).resolve().parents[1] / "docs"


# --- 2. memory of the logit loss (one case per fresh process) ----------------------------------------

def memory_case(impl: str, vocab: int, tokens: int, chunk: int) -> dict:
    from nemo_minitron import parallel
    from nemo_minitron.distill.losses import LogitLoss, logit_losses, reference_logit_losses

    parallel.initialize(1, 1)
    g = torch.Generator().manual_seed(0)
    student = torch.randn(1, tokens, vocab, generator=g).requires_grad_(True)
    teacher = torch.randn(1, tokens, vocab, generator=g)
    labels = torch.randint(0, vocab, (1, tokens), generator=g)
    rss_kib = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # noqa: E731 (peak, KiB)
    before = rss_kib()
    start = time.perf_counter()
    spec = LogitLoss("fwd_kl")
    if impl == "chunked":
        out = logit_losses(student, teacher, labels, None, spec, chunk_tokens=chunk)
    else:
        out = reference_logit_losses(student, teacher, labels, None, spec)
    out["objective"].backward()
    seconds = time.perf_counter() - start
    logits_mib = tokens * vocab * 4 / 2**20
    return {"impl": impl, "vocab": vocab, "tokens": tokens, "chunk": chunk, "logits_mib": logits_mib,
            "peak_above_inputs_mib": (rss_kib() - before) / 1024, "seconds": seconds}


def memory_table(tokens: int) -> list[str]:
    rows = [f"| vocab | logits (fp32, one tensor) | naive full softmax | ours, one chunk of {tokens} | ours, 512-token "
            "chunks | ours, 128-token chunks (default) |",
            "| --- | --- | --- | --- | --- | --- |"]
    for vocab in (49152, 128256):
        cases = [("naive", 0), ("chunked", tokens), ("chunked", 512), ("chunked", 128)]
        found = []
        for impl, chunk in cases:
            out = subprocess.run([sys.executable, __file__, "--memory-case", impl, str(vocab), str(tokens), str(chunk)],
                                 capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            found.append(json.loads(out.stdout.strip().splitlines()[-1]))
        cells = [f"{c['peak_above_inputs_mib']:,.0f} MiB ({c['seconds']:.1f} s)" for c in found]
        rows.append(f"| {vocab:,} | {found[0]['logits_mib']:,.0f} MiB | " + " | ".join(cells) + " |")
    return rows


# --- shared set-up: embedded teacher, pruned student, Austen text ----------------------------------

def setup(seq: int, train_windows: int):
    from nemo_minitron import parallel
    from nemo_minitron.convert import read_source
    from nemo_minitron.data.corpus import load_documents
    from nemo_minitron.eval.perplexity import windows_from_stream
    from nemo_minitron.models import bridge
    from nemo_minitron.models.gpt import build_gpt_model
    from nemo_minitron.pruning.indices import PruneIndices
    from nemo_minitron.pruning.surgery import prune_global
    from nemo_minitron.train import TokenWindows

    parallel.initialize(1, 1)
    arch, hf_state, tokenizer, _ = read_source("smollm2-135m", None, torch.float32)
    teacher_sd = bridge.hf_to_global(arch, hf_state)
    teacher = build_gpt_model(arch)
    bridge.load_global(teacher, teacher_sd)
    student_arch = arch.replace(num_layers=len(KEEP))
    groups, per_group = arch.num_query_groups, arch.num_attention_heads // arch.num_query_groups
    depth_only = PruneIndices(
        hidden=torch.arange(arch.hidden_size), layers=KEEP,
        heads={i: torch.arange(arch.num_attention_heads).view(groups, per_group) for i in KEEP},
        neurons={i: torch.arange(arch.ffn_hidden_size) for i in KEEP},
    )
    pruned_sd = prune_global(teacher_sd, arch, student_arch, depth_only)
    docs = load_documents("austen")

    def stream(prefixes: tuple[str, ...], max_tokens: int) -> np.ndarray:
        ids: list[int] = []
        for doc in docs:
            if doc.doc_id.startswith(prefixes) and len(ids) < max_tokens:
                ids += tokenizer(doc.text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return np.array(ids)

    train = TokenWindows(stream(("austen/emma/", "austen/prideprejudice/"), (train_windows + 1) * seq + 1), seq, seed=0)
    heldout = windows_from_stream(stream(("austen/persuasion/",), 64 * seq), seq, 32 * seq)
    return teacher, student_arch, pruned_sd, train, heldout


def student(arch, global_sd, dtype: torch.dtype = torch.float32):
    from nemo_minitron.models import bridge
    from nemo_minitron.models.gpt import build_gpt_model

    torch.manual_seed(0)
    model = build_gpt_model(arch, dtype)
    if global_sd is not None:
        bridge.load_global(model, global_sd)
    return model


def trainer_for(kind: str, teacher, model, data, steps: int, seq: int, batch: int, lr: float, out: Path,
                top_k: int | None = None):
    """kind: distill (teacher beside the student), cached (`data` from a teacher cache; forward KL
    over the top `top_k` + tail) or lm."""
    from nemo_minitron.distill import DistillationLoss, DistillationModel, LogitLoss
    from nemo_minitron.train import LMLoss, OptimConfig, TrainConfig, Trainer

    if kind == "lm":
        module, loss = model, LMLoss()
    else:
        module = DistillationModel(model, teacher) if kind == "distill" else model
        loss = DistillationLoss(LogitLoss("fwd_kl", top_k=top_k))
    return Trainer(module, loss, data,
                   TrainConfig(steps=steps, global_batch_size=batch, seq_length=seq, micro_batch_size=batch),
                   OptimConfig(lr=lr, min_lr=lr / 10, warmup_steps=max(1, steps // 20), weight_decay=0.0), out,
                   export_model=model)


# --- 1. step time ------------------------------------------------------------------------------------

def step_times(teacher, arch, pruned_sd, train, seq: int, batch: int, repeats: int, out: Path) -> dict:
    from nemo_minitron.models.runner import forward_microbatches
    from nemo_minitron.train import TrainingData
    from nemo_minitron.train.data import micro_batches

    data = TrainingData(train, None)
    distill = trainer_for("distill", teacher, student(arch, pruned_sd), data, repeats + 1, seq, batch, 1e-4, out / "d")
    lm = trainer_for("lm", teacher, student(arch, pruned_sd), data, repeats + 1, seq, batch, 1e-4, out / "l")
    batches = micro_batches(train, 0, batch, batch, 1, 0)

    def teacher_forward() -> float:
        start = time.perf_counter()
        forward_microbatches(teacher, batches, lambda logits, mb: logits.sum())
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"teacher_forward": [], "student_lm_step": [], "distill_step": []}
    for i in range(repeats + 1):  # the first round warms up; every round sees the same batch
        distill.step = lm.step = 0
        t = teacher_forward()
        s = lm.train_step()["train/step_seconds"]
        d = distill.train_step()["train/step_seconds"]
        if i:
            times["teacher_forward"].append(t)
            times["student_lm_step"].append(s)
            times["distill_step"].append(d)
    median = {k: statistics.median(v) for k, v in times.items()}
    median["overhead"] = median["distill_step"] / (median["teacher_forward"] + median["student_lm_step"]) - 1
    return median


# --- 3. recovery curves ------------------------------------------------------------------------------

def curves(teacher, arch, pruned_sd, train, heldout, steps: int, seq: int, batch: int, lr: float,
           eval_every: int, out: Path) -> dict:
    from nemo_minitron.eval.perplexity import evaluate_perplexity
    from nemo_minitron.train import TrainingData

    data = TrainingData(train, None)
    ppl = lambda m: evaluate_perplexity(m, heldout, micro_batch_size=8, progress=False).perplexity  # noqa: E731
    result = {"teacher": ppl(teacher), "runs": {}}
    for kind in ("distill", "lm", "scratch"):
        model = student(arch, None if kind == "scratch" else pruned_sd)
        trainer = trainer_for("distill" if kind == "distill" else "lm", teacher, model, data, steps, seq, batch, lr,
                              out / kind)
        points = [(0, ppl(model))]
        start = time.perf_counter()
        for step in range(1, steps + 1):
            trainer.train_step()
            if step % eval_every == 0 or step == steps:
                points.append((step * batch * seq, ppl(model)))
                print(f"{kind} step {step}: perplexity {points[-1][1]:.1f}", file=sys.stderr, flush=True)
        result["runs"][kind] = {"points": points, "train_seconds": time.perf_counter() - start}
    return result


# --- 4. mixed precision and the physical limit -------------------------------------------------------

def matmul_weights(arch) -> int:
    """Weights a token meets in matrix multiplications (the input embedding is a lookup)."""
    h, d, f = arch.hidden_size, arch.kv_channels, arch.ffn_hidden_size
    per_layer = (arch.num_attention_heads + 2 * arch.num_query_groups) * d * h + arch.num_attention_heads * d * h
    per_layer += (3 if arch.gated else 2) * h * f
    return arch.num_layers * per_layer + arch.vocab_size * h


def forward_flops_per_token(arch, seq: int) -> int:
    """2 x matmul weights + 2 x 2 x s x n_q d per layer (QK^T and attention x V over s tokens)."""
    return 2 * matmul_weights(arch) + arch.num_layers * 4 * seq * arch.num_attention_heads * arch.kv_channels


def distill_step_flops(teacher_arch, student_arch, tokens: int, seq: int) -> int:
    """Teacher forward + student forward and backward (2 forwards) over `tokens` (module docstring)."""
    return tokens * (forward_flops_per_token(teacher_arch, seq) + 3 * forward_flops_per_token(student_arch, seq))


def wall_and_cpu(fn) -> tuple[Any, float, float]:
    """fn()'s result, its wall seconds and the CPU seconds of this process (all threads). CPU time
    runs only while the process does, so other jobs sharing the cores do not dilute it."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def matmul_peak(dtype: torch.dtype, n: int = 4096) -> tuple[float, float]:
    """FLOP per wall second and per CPU second of one n x n x n torch.matmul at `dtype` (after a
    warm-up): this machine's practical peak."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    _, wall, cpu = wall_and_cpu(lambda: a @ b)
    return 2 * n**3 / wall, 2 * n**3 / cpu


def adam_step_seconds(model, fused: bool, repeats: int = 3) -> float:
    """Best wall seconds of one torch AdamW step over fp32 copies of `model`'s weights (random
    gradients): megatron's CPU fallback as built (`fused=False`) or fused (train/optim.py)."""
    params = [torch.nn.Parameter(p.detach().float()) for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    adam = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)
    adam.step()
    return min(wall_and_cpu(adam.step)[1] for _ in range(repeats))


MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


def time_by_kind(trainer) -> dict[str, float]:
    """Seconds of one training step by kind of work, from torch.profiler's per-op self times: the
    logit loss (`_ChunkedLogitLoss`), Adam (torch's optimizer step), matmuls elsewhere, the rest."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.train_step()
    seconds = dict.fromkeys(("matmuls", "logit loss", "Adam", "other"), 0.0)
    for event in prof.events():
        ancestors, parent = set(), event.cpu_parent
        while parent is not None:
            ancestors.add(parent.name)
            parent = parent.cpu_parent
        if "_ChunkedLogitLoss" in ancestors | {event.name}:
            kind = "logit loss"
        elif any(name.startswith("Optimizer.step") for name in ancestors | {event.name}):
            kind = "Adam"
        else:
            kind = "matmuls" if event.name in MATMUL_OPS else "other"
        seconds[kind] += event.self_cpu_time_total / 1e6
    return seconds


def precision(teacher, arch, pruned_sd, train, heldout, steps: int, seq: int, batch: int, lr: float,
              peak_every: int, out: Path) -> dict:
    """Distill the same student from the same teacher in fp32 and in bf16, one step of each in turn."""
    from nemo_minitron.eval.perplexity import evaluate_perplexity
    from nemo_minitron.models import bridge
    from nemo_minitron.models.gpt import arch_of, build_gpt_model
    from nemo_minitron.train import TrainingData

    teacher_arch, teacher_sd = arch_of(teacher), bridge.gather_global(teacher)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    teachers, trainers = {}, {}
    for name, dtype in dtypes.items():
        teachers[name] = build_gpt_model(teacher_arch, dtype)
        bridge.load_global(teachers[name], teacher_sd)
        trainers[name] = trainer_for("distill", teachers[name], student(arch, pruned_sd, dtype),
                                     TrainingData(train, None), steps, seq, batch, lr, out / name)
    step_seconds: dict[str, list[tuple[float, float]]] = {name: [] for name in dtypes}  # (wall, CPU)
    peaks: dict[str, list[tuple[float, float]]] = {name: [] for name in dtypes}
    load = [os.getloadavg()[0]]
    for step in range(1, steps + 1):
        for name, dtype in dtypes.items():
            step_seconds[name].append(wall_and_cpu(trainers[name].train_step)[1:])
            if step % peak_every == 1 or peak_every == 1:
                peaks[name].append(matmul_peak(dtype))
        print(f"precision step {step}: " + ", ".join(f"{n} {s[-1][0]:.2f} s" for n, s in step_seconds.items()),
              file=sys.stderr, flush=True)
    load.append(os.getloadavg()[0])

    def perplexity(model) -> float:
        return evaluate_perplexity(model, heldout, micro_batch_size=8, progress=False).perplexity

    def in_fp32(model):
        copy = build_gpt_model(arch_of(model))
        bridge.load_global(copy, bridge.gather_global(model))
        return copy

    def median(pairs: list[tuple[float, float]], i: int) -> float:
        return statistics.median(pair[i] for pair in pairs)

    flops = distill_step_flops(teacher_arch, arch, batch * seq, seq)
    exported = trainers["fp32"].export_model
    result = {"step_flops": flops, "tokens": steps * batch * seq, "load_average": load, "runs": {},
              "adam_seconds": {"for-loop": adam_step_seconds(exported, False), "fused": adam_step_seconds(exported, True)}}
    for name in dtypes:
        timed = step_seconds[name][1:]  # the first step warms up
        wall, cpu = median(timed, 0), median(timed, 1)
        model = trainers[name].export_model
        run = result["runs"][name] = {
            "step_seconds": wall, "step_cpu_seconds": cpu, "tokens_per_s": batch * seq / wall,
            "flops_per_s": flops / wall, "peak_flops_per_s": median(peaks[name], 0),
            "fraction_of_peak": flops / wall / median(peaks[name], 0),
            "fraction_of_peak_cpu": flops / cpu / median(peaks[name], 1),
            "teacher_perplexity": perplexity(teachers[name]), "perplexity": perplexity(model),
            "perplexity_fp32_eval": perplexity(in_fp32(model)),
        }
        # 3 more steps, after the evaluation; per kind of work the least of them (a burst of other
        # jobs on the cores inflates one step, not all three)
        profiles = [time_by_kind(trainers[name]) for _ in range(3)]
        run["profile"] = {kind: min(profile[kind] for profile in profiles) for kind in profiles[0]}
    return result


# --- 5. the offline teacher ---------------------------------------------------------------------------

CACHE_KS = (16, 64, 256)


def bf16_copy(model):
    from nemo_minitron.models import bridge
    from nemo_minitron.models.gpt import arch_of, build_gpt_model

    copy = build_gpt_model(arch_of(model), torch.bfloat16)
    bridge.load_global(copy, bridge.gather_global(model))
    return copy.bfloat16()  # norms too, as megatron's Float16Module holds a model in training


def offline_teacher(teacher, arch, pruned_sd, train, heldout, steps: int, seq: int, batch: int, lr: float,
                    out: Path) -> dict:
    """Write the cache, then distill online (full vocabulary) and from the cache at each k, one step
    of each in turn, all in bf16."""
    import shutil

    from nemo_minitron import checkpoint
    from nemo_minitron.distill import TeacherCache, write_teacher_cache
    from nemo_minitron.eval.perplexity import evaluate_perplexity
    from nemo_minitron.train import TrainingData

    teacher = bf16_copy(teacher)
    shutil.rmtree(out / "cache", ignore_errors=True)  # this benchmark's own output: timed from scratch
    written = write_teacher_cache(teacher, TrainingData(train, None), out / "cache", max(CACHE_KS),
                                  global_batch_size=batch, micro_batch_size=batch, train_samples=steps * batch,
                                  valid_samples=0, manifest={"teacher": "smollm2-135m"}, progress=False)
    samples = TeacherCache(out / "cache").samples("train")
    trainers = {"online, full vocabulary": trainer_for("distill", teacher, student(arch, pruned_sd, torch.bfloat16),
                                                       TrainingData(train, None), steps, seq, batch, lr, out / "online")}
    for k in CACHE_KS:
        trainers[f"cache, k = {k}"] = trainer_for("cached", None, student(arch, pruned_sd, torch.bfloat16),
                                                  TrainingData(samples, None), steps, seq, batch, lr, out / f"k{k}", k)
    seconds: dict[str, list[float]] = {name: [] for name in trainers}
    for step in range(1, steps + 1):
        for name, trainer in trainers.items():
            seconds[name].append(trainer.train_step()["train/step_seconds"])
        print(f"cache step {step}: " + ", ".join(f"{n} {s[-1]:.2f} s" for n, s in seconds.items()),
              file=sys.stderr, flush=True)

    def perplexity(model) -> float:
        return evaluate_perplexity(model, heldout, micro_batch_size=8, progress=False).perplexity

    result = {"write": written, "tokens": steps * batch * seq, "teacher_perplexity": perplexity(teacher), "runs": {}}
    for name, trainer in trainers.items():
        k = int(name.rsplit(" ", 1)[-1]) if name.startswith("cache") else None
        result["runs"][name] = {"k": k, "step_seconds": statistics.median(seconds[name][1:]),
                                "perplexity": perplexity(trainer.export_model)}
    # the inputs of the memory cases, which run in fresh processes
    checkpoint.save_checkpoint(teacher, out / "teacher")
    checkpoint.save_checkpoint(student(arch, pruned_sd, torch.bfloat16), out / "student")
    result["memory"] = {mode: run_case("--cache-memory-case", mode, str(out), str(seq), str(batch))
                        for mode in ("online", "cached")}
    return result


def run_case(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    if out.returncode:
        sys.exit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def cache_memory_case(mode: str, out: Path, seq: int, batch: int, steps: int = 3) -> dict:
    """Peak RSS of `steps` distillation steps in bf16, teacher on the rank (online) or the cache."""
    from nemo_minitron import checkpoint, parallel
    from nemo_minitron.distill import TeacherCache
    from nemo_minitron.train import TrainingData

    def status_mib(field: str) -> float:  # VmRSS: now; VmHWM: the peak since the last reset
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
        return int(line.split()[1]) / 1024

    parallel.initialize(1, 1)
    before = status_mib("VmRSS")
    model = checkpoint.load_checkpoint(out / "student", params_dtype=torch.bfloat16)
    # both draw the cache's samples; the online loss ignores the cached logits in the batch
    data = TrainingData(TeacherCache(out / "cache").samples("train"), None)
    if mode == "online":
        teacher = checkpoint.load_checkpoint(out / "teacher", params_dtype=torch.bfloat16)
        trainer = trainer_for("distill", teacher, model, data, steps, seq, batch, 1e-4, out / "memory-online")
    else:
        trainer = trainer_for("cached", None, model, data, steps, seq, batch, 1e-4, out / "memory-cached",
                              max(CACHE_KS))
    loaded = status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM: the peak of the steps alone
    for _ in range(steps):
        trainer.train_step()
    return {"mode": mode, "models_mib": loaded - before, "steps_peak_mib": status_mib("VmHWM") - before}


def cache_lines(result: dict, args) -> list[str]:
    runs = result["runs"]
    online = runs["online, full vocabulary"]
    write = result["write"]
    memory = result["memory"]
    from nemo_minitron.distill.teacher_cache import bytes_per_token

    def stored(k: int | None) -> str:
        return "-" if k is None else f"{bytes_per_token(k, 'bfloat16'):,} B"

    rows = [f"| {name} | {stored(run['k'])} | {run['step_seconds']:.2f} s "
            f"({online['step_seconds'] / run['step_seconds']:.2f}x) | {run['perplexity']:.2f} "
            f"({100 * (run['perplexity'] / online['perplexity'] - 1):+.1f}%) |" for name, run in runs.items()]
    return [
        f"Offline teacher (bf16): the teacher's top-{write['top_k']} logits over {write['tokens_written']:,} training "
        f"tokens written in {write['seconds']:.0f} s ({write['tokens_per_s']:,.0f} tokens/s; "
        f"{write['stored_bytes'] / write['tokens_written']:,.0f} bytes per token on disk, "
        f"{write['stored_bytes'] / 2**20:,.0f} MiB); then one distillation step of each run in turn for "
        f"{args.steps} steps of {args.batch}x{args.seq} tokens (lr {args.lr:g}), forward KL at T = 1 (from the "
        f"cache: over the top k + one tail bucket), median step time; held-out perplexity after "
        f"{result['tokens']:,} tokens (teacher {result['teacher_perplexity']:.2f}):", "",
        "| run | cache bytes per token (k x (2 + 4) + 17) | step time (speed-up) | held-out perplexity (vs online) |",
        "| --- | --- | --- | --- |", *rows, "",
        "Memory of a fresh process (RSS above the process after imports and `parallel.initialize`) with the "
        "models loaded, and its peak over 3 training steps (/proc/self/status VmHWM, reset after loading):", "",
        "| | teacher on the rank | from the cache | less |", "| --- | --- | --- | --- |",
        *[f"| {label} | {memory['online'][key]:,.0f} MiB | {memory['cached'][key]:,.0f} MiB | "
          f"{memory['online'][key] - memory['cached'][key]:,.0f} MiB |"
          for label, key in (("models loaded", "models_mib"), ("peak of the steps", "steps_peak_mib"))],
    ]


def precision_lines(result: dict, args) -> list[str]:
    fp32, bf16 = result["runs"]["fp32"], result["runs"]["bf16"]
    g = 1e9

    def row(label: str, key: str, fmt: str, scale: float = 1.0, compare: str = "ratio") -> str:
        a, b = fp32[key] / scale, bf16[key] / scale
        versus = {"ratio": f"{b / a:.2f}x", "speed-up": f"{a / b:.2f}x faster", "change": f"{100 * (b / a - 1):+.1f}%",
                  "": ""}[compare]
        return f"| {label} | {a:{fmt}} | {b:{fmt}} | {versus} |"

    return [
        f"bf16 (fp32 main weights) vs fp32: one distillation step of each in turn on {args.batch}x{args.seq} tokens "
        f"for {args.steps} steps (same teacher, student, data, lr {args.lr:g}), medians; "
        f"{result['step_flops'] / g:.1f} GFLOP per step counted analytically (the script's docstring); matmul peak: "
        f"a 4096^3 torch.matmul every {args.peak_every} steps; load average {result['load_average'][0]:.1f} at the "
        f"start, {result['load_average'][1]:.1f} at the end:", "",
        "| measurement | fp32 | bf16 | bf16 vs fp32 |", "| --- | --- | --- | --- |",
        row("distillation step, wall seconds", "step_seconds", ".2f", compare="speed-up"),
        row("tokens/s", "tokens_per_s", ",.0f"),
        row("distillation step, CPU seconds (both threads)", "step_cpu_seconds", ".2f", compare="speed-up"),
        row("achieved GFLOP/s", "flops_per_s", ",.0f", g),
        row("matmul peak GFLOP/s", "peak_flops_per_s", ",.0f", g),
        row("achieved / peak, wall time", "fraction_of_peak", ".0%", compare=""),
        row("achieved / peak, CPU time", "fraction_of_peak_cpu", ".0%", compare=""),
        row("teacher held-out perplexity (evaluated in the dtype)", "teacher_perplexity", ".2f", compare="change"),
        row(f"student held-out perplexity after {result['tokens']:,} tokens (evaluated in its dtype)", "perplexity",
            ".2f", compare="change"),
        row("the same, evaluated in fp32", "perplexity_fp32_eval", ".2f", compare="change"),
        "", "Where a step's time goes (torch.profiler, each op's self time, per kind the least of 3 more steps "
        "after training), seconds:", "",
        "| work | fp32 | bf16 |", "| --- | --- | --- |",
        *[f"| {kind} | {fp32['profile'][kind]:.2f} | {bf16['profile'][kind]:.2f} |" for kind in fp32["profile"]],
        "", f"One AdamW step over the student's fp32 (main) weights: {result['adam_seconds']['for-loop']:.3f} s as "
        f"megatron builds torch's AdamW without TE/apex, {result['adam_seconds']['fused']:.3f} s fused (the loop's "
        f"choice, `train/optim.py`).",
    ]


def plot(result: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"distill": "distillation (forward KL, T=1)", "lm": "LM-loss retraining",
              "scratch": "random initialisation"}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for kind, run in result["runs"].items():
        tokens, values = zip(*run["points"])
        ax.plot(tokens, values, marker="o", label=labels[kind])
    ax.axhline(result["teacher"], color="gray", linestyle="--", label="teacher (30 layers)")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default="timing,memory,curves", help="comma-separated subset to run")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-tokens", type=int, default=1024)
    parser.add_argument("--peak-every", type=int, default=10, help="precision: time the matmul peak every N steps")
    parser.add_argument("--work", default="runs/bench-distill")
    parser.add_argument("--memory-case", nargs=4, metavar=("IMPL", "VOCAB", "TOKENS", "CHUNK"))
    parser.add_argument("--cache-memory-case", nargs=4, metavar=("MODE", "WORK", "SEQ", "BATCH"))
    args = parser.parse_args()
    if args.memory_case:
        impl, vocab, tokens, chunk = args.memory_case
        print(json.dumps(memory_case(impl, int(vocab), int(tokens), int(chunk))))
        return
    if args.cache_memory_case:
        mode, work, seq, batch = args.cache_memory_case
        print(json.dumps(cache_memory_case(mode, Path(work), int(seq), int(batch))))
        return
    parts = set(args.parts.split(","))
    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(args.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    dtypes = "fp32 and bf16" if parts & {"precision", "cache"} else "fp32"
    lines = [f"### Distillation (issues 4, 15): {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"{dtypes}",
             "", f"Command: `.venv/bin/python benchmarks/distill.py --parts {args.parts} --steps {args.steps} "
             f"--seq {args.seq} --batch {args.batch} --lr {args.lr:g}`", ""]
    if "memory" in parts:
        lines += [f"Peak memory of the logit loss, forward + backward, {args.memory_tokens} tokens, fp32, one rank "
                  "(RSS above the student and teacher logits; time in brackets):", "",
                  *memory_table(args.memory_tokens), ""]
    if parts & {"timing", "curves", "precision", "cache"}:
        teacher, arch, pruned_sd, train, heldout = setup(args.seq, args.steps * args.batch)
    if "timing" in parts:
        t = step_times(teacher, arch, pruned_sd, train, args.seq, args.batch, args.repeats, work / "timing")
        (work / "timing.json").write_text(json.dumps(t, indent=2))
        lines += [
            f"Step time on one batch of {args.batch}x{args.seq} tokens (median of {args.repeats} interleaved rounds; "
            "student = teacher depth-pruned to 15 layers):", "",
            "| measurement | seconds |", "| --- | --- |",
            f"| teacher forward | {t['teacher_forward']:.2f} |",
            f"| student LM training step (forward, backward, optimizer) | {t['student_lm_step']:.2f} |",
            f"| sum | {t['teacher_forward'] + t['student_lm_step']:.2f} |",
            f"| distillation step (both models, KL loss, optimizer) | {t['distill_step']:.2f} |",
            f"| overhead of distillation over the sum | {100 * t['overhead']:+.1f}% |", ""]
    if "curves" in parts:
        result = curves(teacher, arch, pruned_sd, train, heldout, args.steps, args.seq, args.batch, args.lr,
                        args.eval_every, work / "curves")
        (work / "curves.json").write_text(json.dumps(result, indent=2))
        plot(result, DOCS / "distillation_curves.png",
             f"SmolLM2-135M, 15 of 30 layers kept; {args.batch}x{args.seq} tokens/step, lr {args.lr:g}")
        lines += [
            f"Held-out perplexity (Persuasion, {len(heldout)} windows of {args.seq} tokens) after "
            f"{args.steps * args.batch * args.seq:,} training tokens (Emma, Pride and Prejudice); teacher "
            f"{result['teacher']:.1f}; plot: docs/distillation_curves.png:", "",
            "| run | start | end | training time |", "| --- | --- | --- | --- |",
            *[f"| {kind} | {run['points'][0][1]:,.1f} | {run['points'][-1][1]:,.1f} | {run['train_seconds']:.0f} s |"
              for kind, run in result["runs"].items()]]
    if "precision" in parts:
        result = precision(teacher, arch, pruned_sd, train, heldout, args.steps, args.seq, args.batch, args.lr,
                           args.peak_every, work / "precision")
        (work / "precision.json").write_text(json.dumps(result, indent=2))
        lines += ["", *precision_lines(result, args)]
    if "cache" in parts:
        result = offline_teacher(teacher, arch, pruned_sd, train, heldout, args.steps, args.seq, args.batch, args.lr,
                                 work / "cache")
        (work / "cache.json").write_text(json.dumps(result, indent=2))
        lines += ["", *cache_lines(result, args)]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
