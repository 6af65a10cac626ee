"""Importance estimation: the hooks read the activations the paper defines (checked against
transformers' Llama run with its own hooks and aggregated here by plain formulas), every
aggregation option, depth scores, saving/loading, weight-magnitude scores, calibration windows;
first-order (Taylor) scores against autograd on transformers' model and at TP=2, PP=2, DP=2.
Activation scores at other TP x PP x DP layouts are compared in test_prune.py."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch

from distributed import run_distributed
from nemo_minitron.importance import Aggregation, ImportanceScores, magnitude_scores, random_scores, sample_windows
from nemo_minitron.importance.aggregation import BatchStats
from nemo_minitron.models import bridge
from tiny import hf_model, tiny_arch

WINDOWS = torch.randint(0, 320, (6, 17), generator=torch.Generator().manual_seed(2))
AGGREGATIONS = [Aggregation(), Aggregation("l2", "mean", "input"), Aggregation("var", "var", "output"),
                Aggregation("mean", "l2", "input")]


# --- aggregation -------------------------------------------------------------------------------

def reference_aggregate(x: torch.Tensor, seq: str, batch: str) -> torch.Tensor:
    """[b, s, c] -> [c], written out per sample and channel."""
    b = x.shape[0]
    per_sample = []
    for i in range(b):
        v = x[i].double()
        if seq == "mean":
            per_sample.append(v.abs().sum(0) / v.shape[0])
        elif seq == "l2":
            per_sample.append(torch.sqrt((v * v).sum(0)))
        else:
            per_sample.append(((v - v.mean(0)) ** 2).mean(0))
    p = torch.stack(per_sample)
    if batch == "mean":
        return p.mean(0)
    if batch == "l2":
        return torch.sqrt((p * p).sum(0))
    return ((p - p.mean(0)) ** 2).mean(0)


@pytest.mark.parametrize("seq", ["mean", "l2", "var"])
@pytest.mark.parametrize("batch", ["mean", "l2", "var"])
def test_aggregation_over_split_batches(seq, batch):
    x = torch.randn(5, 7, 3, generator=torch.Generator().manual_seed(0))  # [b, s, c]
    agg = Aggregation(seq, batch)
    stats = BatchStats((1, 3))
    for part in x.split([2, 3]):  # two micro-batches, summed like DP replicas
        stats.add(0, agg.over_sequence(part.transpose(0, 1)))
        stats.count_samples(0, len(part))
    torch.testing.assert_close(agg.over_batch(stats)[0], reference_aggregate(x, seq, batch))


def test_aggregation_rejects_unknown_reductions():
    with pytest.raises(ValueError, match=r"aggregation\.seq='max'"):
        Aggregation(seq="max")
    with pytest.raises(ValueError, match=r"aggregation\.heads='q'"):
        Aggregation(heads="q")


# --- hooks against transformers -----------------------------------------------------------------

def hf_reference_scores(hf, arch, tokens, agg: Aggregation) -> dict[str, torch.Tensor]:
    """Run transformers' Llama with its own hooks; aggregate like the paper."""
    acts: dict[str, list[torch.Tensor]] = {}
    d, H = arch.kv_channels, arch.num_attention_heads

    def keep(name):
        def hook(module, args, kwargs, output):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else (args[0] if args else None)
            acts[name] = (x, output[0] if isinstance(output, tuple) else output)
        return hook

    handles = []
    for i, layer in enumerate(hf.model.layers):
        for name, module in [("ln1", layer.input_layernorm), ("ln2", layer.post_attention_layernorm),
                             ("o_proj", layer.self_attn.o_proj), ("down", layer.mlp.down_proj), ("layer", layer)]:
            handles.append(module.register_forward_hook(keep(f"{name}{i}"), with_kwargs=True))
    with torch.no_grad():
        hf(tokens)
    for handle in handles:
        handle.remove()
    out = {"hidden": 0, "heads": [], "neurons": [], "bi": []}
    for i, layer in enumerate(hf.model.layers):
        for ln in ("ln1", "ln2"):
            out["hidden"] = out["hidden"] + reference_aggregate(acts[f"{ln}{i}"][1], agg.seq, agg.batch)
        attn_out = acts[f"o_proj{i}"][0]  # [b, s, H*d]
        if agg.heads == "input":
            out["heads"].append(reference_aggregate(attn_out, agg.seq, agg.batch).view(H, d).norm(dim=-1))
        else:
            w = layer.self_attn.o_proj.weight
            contributions = torch.stack([
                (attn_out[..., h * d:(h + 1) * d] @ w[:, h * d:(h + 1) * d].T).norm(dim=-1) for h in range(H)
            ], dim=-1)  # [b, s, H]
            out["heads"].append(reference_aggregate(contributions, agg.seq, agg.batch))
        out["neurons"].append(reference_aggregate(acts[f"down{i}"][0], agg.seq, agg.batch))
        x, y = acts[f"layer{i}"]
        out["bi"].append((1 - torch.nn.functional.cosine_similarity(x, y, dim=-1)).mean())
    return {k: (torch.stack(v) if isinstance(v, list) else v).float() for k, v in out.items()}


def megatron_scores(arch, global_sd):
    from nemo_minitron.importance import (activation_loop, estimate_importance, layer_loss_scores, loss_metric,
                                          perplexity_loop)
    from nemo_minitron.importance.hooks import _fused_norm
    from nemo_minitron.models.gpt import build_gpt_model
    from nemo_minitron.models.runner import forward_microbatches

    model = build_gpt_model(arch)
    bridge.load_global(model, global_sd)
    scores = [estimate_importance(model, perplexity_loop(WINDOWS, 2, progress=False), agg) for agg in AGGREGATIONS]
    decoder_only = estimate_importance(model, activation_loop(WINDOWS, 2, progress=False), AGGREGATIONS[0])
    [logits] = forward_microbatches(model, [{"tokens": WINDOWS[:2, :-1]}], lambda logits, mb: logits)
    layer_loss, base = layer_loss_scores(model, loss_metric(WINDOWS, micro_batch_size=3))
    # The TE spec fuses the norm into linear_qkv; the hook recomputes it from the module's
    # `layer_norm_weight` (and `layer_norm_bias`) and config. Same maths as the local norm module:
    norm = model.decoder.layers[1].input_layernorm
    x = torch.randn(5, 2, arch.hidden_size)
    fused_like = types.SimpleNamespace(config=model.config, layer_norm_weight=norm.weight,
                                       layer_norm_bias=getattr(norm, "bias", None))
    with torch.no_grad():
        return scores, layer_loss, base, (_fused_norm(fused_like, x), norm(x)), (decoder_only, logits)


@pytest.fixture(scope="module", params=["llama", "nemotron"])
def tiny_run(request):
    arch = tiny_arch(tie=False, family=request.param)
    hf = hf_model(arch)
    [result] = run_distributed(megatron_scores, world_size=1, args=(arch, bridge.hf_to_global(arch, hf.state_dict())))
    return arch, hf, result


def test_hook_scores_equal_transformers_reference(tiny_run):
    arch, hf, (all_scores, _, _, _, _) = tiny_run
    for agg, scores in zip(AGGREGATIONS, all_scores):
        expected = hf_reference_scores(hf, arch, WINDOWS[:, :-1], agg)
        assert scores.info["samples"] == len(WINDOWS) and scores.info["aggregation"] == agg.as_dict()
        torch.testing.assert_close(scores.hidden, expected["hidden"], rtol=1e-4, atol=1e-5, msg=str(agg))
        torch.testing.assert_close(scores.heads, expected["heads"], rtol=1e-4, atol=1e-5, msg=str(agg))
        torch.testing.assert_close(scores.neurons, expected["neurons"], rtol=1e-4, atol=1e-5, msg=str(agg))
        torch.testing.assert_close(scores.layers["block_importance"], expected["bi"], rtol=1e-4, atol=1e-6)
        assert scores.hidden_per_layer.shape == (arch.num_layers, 2, arch.hidden_size)


def test_decoder_only_loop_scores_as_the_perplexity_loop_and_keeps_the_output_layer(tiny_run):
    """`activation_loop` (the prune stage's) stops before the output layer: the same scores bit for bit, and the
    model gives logits again afterwards."""
    arch, hf, (all_scores, _, _, _, (decoder_only, logits)) = tiny_run
    for name in ("hidden", "heads", "neurons", "hidden_per_layer"):
        assert torch.equal(getattr(decoder_only, name), getattr(all_scores[0], name)), name
    assert torch.equal(decoder_only.layers["block_importance"], all_scores[0].layers["block_importance"])
    assert "calibration_loss" not in decoder_only.info and decoder_only.info["tokens"] == WINDOWS[:, 1:].numel()
    with torch.no_grad():
        expected = hf(WINDOWS[:2, :-1]).logits
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_fused_norm_recomputation_equals_local_norm(tiny_run):
    fused, local = tiny_run[2][3]
    torch.testing.assert_close(fused, local, rtol=1e-6, atol=1e-6)


def test_layer_loss_scores_equal_transformers_without_the_layer(tiny_run):
    arch, hf, (_, layer_loss, base, _, _) = tiny_run
    tokens, labels = WINDOWS[:, :-1], WINDOWS[:, 1:]

    def loss(model) -> float:
        with torch.no_grad():
            logits = model(tokens, use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).item()

    assert base == pytest.approx(loss(hf), rel=1e-5)
    layers = hf.model.layers
    for i in range(arch.num_layers):
        hf.model.layers = torch.nn.ModuleList([m for j, m in enumerate(layers) if j != i])
        assert layer_loss[i].item() == pytest.approx(loss(hf) - base, abs=1e-4), i
    hf.model.layers = layers


# --- scores as data ----------------------------------------------------------------------------

def test_save_load_roundtrip_and_arch_check(tmp_path):
    arch = tiny_arch()
    scores = random_scores(arch, seed=3)
    scores.blocks[2] = torch.tensor([1.0, 0.5, 2.0])
    scores.info["request"] = {"teacher": "/x", "calib": {"data": None, "num_samples": 4}}
    scores.save(tmp_path)
    loaded = ImportanceScores.load(tmp_path, arch)
    for name in ("hidden", "heads", "neurons"):
        assert torch.equal(getattr(loaded, name), getattr(scores, name))
    assert torch.equal(loaded.blocks[2], scores.blocks[2]) and loaded.info == scores.info
    assert torch.equal(random_scores(arch, seed=3).heads, scores.heads)
    with pytest.raises(ValueError, match="different model"):
        ImportanceScores.load(tmp_path, arch.replace(hidden_size=32))
    with pytest.raises(FileNotFoundError):
        ImportanceScores.load(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"neurons has shape \(4, 96\), the model needs \(4, 50\)"):
        scores.with_updates(arch=arch.replace(ffn_hidden_size=50))


def test_magnitude_scores_are_weight_norms():
    arch = tiny_arch(tie=False)
    hf = hf_model(arch).state_dict()
    scores = magnitude_scores(arch, bridge.hf_to_global(arch, hf))
    layer = "model.layers.2."
    ln2 = hf[layer + "post_attention_layernorm.weight"]
    expected = ((hf[layer + "mlp.gate_proj.weight"] * ln2).square().sum(1) + (hf[layer + "mlp.up_proj.weight"] * ln2)
                .square().sum(1) + hf[layer + "mlp.down_proj.weight"].square().sum(0)).sqrt()
    torch.testing.assert_close(scores.neurons[2], expected)
    d = arch.kv_channels
    ln1 = hf[layer + "input_layernorm.weight"]
    q, o = hf[layer + "self_attn.q_proj.weight"] * ln1, hf[layer + "self_attn.o_proj.weight"]
    expected_heads = torch.stack([(q[h * d:(h + 1) * d].square().sum() + o[:, h * d:(h + 1) * d].square().sum()).sqrt()
                                  for h in range(arch.num_attention_heads)])
    torch.testing.assert_close(scores.heads[2], expected_heads)
    assert scores.layers["magnitude"].shape == (arch.num_layers,)


def test_sample_windows_cover_the_stream(caplog):
    stream = np.arange(1001)
    windows = sample_windows(stream, seq_len=10, num_samples=30, seed=0)
    assert windows.shape == (30, 11)
    starts = windows[:, 0]
    assert torch.equal(starts, starts.sort().values) and (starts % 10 == 0).all()
    assert starts.min() < 200 and starts.max() > 800  # spread over the stream, not its head
    assert torch.equal(windows[:, 1:] - windows[:, :-1], torch.ones(30, 10, dtype=torch.long))
    assert torch.equal(sample_windows(stream, 10, 30, seed=0), windows)
    assert sample_windows(stream, 10, 500, seed=0).shape == (100, 11)
    assert "only 100 windows" in caplog.text
    with pytest.raises(ValueError, match="fewer than seq_len"):
        sample_windows(np.arange(5), 10, 1)


# --- first-order (Taylor) scores ---------------------------------------------------------------

def hf_taylor_reference(hf, arch, windows) -> dict[str, torch.Tensor]:
    """Group Taylor scores sum |w dL/dw| written out on transformers' model, with autograd's
    gradient of the mean token NLL over `windows` (inputs [:, :-1], labels [:, 1:])."""
    hf.zero_grad()
    logits = hf(windows[:, :-1], use_cache=False).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)).backward()
    s = {name: (p * p.grad).abs().detach() for name, p in hf.named_parameters()}  # a tied lm_head is listed once
    H, d = arch.num_attention_heads, arch.kv_channels
    hidden = s["model.embed_tokens.weight"].sum(0) + s["model.norm.weight"]
    if "lm_head.weight" in s:
        hidden = hidden + s["lm_head.weight"].sum(0)
    heads, neurons = [], []
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        reading = [f"{p}self_attn.{x}_proj.weight" for x in "qkv"] + [f"{p}mlp.{x}_proj.weight" for x in ("gate", "up")]
        hidden = hidden + s[p + "input_layernorm.weight"] + s[p + "post_attention_layernorm.weight"]
        hidden = hidden + sum(s[name].sum(0) for name in reading)
        hidden = hidden + s[p + "self_attn.o_proj.weight"].sum(1) + s[p + "mlp.down_proj.weight"].sum(1)
        query = s[p + "self_attn.q_proj.weight"].view(H, d, -1).sum((1, 2))
        if arch.qkv_bias:
            query = query + s[p + "self_attn.q_proj.bias"].view(H, d).sum(1)
        heads.append(query + s[p + "self_attn.o_proj.weight"].view(-1, H, d).sum((0, 2)))
        neurons.append(s[p + "mlp.gate_proj.weight"].sum(1) + s[p + "mlp.up_proj.weight"].sum(1)
                       + s[p + "mlp.down_proj.weight"].sum(0))
    return {"hidden": hidden, "heads": torch.stack(heads), "neurons": torch.stack(neurons)}


def megatron_taylor_scores(cases):
    """Taylor scores of each (arch, global state dict) on WINDOWS, on this rank's layout."""
    from nemo_minitron.importance import estimate_taylor_importance
    from nemo_minitron.models.gpt import build_gpt_model

    results = []
    for arch, global_sd in cases:
        model = build_gpt_model(arch)
        bridge.load_global(model, global_sd)
        scores = estimate_taylor_importance(model, WINDOWS, micro_batch_size=4)  # 6 windows: a ragged tail
        assert all(p.grad is None for p in model.parameters())
        results.append({"hidden": scores.hidden, "heads": scores.heads, "neurons": scores.neurons,
                        "loss": scores.info["calibration_loss"], "method": scores.method})
    return results


@pytest.fixture(scope="module")
def taylor_run():
    """Llama with tied embeddings, Qwen2 (query biases) with an untied output layer; TP=1."""
    archs = (tiny_arch(tie=True), tiny_arch(tie=False, family="qwen2"))
    models = [hf_model(arch) for arch in archs]
    cases = [(arch, bridge.hf_to_global(arch, model.state_dict())) for arch, model in zip(archs, models)]
    [scores] = run_distributed(megatron_taylor_scores, world_size=1, args=(cases,))
    return archs, models, cases, scores


def test_taylor_scores_equal_autograd_on_transformers(taylor_run):
    archs, models, _, all_scores = taylor_run
    for arch, hf, scores in zip(archs, models, all_scores):
        expected = hf_taylor_reference(hf, arch, WINDOWS)
        assert scores["method"] == "taylor"
        for name in ("hidden", "heads", "neurons"):
            torch.testing.assert_close(scores[name], expected[name], rtol=1e-4, atol=1e-8, msg=f"{arch.family} {name}")


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,world", [(2, 1, 2), (1, 2, 2), (1, 1, 2)])
def test_taylor_scores_match_across_layouts(taylor_run, tp, pp, world):
    """TP shards, pipeline stages (with the tied embedding's two copies) and data-parallel replicas
    give the scores of TP=1."""
    _, _, cases, [reference, _] = taylor_run
    for [scores] in run_distributed(megatron_taylor_scores, world, tp, pp, args=(cases[:1],)):
        for name in ("hidden", "heads", "neurons", "loss"):
            torch.testing.assert_close(scores[name], reference[name], rtol=1e-5, atol=1e-9, msg=name)


def test_taylor_scores_are_cached_with_their_calibration(tmp_path):
    from nemo_minitron.pruning.stage import PruneConfig, _request

    requests = {method: _request(PruneConfig(checkpoint=str(tmp_path), importance=method))
                for method in ("activation", "taylor", "magnitude")}
    assert requests["taylor"]["calib"] == requests["activation"]["calib"] is not None
    assert requests["taylor"]["aggregation"] is None and requests["magnitude"]["calib"] is None
    assert len({json.dumps(r, sort_keys=True) for r in requests.values()}) == 3
