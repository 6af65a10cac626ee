"""Refit on the pruned model's own inputs (issue 25): each kept layer on its own stream, layer by layer.

The prune's reconstruction (docs/pruning.md) fits every consumer on the teacher's activations in
one pass: the inputs a_K are the teacher's, while the pruned model, once its earlier layers are
cut, feeds each layer something else. Here the main job's prune (the same importance, block,
ridge) is refit again, one kept layer at a time in order, with the calibration windows run through
the pruned model as refit so far (GPTQ's layer-wise walk). Two targets for a consumer with input a
(the pruned layer's own, on its own stream) and teacher layer m:

- `local`: the teacher's consumer on the same stream, y = W a_full (the unpruned block's output on
  the pruned model's inputs), plus for a bridged MLP the dropped run's change on that stream;
- `corrective`: whatever brings the pruned residual stream back to the teacher's at that point,
  y = h_teacher(after the consumer's residual add, after the dropped run for a bridge) - h_pruned(before it).

Two schedules: `sequential` refits each layer before the next one's statistics are taken;
`parallel` takes every layer's statistics on the stream of the model as it starts, then refits
them all (one pass over the model: the form a recorder on a pipeline-parallel model could take).

Each fit is the prune's proximal ridge solve towards the weights it starts from
(`reconstruct.refit`). The main job's prune settings (windows, seed, target, ridge) are read from
`PipelineConfig`; `--refit-windows` replaces its `reconstruct_samples`. Held-out perplexity as the
main job evaluates it (fp32, 8,192 tokens in windows of 512 spread over each text). Single process
(TP = PP = 1); a prototype measurement, not the library's prune.

`--distill DIR` (one mode, one start, one schedule) saves the walked model to DIR/pruned and
distils it as the main job does (`PipelineConfig().distill`: the same teacher, corpus, steps,
schedule and seed, so the student's start is the only difference) into DIR/distill, then
evaluates DIR/distill/final on the same texts as recovery.py evaluates a checkpoint: what the walk
is worth after distillation.

    PYTHONPATH=. .venv/bin/python benchmarks/sequential_refit.py [--work runs/reconstruction] [--refit-windows 64] [--modes local corrective] [--starts plain "one pass"]
        [--schedules sequential parallel] [--keep-bridged] [--distill DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from main_job import MAX_TOKENS, SEQ_LEN, write_texts  # noqa: E402
from distill_from import distill_and_evaluate  # noqa: E402

MICRO = 4


def layer_forward(layer, h, mask, rope):
    out, _ = layer(hidden_states=h, attention_mask=mask, rotary_pos_emb=rope)
    return out


class Capture:
    """Forward (pre-)hooks that keep one tensor each, flattened to [tokens, width] float32."""

    def __init__(self):
        self.values, self.handles = {}, []

    def pre(self, module, name):
        self.handles.append(module.register_forward_pre_hook(
            lambda m, args: self.values.__setitem__(name, args[0].detach().reshape(-1, args[0].shape[-1]).float())))

    def post(self, module, name):
        def hook(m, args, output):
            y = output[0] if isinstance(output, tuple) else output
            self.values[name] = y.detach().reshape(-1, y.shape[-1]).float().clone()
        self.handles.append(module.register_forward_hook(hook))

    def close(self):
        for handle in self.handles:
            handle.remove()


def solve(weight, gram, cross, ridge):
    from nemo_minitron.pruning.reconstruct import Statistics, refit

    return refit(weight.detach(), Statistics(gram, cross, torch.ones((), dtype=torch.float64)), ridge)


def walk(teacher, pruned, indices, bridges, runs, windows, mode, ridge, deferred=False, keep_bridged=False):
    """Refit `pruned`'s linear_proj and linear_fc2, kept layer by kept layer, on its own stream
    (`runs`: {kept layer: the last of the dropped layers after it}; `bridges`: those bridged).
    `deferred`: every consumer's statistics on the stream of `pruned` as it is, all refit at the
    end (one pass over the model, as a recorder on a pipeline-parallel model could take them).
    `keep_bridged`: a bridged MLP keeps the weights it starts from (its target needs the dropped
    layers, which a model of the pruned depth does not hold)."""
    from nemo_minitron.models.gpt import causal_attention_mask, position_ids_for

    s = windows.shape[1] - 1
    mask, rope = causal_attention_mask(s), teacher.rotary_pos_emb(s)
    batches = [w[:, :-1] for w in windows.split(MICRO)]
    with torch.no_grad():
        T = [teacher.embedding(input_ids=b, position_ids=position_ids_for(b)) for b in batches]
        P = [pruned.embedding(input_ids=b, position_ids=position_ids_for(b)) for b in batches]
    kept = indices.layers
    t_layers, p_layers = teacher.decoder.layers, pruned.decoder.layers
    solved = []
    with torch.no_grad():
        for j in range(kept[0]):
            T = [layer_forward(t_layers[j], t, mask, rope) for t in T]
    for k, m in enumerate(kept):
        t_layer, p_layer = t_layers[m], p_layers[k]
        run = range(m + 1, runs[m] + 1) if m in runs else range(0)
        bridged = run if m in bridges else range(0)
        for consumer in ("attention", "mlp"):
            if consumer == "mlp" and bridged and keep_bridged:
                continue
            p_module = p_layer.self_attention.linear_proj if consumer == "attention" else p_layer.mlp.linear_fc2
            t_module = t_layer.self_attention.linear_proj if consumer == "attention" else t_layer.mlp.linear_fc2
            width = p_module.weight.shape[1]
            gram = torch.zeros(width, width, dtype=torch.float64)
            cross = torch.zeros(p_module.weight.shape[0], width, dtype=torch.float64)
            for i in range(len(batches)):
                cap = Capture()
                cap.pre(p_module, "a")
                cap.pre(p_layer.pre_mlp_layernorm, "p_mid")
                with torch.no_grad():
                    layer_forward(p_layer, P[i], mask, rope)
                cap.close()
                a, p_mid = cap.values["a"], cap.values["p_mid"]
                with torch.no_grad():
                    if mode == "corrective":
                        cap = Capture()
                        cap.pre(t_layer.pre_mlp_layernorm, "t_mid")
                        h = layer_forward(t_layer, T[i], mask, rope)
                        for j in run:
                            h = layer_forward(t_layers[j], h, mask, rope)
                        cap.close()
                        if consumer == "attention":
                            y = cap.values["t_mid"] - P[i].reshape(-1, P[i].shape[-1])
                        else:
                            y = h.reshape(-1, h.shape[-1]) - p_mid
                    elif consumer == "attention":  # local: the teacher's layer m on the pruned stream
                        cap = Capture()
                        cap.post(t_module, "y")
                        layer_forward(t_layer, P[i], mask, rope)
                        cap.close()
                        y = cap.values["y"]
                    else:
                        x = p_mid.reshape(P[i].shape)
                        mlp_out, _ = t_layer.mlp(t_layer.pre_mlp_layernorm(x))
                        y = mlp_out.reshape(-1, x.shape[-1]).float()
                        if bridged:
                            h = start = x + mlp_out
                            for j in bridged:
                                h = layer_forward(t_layers[j], h, mask, rope)
                            y = y + (h - start).reshape(-1, x.shape[-1]).float()
                gram += (a.T @ a).double()
                cross += (y.T @ a).double()
            if deferred:
                solved.append((p_module, gram, cross))
            else:
                with torch.no_grad():
                    p_module.weight.copy_(solve(p_module.weight, gram, cross, ridge))
        with torch.no_grad():
            for i in range(len(batches)):
                h = layer_forward(t_layer, T[i], mask, rope)
                for j in run:
                    h = layer_forward(t_layers[j], h, mask, rope)
                T[i] = h
                P[i] = layer_forward(p_layer, P[i], mask, rope)
        print(f"layer {m} -> {k} {'recorded' if deferred else 'refit'} ({mode})", flush=True)
    if deferred:
        with torch.no_grad():
            for p_module, gram, cross in solved:
                p_module.weight.copy_(solve(p_module.weight, gram, cross, ridge))


def check_layerwise(model, windows):
    """The layer-by-layer walk reproduces the model's own decoder output (before the final norm)."""
    from nemo_minitron.models.gpt import causal_attention_mask, position_ids_for

    tokens = windows[:, :-1]
    s = tokens.shape[1]
    mask, rope = causal_attention_mask(s), model.rotary_pos_emb(s)
    cap = Capture()
    cap.pre(model.decoder.final_layernorm, "h")
    with torch.no_grad():
        model(tokens, position_ids_for(tokens), mask)
        h = model.embedding(input_ids=tokens, position_ids=position_ids_for(tokens))
        for layer in model.decoder.layers:
            h = layer_forward(layer, h, mask, rope)
    cap.close()
    difference = (h.reshape(-1, h.shape[-1]) - cap.values["h"]).abs().max().item()
    assert difference < 1e-4, difference


def distill_walked(model, work: Path, out: Path, splits: dict[str, Path], paths: dict[str, Path]) -> dict:
    """Save `model` to out/pruned, distil it with the main job's distillation settings into
    out/distill, and return out/distill/final's perplexity on each of `paths`."""
    import dataclasses

    from nemo_minitron import checkpoint
    from nemo_minitron.convert import ImportConfig, import_checkpoint
    from nemo_minitron.pipeline.run import PipelineConfig

    main_job = PipelineConfig()
    teacher = work / "teacher"
    import_checkpoint(ImportConfig(**dataclasses.asdict(main_job.teacher), output_dir=str(teacher),
                                   **main_job.stage_settings()))
    if not checkpoint.is_complete(out / "pruned"):
        checkpoint.save_checkpoint(model, out / "pruned", checkpoint.load_tokenizer(teacher),
                                   metadata={"stage": "prune", "note": "benchmarks/sequential_refit.py walk"})
    distilled = distill_and_evaluate(out / "pruned", teacher, out, splits["train"], splits["heldout"], paths)
    return {name: round(ppl, 2) for name, ppl in distilled.items()}


def experiment(work: Path, refit_windows: int, modes: list[str], starts: list[str], schedules: list[str],
               distill: Path | None = None, keep_bridged: bool = False):
    from nemo_minitron.convert import read_source
    from nemo_minitron.data.indexed import load_token_stream
    from nemo_minitron.eval.perplexity import evaluate_perplexity, windows_from_stream
    from nemo_minitron.importance import activation_loop, contiguous_block_scores, estimate_importance, loss_metric, sample_windows
    from nemo_minitron.models import bridge
    from nemo_minitron.models.gpt import build_gpt_model
    from nemo_minitron.pipeline.run import PipelineConfig
    from nemo_minitron.pruning import best_block, prune_model, select_indices
    from nemo_minitron.pruning.reconstruct import dropped_runs, record_statistics
    from nemo_minitron.stage_config import CorpusConfig

    torch.set_num_threads(2)
    arch, hf_state, tokenizer, _ = read_source("smollm2-135m", None, torch.float32)
    teacher = build_gpt_model(arch)
    bridge.load_global(teacher, bridge.hf_to_global(arch, hf_state))
    teacher.eval()
    splits = CorpusConfig(output_dir=str(work / "corpus")).splits()
    paths = {"heldout": splits["heldout"], **write_texts(work / "texts")}
    main_job = PipelineConfig().prune
    calib, ridge = main_job.calib, main_job.reconstruct_ridge
    stream = load_token_stream(splits["calib"], tokenizer)
    importance_windows = sample_windows(stream, calib.seq_len, calib.num_samples, calib.seed)
    refit = sample_windows(stream, calib.seq_len, refit_windows, calib.seed)
    loss = loss_metric(sample_windows(stream, calib.seq_len, main_job.loss_samples, calib.seed + 1))
    texts = {name: windows_from_stream(load_token_stream(path, tokenizer), SEQ_LEN, MAX_TOKENS)
             for name, path in paths.items()}

    def evaluate(model):
        return {name: round(evaluate_perplexity(model, w, micro_batch_size=4, progress=False).perplexity, 2)
                for name, w in texts.items()}

    scores = estimate_importance(teacher, activation_loop(importance_windows, progress=False))
    target = main_job.target.target_arch(arch)
    drop = arch.num_layers - target.num_layers
    indices = select_indices(scores, arch, target, best_block(contiguous_block_scores(teacher, drop, loss), drop))
    results = {}
    start = time.perf_counter()
    reconstruction = record_statistics(teacher, indices, activation_loop(refit, progress=False), ridge, bridge=True)
    one_pass = prune_model(teacher, target, indices, reconstruction=reconstruction, bridge_loss=loss)
    results["one pass (the prune's)"] = {**evaluate(one_pass), "s": round(time.perf_counter() - start, 1),
                                         "loss": round(loss(one_pass), 4)}
    print(results, flush=True)
    bridges = {c["layer"]: c["dropped"][1] for c in reconstruction.bridge_checks if c["kept"]}
    runs = dropped_runs(indices, arch)
    check_layerwise(teacher, refit[:MICRO])
    for schedule, mode, start_from in itertools.product(schedules, modes, starts):
        model = prune_model(teacher, target, indices) if start_from == "plain" else \
            prune_model(teacher, target, indices, reconstruction=reconstruction, bridge_loss=loss)
        model.eval()
        start = time.perf_counter()
        walk(teacher, model, indices, bridges, runs, refit, mode, ridge, schedule == "parallel", keep_bridged)
        name = f"{schedule} {mode}, from {start_from}{', bridged MLPs kept' if keep_bridged else ''}"
        results[name] = {**evaluate(model), "s": round(time.perf_counter() - start, 1), "loss": round(loss(model), 4)}
        print(name, results[name], flush=True)
        if distill is not None:
            results[f"{name}, distilled"] = distill_walked(model, work, distill, splits, paths)
            print(f"{name}, distilled", results[f"{name}, distilled"], flush=True)
    return results


def main():
    from nemo_minitron import parallel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/reconstruction", help="the corpus and texts (benchmarks/reconstruction.py's)")
    parser.add_argument("--refit-windows", type=int, default=64)
    parser.add_argument("--modes", nargs="+", choices=["local", "corrective"], default=["local", "corrective"])
    parser.add_argument("--starts", nargs="+", choices=["plain", "one pass"], default=["plain", "one pass"],
                        help="the weights each sequential refit starts from (and its ridge pulls towards)")
    parser.add_argument("--schedules", nargs="+", choices=["sequential", "parallel"], default=["sequential"],
                        help="sequential: each layer refit before the next is recorded; parallel: every layer "
                             "recorded on the unchanged model, all refit at the end")
    parser.add_argument("--keep-bridged", action="store_true", help="bridged MLPs keep the weights they start from")
    parser.add_argument("--distill", type=Path, help="distil the walked model as the main job does, here (one of each)")
    args = parser.parse_args()
    if args.distill and len(args.modes) * len(args.starts) * len(args.schedules) != 1:
        parser.error("--distill takes one --modes, one --starts and one --schedules")
    parallel.initialize(1, 1, 0)
    results = experiment(Path(args.work), args.refit_windows, args.modes, args.starts, args.schedules, args.distill,
                         args.keep_bridged)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
